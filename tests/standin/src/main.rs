//! A stand-in for `dotnet run`, used by the supervision tests: a parent process that starts the
//! real app as a child; the child reads a file once at start and serves its content over HTTP.
//! Killing only the parent leaves the child holding the port — the bug a supervisor must avoid.
//!
//! ```text
//! standin --port P --file F [--bind ADDR] [--upstream VAR] [--ignore-term] [--term-exit CODE]
//!   --bind ADDR      listen on ADDR (default 127.0.0.1; 0.0.0.0 in a pod, for the kubelet's probe)
//!   --upstream VAR   on each request, GET the http:// URL in environment variable VAR (another
//!                    service, e.g. `urls__producer=http://producer`) and serve
//!                    `CONTENT <- UPSTREAM'S BODY` (the consumer of the article's two services)
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
    let upstream = value("--upstream");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        // The whole request head: a socket closed with unread bytes resets the connection.
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let pid = std::process::id();
        let body = match &upstream {
            None => content.clone(),
            Some(var) => {
                let called = std::env::var(var).map_err(|_| format!("${var} is not set")).and_then(|url| get(&url));
                match called {
                    Ok(answer) => format!("{} <- {answer}", content.trim()),
                    Err(e) => format!("{} <- ({e})", content.trim()),
                }
            }
        };
        let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\nX-Pid: {pid}\r\n\r\n", body.len());
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(body.as_bytes());
    }
}

/// The body of `GET url` (`http://HOST[:PORT][/PATH]`), the host resolved as the system does
/// (in a pod: the cluster's DNS, the namespace's search path).
fn get(url: &str) -> Result<String, String> {
    use std::net::ToSocketAddrs;
    use std::time::Duration;
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url} is not an http:// URL"))?;
    let (authority, path) = rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let address = if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") };
    let resolved = address.to_socket_addrs().map_err(|e| format!("cannot resolve {authority}: {e}"))?;
    let target = resolved.into_iter().next().ok_or_else(|| format!("{authority} has no address"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3))
        .map_err(|e| format!("cannot connect to {authority} ({target}): {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|e| format!("reading {url}: {e}"))?;
    let (_, body) = answer.split_once("\r\n\r\n").ok_or_else(|| format!("{url} sent no HTTP answer"))?;
    Ok(body.to_string())
}
