//! The agent restarts the app: a `dotnet run`-shaped stand-in (a parent whose child holds the
//! port), driven through the real binaries with `--target local:`, where the agent child both
//! serves the protocol and supervises the app.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{agent_bin, Fixture};

pub fn standin_bin() -> std::path::PathBuf {
    let path = crate::support::devloop_bin().with_file_name("standin");
    assert!(path.is_file(), "{} is missing: run the tests with `cargo test --workspace`", path.display());
    path
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GET / on the port: the body and the serving pid.
pub fn get(port: u16) -> Option<(String, u32)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let pid = head.lines().find_map(|l| l.strip_prefix("X-Pid: "))?.parse().ok()?;
    Some((body.to_string(), pid))
}

/// Processes of the stand-in serving this port (parent and child).
pub fn standins(port: u16) -> usize {
    let out = Command::new("pgrep").args(["-f", &format!("^[^ ]*standin --port {port} ")]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn wait_no_standins(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while standins(port) > 0 {
        assert!(Instant::now() < deadline, "orphans of the app are still running on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn config(port: u16, extra: &str) -> String {
    format!(
        "name: shop\nrun: [{}, --port, '{port}', --file, message.txt]\nready: {{tcp: {port}, timeout: 10s}}\ngrace: 2s\n{extra}",
        standin_bin().display()
    )
}

fn config_with_args(port: u16, args: &str, extra: &str) -> String {
    format!(
        "name: shop\nrun: [{}, --port, '{port}', --file, message.txt, {args}]\nready: {{tcp: {port}, timeout: 10s}}\n{extra}",
        standin_bin().display()
    )
}

#[test]
fn hundred_edits_hundred_restarts_new_content_no_orphans() {
    let port = free_port();
    let fx = Fixture::new(&config(port, ""));
    fx.write("message.txt", "v0");
    let mut watch = fx.watch_restarts();
    assert_eq!(get(port).map(|(body, _)| body).as_deref(), Some("v0"));
    // The app's output reaches the user. It prints `serving` once it listens, so the readiness
    // probe may get in first and the line arrive after the report.
    let serving =
        |e: &serde_json::Value| e["event"] == "output" && e["line"].as_str().unwrap_or("").contains("serving");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !watch.seen.iter().any(serving) {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        watch.wait_for("output", left);
    }

    let mut pids = std::collections::HashSet::new();
    for i in 1..=100 {
        fx.write("message.txt", &format!("v{i}"));
        let restarted = watch.wait_for("restarted", Duration::from_secs(20));
        let (body, pid) = get(port).expect("the new app serves");
        assert_eq!(body, format!("v{i}"), "cycle {i}");
        assert!(pids.insert(pid), "a new process every cycle");
        assert_eq!(standins(port), 2, "exactly the parent and the app, cycle {i}: {restarted}");
    }
    assert_eq!(watch.stop(), Some(0));
    wait_no_standins(port);
}

#[test]
fn burst_of_thirty_files_is_one_restart() {
    let port = free_port();
    let fx = Fixture::new(&config(port, ""));
    fx.write("message.txt", "before");
    let mut watch = fx.watch_restarts();
    let mark = watch.seen.len();
    for i in 0..30 {
        fx.write(&format!("src/file{i}.cs"), &format!("class C{i} {{}}"));
    }
    watch.wait_for("restarted", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    watch.drain();
    let after = &watch.seen[mark..];
    let restarts = after.iter().filter(|e| e["event"] == "restarted").count();
    let files: u64 = after.iter().filter(|e| e["event"] == "applied").map(|e| e["files"].as_u64().unwrap()).sum();
    assert_eq!(restarts, 1, "{after:?}");
    // 30 files and their folder; on a loaded machine a window can close between a file's creation
    // and its write, and that file then syncs twice (empty, then whole).
    assert!(files >= 31, "30 files and their folder: {after:?}");
    assert_eq!(watch.stop(), Some(0));
    wait_no_standins(port);
}

/// devloop started again on a folder its local target already holds: nothing to sync, and the
/// agent (a new one each session, which starts its app at the first restart) was never asked
/// for one, so the app did not run until the next edit. Each session now starts it, and Ctrl+C
/// to the terminal's whole group (the agent has a group of its own, the app another) stops it.
#[test]
fn each_session_on_a_synced_folder_starts_the_app() {
    let port = free_port();
    let fx = Fixture::new(&config(port, ""));
    fx.write("message.txt", "v1");
    for session in 0..3 {
        let mut watch = fx.watch_in_own_group();
        if !watch.seen.iter().any(|e| e["event"] == "restarted") {
            watch.wait_for("restarted", Duration::from_secs(20));
        }
        if session > 0 {
            assert!(watch.seen.iter().any(|e| e["event"] == "up_to_date"), "session {session}: {:?}", watch.seen);
        }
        assert_eq!(get(port).map(|(body, _)| body), Some("v1".to_string()), "session {session}");
        assert_eq!(watch.ctrl_c_to_group(), Some(0), "session {session}: {:?}", watch.seen);
        wait_no_standins(port);
    }
}

#[test]
fn static_files_sync_without_a_restart() {
    let port = free_port();
    let fx = Fixture::new(&config(port, "no_restart: ['wwwroot/**']\n"));
    fx.write("message.txt", "v1");
    let mut watch = fx.watch_restarts();
    let (_, pid) = get(port).unwrap();
    fx.write("wwwroot/site.css", "body {}");
    watch.wait_for("applied", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    watch.drain();
    let watching = watch.seen.iter().position(|e| e["event"] == "watching").unwrap();
    let restarts: Vec<_> = watch.seen[watching..].iter().filter(|e| e["event"] == "restarted").collect();
    assert!(restarts.is_empty(), "{restarts:?}");
    assert_eq!(get(port).unwrap().1, pid, "the same process still serves");
    assert_eq!(std::fs::read_to_string(fx.dst.join("wwwroot/site.css")).unwrap(), "body {}");
    drop(watch);
    wait_no_standins(port);
}

#[test]
fn failing_build_keeps_the_old_app_serving_and_shows_the_error() {
    let port = free_port();
    let build = "build: [sh, -c, 'if grep -q broken build.flag; then echo \"Program.cs(3,1): error CS1002: ; expected\"; exit 1; fi; echo build ok']\n";
    let fx = Fixture::new(&config(port, build));
    fx.write("build.flag", "ok");
    fx.write("message.txt", "good");
    let mut watch = fx.watch_restarts();
    let (_, old_pid) = get(port).unwrap();

    fx.write("build.flag", "broken");
    fx.write("message.txt", "never served");
    let failed = watch.wait_for("build_failed", Duration::from_secs(20));
    assert_eq!(failed["code"], 1);
    assert!(failed["output"].as_str().unwrap().contains("error CS1002"), "{failed}");
    assert_eq!(get(port).unwrap(), ("good".to_string(), old_pid), "the old app keeps serving");

    fx.write("build.flag", "ok");
    watch.wait_for("restarted", Duration::from_secs(20));
    assert_eq!(get(port).unwrap().0, "never served");
    assert_eq!(watch.stop(), Some(0));
    wait_no_standins(port);
}

#[test]
fn app_ignoring_sigterm_is_killed_after_the_grace_period() {
    let port = free_port();
    let fx = Fixture::new(&config_with_args(port, "--ignore-term", "grace: 300ms\n"));
    fx.write("message.txt", "stubborn");
    let mut watch = fx.watch_restarts();
    fx.write("message.txt", "replaced");
    let restarted = watch.wait_for("restarted", Duration::from_secs(20));
    let stop_ms = restarted["stop_ms"].as_f64().unwrap();
    assert!((300.0..3000.0).contains(&stop_ms), "stopped after the grace period: {restarted}");
    assert_eq!(get(port).unwrap().0, "replaced");
    assert_eq!(watch.stop(), Some(0));
    wait_no_standins(port);
}

#[test]
fn sigterm_to_the_agent_stops_the_app_and_exits_with_its_code() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("message.txt"), "pid one").unwrap();
    let mut agent = Command::new(agent_bin())
        .args(["run", "--root"])
        .arg(dir.path())
        .args(["--", standin_bin().to_str().unwrap(), "--port", &port.to_string(), "--file", "message.txt"])
        .args(["--term-exit", "7"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(port).is_none() {
        assert!(Instant::now() < deadline, "the app never served");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(standins(port), 2);
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let status = agent.wait().unwrap();
    assert_eq!(status.code(), Some(7), "the agent exits with the app's code");
    wait_no_standins(port);
}

#[test]
fn once_waits_until_ready_and_fails_when_the_app_never_is() {
    let port = free_port();
    let fx = Fixture::new(&config(port, ""));
    fx.write("message.txt", "ready?");
    let run = fx.once(&[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let restarted = run.of("restarted");
    assert_eq!(restarted.len(), 1);
    assert!(restarted[0]["ready_ms"].as_f64().is_some());
    wait_no_standins(port);

    // An app that never listens.
    let fx = Fixture::new(&format!("name: shop\nrun: [sleep, '30']\nready: {{tcp: {port}, timeout: 1s}}\n"));
    let run = fx.once(&[]);
    assert_eq!(run.code, Some(1));
    let error = run.of("error");
    assert!(error[0]["message"].as_str().unwrap().contains("not ready"), "{:?}", run.events);
}
