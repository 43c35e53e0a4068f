//! A stand-in for `dotnet run`, used by the supervision tests: a parent process that starts the
//! real app as a child; the child reads a file once at start and serves its content over HTTP.
//! Killing only the parent leaves the child holding the port — the bug a supervisor must avoid.
//!
//! ```text
//! standin --port P --file F [--bind ADDR] [--ignore-term] [--term-exit CODE]
//!   --bind ADDR      listen on ADDR (default 127.0.0.1; 0.0.0.0 in a pod, for the kubelet's probe)
//!   --ignore-term    the child ignores SIGTERM (only SIGKILL stops it)
//!   --term-exit N    the parent exits with code N on SIGTERM
//! ```

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

static TERM_EXIT: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_term(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(TERM_EXIT.load(Ordering::Relaxed)) }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let port: u16 = value("--port").expect("--port").parse().expect("port number");
    let file = value("--file").expect("--file");

    if !flag("--child") {
        if let Some(code) = value("--term-exit") {
            TERM_EXIT.store(code.parse().expect("exit code"), Ordering::Relaxed);
            // SAFETY: installing a handler that only calls _exit.
            unsafe { libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t) };
        }
        let mut child = Command::new(std::env::current_exe().unwrap()).args(&args[1..]).arg("--child").spawn().unwrap();
        println!("parent {} started app {}", std::process::id(), child.id());
        let status = child.wait().unwrap();
        std::process::exit(status.code().unwrap_or(1));
    }

    if flag("--ignore-term") {
        // SAFETY: ignoring a signal.
        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    }
    let content = std::fs::read_to_string(&file).unwrap_or_else(|e| format!("(cannot read {file}: {e})"));
    let address = value("--bind").unwrap_or_else(|| "127.0.0.1".into());
    let listener = match TcpListener::bind((address.as_str(), port)) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("app {}: cannot listen on {port}: {e}", std::process::id());
            std::process::exit(98);
        }
    };
    println!("app {} serving {:?} on {port}", std::process::id(), content.trim());
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf);
        let pid = std::process::id();
        let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\nX-Pid: {pid}\r\n\r\n", content.len());
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(content.as_bytes());
    }
}
