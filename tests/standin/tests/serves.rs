//! The stand-in does what the supervision tests rely on: a parent, a child that serves the file
//! it read at start, and the port held by the child.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

#[test]
fn parent_starts_a_child_that_serves_the_file() {
    let dir = std::env::temp_dir().join(format!("standin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("message.txt"), "hello").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut parent = std::process::Command::new(env!("CARGO_BIN_EXE_standin"))
        .current_dir(&dir)
        .args(["--port", &port.to_string(), "--file", "message.txt"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let response = loop {
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            break response;
        }
        assert!(Instant::now() < deadline, "never served");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(response.ends_with("\r\n\r\nhello"), "{response}");
    let pid: u32 = response.lines().find_map(|l| l.strip_prefix("X-Pid: ")).unwrap().parse().unwrap();
    assert_ne!(pid, parent.id(), "the child holds the port, not the parent");
    // SAFETY: plain kill(2) of the processes this test started.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    parent.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
