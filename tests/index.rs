//! The agent's live index, as in a pod: `devloop-agent run` lives on between sessions and each
//! session is a `devloop-agent serve` beside it (`--target cmd:…`), the real binaries end to end.
//! The index must never say "up to date" when the target changed: an app writing into the
//! synced tree, an overflowed inotify queue and the kernel's watch limit each get a test.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{self, Fixture, Run};

const CONFIG: &str = "name: demo\n";

/// `devloop-agent run` supervising a sleeping app in the target folder, as a pod's PID 1 does;
/// `argv_prefix` runs it under another program (`unshare …`).
struct Pod {
    child: Child,
}

impl Pod {
    fn start(dst: &Path, wrap: Option<&str>) -> Pod {
        fs::create_dir_all(dst).unwrap();
        let run = format!("exec {} run --root {} -- sleep 1000", support::agent_bin().display(), dst.display());
        let mut cmd = match wrap {
            Some(wrap) => {
                let mut cmd = Command::new("unshare");
                cmd.args(["--user", "--map-root-user", "sh", "-c", &format!("{wrap} && {run}")]);
                cmd
            }
            None => {
                let mut cmd = Command::new("sh");
                cmd.args(["-c", &run]);
                cmd
            }
        };
        let child = cmd.stdout(Stdio::null()).process_group(0).spawn().unwrap();
        let socket = dst.join(".devloop/agent.sock");
        let started = Instant::now();
        while !socket.exists() {
            assert!(started.elapsed() < Duration::from_secs(10), "the agent never opened its control socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Pod { child }
    }

    fn signal(&self, signal: i32) {
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// One session through a `serve` beside the pod's agent.
fn session(fx: &Fixture) -> Run {
    let run = fx.once_via(&format!("cmd:{} serve --root {}", support::agent_bin().display(), fx.dst.display()), &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    run
}

fn from_memory(run: &Run) -> bool {
    let connected = run.of("connected");
    assert_eq!(connected.len(), 1, "{:?}", run.events);
    connected[0]["from_memory"].as_bool().expect("connected says how the agent knew its tree")
}

/// The target equals the source right now (no waiting: the session has ended).
fn assert_same(fx: &Fixture) {
    if let Err(report) = support::try_converge(&fx.src, &fx.dst, &[], Duration::ZERO) {
        panic!("right after the session: {report}");
    }
}

/// A session after the initial sync: the index read the tree empty, so the folders that sync
/// created are many for its size and it may walk once to read them (or have done so already,
/// once the sync's events went quiet). Nothing is sent.
fn synced_and_read(fx: &Fixture) {
    let run = session(fx);
    assert!(run.of("applied").is_empty(), "{:?}", run.events);
}

fn tree_of(fx: &Fixture, folders: usize, files: usize) {
    for i in 0..files {
        fx.write(&format!("d{}/f{i}.txt", i % folders), &format!("file {i}"));
    }
}

#[test]
fn a_reconnect_is_answered_from_memory_and_still_sees_what_the_app_wrote() {
    let fx = Fixture::new(CONFIG);
    tree_of(&fx, 10, 200);
    let _pod = Pod::start(&fx.dst, None);
    let first = session(&fx);
    assert!(!from_memory(&first), "the first session has nothing to remember");
    assert_same(&fx);
    synced_and_read(&fx);

    let again = session(&fx);
    assert!(from_memory(&again), "{:?}", again.events);
    assert!(again.of("applied").is_empty(), "nothing to send: {:?}", again.events);

    // The app writes into the synced tree between sessions: each change must be undone by the
    // next session, straight away (a session answered from a stale memory would skip them).
    fs::write(fx.dst.join("d1/f1.txt"), "changed by the app").unwrap();
    fs::remove_file(fx.dst.join("d2/f2.txt")).unwrap();
    support::write(&fx.dst, "new/deeper/x.txt", "created by the app in new folders");
    fs::remove_dir_all(fx.dst.join("d3")).unwrap();
    fs::write(fx.dst.join("d3"), "a file where a folder was").unwrap();
    fs::set_permissions(fx.dst.join("d4/f4.txt"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let repaired = session(&fx);
    assert!(from_memory(&repaired), "events, not a walk, told the index: {:?}", repaired.events);
    assert!(!repaired.of("applied").is_empty(), "{:?}", repaired.events);
    assert_same(&fx);

    // A session with other ignore rules reads the tree under its own rules.
    fx.write("devloop.yaml", "name: demo\nsync:\n  exclude: [d5/]\n");
    let other = session(&fx);
    assert!(!from_memory(&other), "{:?}", other.events);
    assert!(fx.dst.join("d5").exists(), "an excluded folder is left in place");
}

#[test]
fn an_overflowed_event_queue_makes_the_next_answer_a_walk() {
    let fx = Fixture::new(CONFIG);
    tree_of(&fx, 4, 40);
    let pod = Pod::start(&fx.dst, None);
    session(&fx);
    synced_and_read(&fx);
    assert!(from_memory(&session(&fx)));

    // Stopped, the agent reads no events: more than the kernel queues (16,384 by default;
    // alternating files so that no two events in a row merge) overflow its queue.
    let limit: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events").unwrap().trim().parse().unwrap();
    pod.signal(libc::SIGSTOP);
    for i in 0..limit {
        fs::write(fx.dst.join(format!("d0/f{}.txt", (i % 2) * 4)), format!("noise {i}")).unwrap();
    }
    fs::write(fx.dst.join("d1/f1.txt"), "changed while the queue was full").unwrap();
    pod.signal(libc::SIGCONT);
    let after = session(&fx);
    assert!(!from_memory(&after), "an overflow must make the index walk: {:?}", after.events);
    assert_same(&fx);
    let trusted = session(&fx);
    assert!(from_memory(&trusted), "after the walk the index is trusted again: {:?}", trusted.events);
}

#[test]
fn at_the_watch_limit_the_index_is_off_says_so_and_every_session_walks() {
    // The watch limit of a user namespace applies to it alone (see sync.rs).
    if !support::user_namespace_or_skip() {
        return;
    }
    let fx = Fixture::new(CONFIG);
    tree_of(&fx, 10, 40);
    let _pod = Pod::start(&fx.dst, Some("echo 3 > /proc/sys/user/max_inotify_watches"));
    session(&fx);
    let second = session(&fx);
    assert!(!from_memory(&second), "{:?}", second.events);
    let said = second.of("problem");
    assert!(
        said.iter().any(|p| p["message"].as_str().unwrap().contains("fs.inotify.max_user_watches")),
        "the session says why the agent walks: {:?}",
        second.events
    );
    fs::write(fx.dst.join("d7/f7.txt"), "changed by the app").unwrap();
    let third = session(&fx);
    assert!(!from_memory(&third));
    assert_same(&fx);
}
