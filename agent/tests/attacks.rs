//! The cases of the attack run against the agent (shared/notes/agent-attacks.md), each pinned:
//! symlink chains that climb out, folders swapped for symlinks while a batch applies, metadata
//! bombs in the tar stream, two sessions on one root. The agent runs as a real process.

use std::io::{BufReader, Read, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devloop_agent::protocol::{encode_frame, Applied, Chmod, Frame, FromAgent, ToAgent, MAGIC, PROTOCOL_VERSION};

mod common;
use common::Tar;

/// A `devloop-agent serve` process and the protocol spoken by hand.
struct Agent {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    reaped: bool,
}

impl Agent {
    /// Starts a session: handshake and hello, but does not read the manifest yet.
    fn start(root: &Path) -> Agent {
        Agent::start_as(root, "")
    }

    /// Starts a connection of the session `session`.
    fn start_as(root: &Path, session: &str) -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_devloop-agent"))
            .args(["serve", "--root"])
            .arg(root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        hello.extend(message(&ToAgent::Hello {
            client: "attack".into(),
            session: session.into(),
            excludes: vec![],
            docker_context: None,
            ask: false,
        }));
        stdin.write_all(&hello).unwrap();
        let mut agent = Agent { child, stdin, stdout, reaped: false };
        let mut theirs = [0u8; 12];
        agent.stdout.read_exact(&mut theirs).unwrap();
        assert_eq!(&theirs[..8], &MAGIC);
        agent
    }

    /// Starts a session and reads its manifest.
    fn connect(root: &Path) -> Agent {
        let mut agent = Agent::start(root);
        agent.until(|m| matches!(m, FromAgent::ManifestEnd { .. }));
        agent
    }

    fn next(&mut self) -> Option<FromAgent> {
        let mut head = [0u8; 5];
        self.stdout.read_exact(&mut head).ok()?;
        let len = u32::from_be_bytes(head[..4].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len];
        self.stdout.read_exact(&mut payload).ok()?;
        Some(serde_json::from_slice(&payload).unwrap())
    }

    fn until(&mut self, wanted: impl Fn(&FromAgent) -> bool) -> FromAgent {
        loop {
            let message = self.next().expect("the agent answers");
            if wanted(&message) {
                return message;
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stdin.write_all(bytes).unwrap();
        self.stdin.flush().unwrap();
    }

    fn batch_start(&mut self, id: u64, deletes: &[String], chmods: Vec<Chmod>) {
        self.send(&message(&ToAgent::Batch { id, deletes: deletes.to_vec(), chmods }));
    }

    fn data(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(256 << 10) {
            self.send(&encode_frame(&Frame::Data(chunk.to_vec())));
        }
    }

    fn applied(&mut self) -> Applied {
        self.send(&encode_frame(&Frame::DataEnd));
        match self.until(|m| matches!(m, FromAgent::Applied(_) | FromAgent::Fatal { .. })) {
            FromAgent::Applied(applied) => applied,
            other => panic!("expected Applied, got {other:?}"),
        }
    }

    fn batch(&mut self, id: u64, deletes: &[String], chmods: Vec<Chmod>, tar: &[u8]) -> Applied {
        self.batch_start(id, deletes, chmods);
        self.data(tar);
        self.applied()
    }

    fn bye(mut self) {
        self.send(&message(&ToAgent::Bye));
        assert!(self.child.wait().unwrap().success());
    }

    /// Peak resident memory of the agent, in bytes, once it has ended (after a fatal error it
    /// ends by itself; its /proc status is gone as soon as it has). Consumes the session.
    fn peak_rss_at_exit(mut self) -> u64 {
        let mut status = 0;
        // SAFETY: plain wait4 on our own child, into zeroed out-parameters.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let pid = unsafe { libc::wait4(self.child.id() as i32, &mut status, 0, &mut usage) };
        assert_eq!(pid, self.child.id() as i32, "the agent was waited for once");
        // Reaped here: the pid is no longer ours to signal or wait for.
        self.reaped = true;
        usage.ru_maxrss as u64 * 1024
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn message(msg: &ToAgent) -> Vec<u8> {
    encode_frame(&Frame::Message(serde_json::to_vec(msg).unwrap()))
}

fn refused(applied: &Applied) -> Vec<&str> {
    applied.refused.iter().map(|p| p.path.as_str()).collect()
}

/// Names, contents and modes of everything in a folder (not following links).
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>, u32)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            let body = if meta.is_file() { std::fs::read(e.path()).unwrap() } else { Vec::new() };
            (e.file_name().to_string_lossy().into_owned(), body, meta.permissions().mode())
        })
        .collect();
    out.sort();
    out
}

fn setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), "outside the root").unwrap();
    std::fs::write(outside.join("exe"), "not to be touched").unwrap();
    std::fs::set_permissions(outside.join("exe"), std::fs::Permissions::from_mode(0o644)).unwrap();
    (dir, root, outside)
}

#[test]
fn symlink_chains_that_climb_out_are_refused() {
    let (_dir, root, _outside) = setup();
    let mut agent = Agent::connect(&root);
    let tar = Tar::new()
        .symlink("b", ".")
        .symlink("l", "b/..")
        .dir("d")
        .symlink("d/up", "..")
        .symlink("x", "d/up/..")
        .symlink("k", "b/b/b/../../..")
        .symlink("a", "b2")
        .symlink("b2", "..")
        .symlink("t1", "/tmp")
        .symlink("t2", "//tmp")
        .symlink("t3", "/")
        .symlink("fine", "d/up/d")
        .bytes();
    let applied = agent.batch(1, &[], vec![], &tar);
    assert_eq!(refused(&applied), ["l", "x", "k", "b2", "t1", "t2", "t3"]);
    // What was created can only lead inside: `a -> b2` dangles.
    for link in ["b", "d/up", "a", "fine"] {
        assert!(std::fs::symlink_metadata(root.join(link)).unwrap().file_type().is_symlink(), "{link}");
    }
    assert!(std::fs::read_dir(root.join("b")).unwrap().count() > 0);
    agent.bye();
}

/// The single swap of the attack: `d` checked for the first entry, swapped for a symlink to an
/// outside folder, then the rest of the batch (writes, a delete, a chmod through `d`).
#[test]
fn a_folder_swapped_for_a_symlink_in_the_middle_of_a_batch_is_not_followed() {
    let (_dir, root, outside) = setup();
    let before = snapshot(&outside);
    let mut agent = Agent::connect(&root);
    agent.batch(1, &[], vec![], &Tar::new().file("d/first.txt", b"1").bytes());
    assert!(root.join("d/first.txt").is_file());

    agent.batch_start(2, &[], vec![]);
    agent.data(&Tar::new().file("d/a.txt", b"a").bytes()[..2048]);
    // The first entry is through; now `d` leads outside.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !root.join("d/a.txt").exists() {
        assert!(Instant::now() < deadline, "the first entry never landed");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::rename(root.join("d"), root.join("d.real")).unwrap();
    symlink(&outside, root.join("d")).unwrap();
    let rest = Tar::new().file("d/b.txt", b"evil").file("d/c/deep.txt", b"evil").file("ok.txt", b"ok").bytes();
    agent.data(&rest);
    let applied = agent.applied();
    assert_eq!(refused(&applied), ["d/b.txt", "d/c/deep.txt"]);
    let chmod = vec![Chmod { path: "d/exe".into(), exec: true }];
    let applied = agent.batch(3, &["d/secret.txt".into()], chmod, &Tar::new().bytes());
    assert_eq!(refused(&applied), ["d/secret.txt", "d/exe"]);
    assert_eq!(snapshot(&outside), before, "nothing outside written, deleted or chmodded");
    assert_eq!(std::fs::read(root.join("ok.txt")).unwrap(), b"ok");
    agent.bye();
}

/// The racing swap of the attack: a folder swapped back and forth with a symlink to an outside
/// folder in a tight loop while batches write, delete and chmod through it.
#[test]
fn a_folder_swapped_in_a_tight_loop_while_batches_apply_leaves_the_outside_alone() {
    let (_dir, root, outside) = setup();
    for i in 0..200 {
        std::fs::write(outside.join(format!("old{i}")), "outside").unwrap();
    }
    let before = snapshot(&outside);
    let mut agent = Agent::connect(&root);
    agent.batch(1, &[], vec![], &Tar::new().file("d/seed.txt", b"s").bytes());

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let swapper = {
        let (stop, swaps, root, outside) = (Arc::clone(&stop), Arc::clone(&swaps), root.clone(), outside.clone());
        std::thread::spawn(move || {
            let (d, real) = (root.join("d"), root.join("d.real"));
            while !stop.load(Ordering::Relaxed) {
                if std::fs::rename(&d, &real).is_ok() {
                    let _ = symlink(&outside, &d);
                    std::thread::yield_now();
                    let _ = std::fs::remove_file(&d);
                    if std::fs::rename(&real, &d).is_err() {
                        // The agent created `d` again meanwhile (it makes missing folders).
                        let _ = std::fs::remove_dir_all(&d);
                        let _ = std::fs::rename(&real, &d);
                    }
                    swaps.fetch_add(1, Ordering::Relaxed);
                } else if real.exists() {
                    let _ = std::fs::remove_dir_all(&real);
                }
            }
        })
    };
    // Batches go on until they have raced a good number of swaps (a loaded machine swaps slower).
    let mut round = 0u64;
    while round < 20 || (swaps.load(Ordering::Relaxed) < 200 && round < 1000) {
        let mut tar = Tar::new();
        for i in 0..100 {
            tar = tar.file(&format!("d/r{round}/f{i}"), b"in the root");
        }
        let deletes: Vec<String> = (0..200).map(|i| format!("d/old{i}")).collect();
        let chmods = vec![Chmod { path: "d/exe".into(), exec: true }];
        agent.batch(10 + round, &deletes, chmods, &tar.bytes());
        round += 1;
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    let swaps = swaps.load(Ordering::Relaxed);
    assert!(swaps >= 200, "the swapper raced the batches ({swaps} swaps in {round} batches)");
    assert_eq!(snapshot(&outside), before, "nothing outside written, deleted or chmodded");
    agent.bye();
}

/// Headers that announce 500 MiB of long name or PAX records: refused at the header, with the
/// agent's memory bounded while the claimed bytes keep streaming in.
#[test]
fn tar_metadata_bombs_are_refused_with_bounded_memory() {
    for kind in [b'L', b'x'] {
        let (_dir, root, _outside) = setup();
        let mut agent = Agent::connect(&root);
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::new(kind));
        header.set_size(500 << 20);
        header.set_path("././@LongLink").unwrap();
        header.set_cksum();
        agent.batch_start(1, &[], vec![]);
        agent.data(header.as_bytes());
        let junk = vec![b'a'; 1 << 20];
        for _ in 0..100 {
            agent.data(&junk);
        }
        let answer = {
            agent.send(&encode_frame(&Frame::DataEnd));
            agent.until(|m| matches!(m, FromAgent::Fatal { .. }))
        };
        let FromAgent::Fatal { message } = answer else { unreachable!() };
        assert!(message.contains("larger than"), "{message}");
        let peak = agent.peak_rss_at_exit();
        assert!(peak < 48 << 20, "peak RSS {} MiB after 100 MiB of a 500 MiB header", peak >> 20);
        assert!(message.len() < 2048, "the answer stays small");
    }
}

#[test]
fn frames_above_the_limits_are_refused_before_allocating() {
    let (_dir, root, _outside) = setup();
    let mut agent = Agent::connect(&root);
    agent.batch_start(1, &[], vec![]);
    // A data frame header claiming 16 MiB: above the data-frame limit.
    let mut head = (16u32 << 20).to_be_bytes().to_vec();
    head.push(2);
    agent.send(&head);
    let FromAgent::Fatal { message } = agent.until(|m| matches!(m, FromAgent::Fatal { .. })) else { unreachable!() };
    assert!(message.contains("larger than"), "{message}");
    assert!(agent.peak_rss_at_exit() < 32 << 20);
}

/// Regression: a second session wiped the first one's staging folder mid-file. Now it waits for
/// the first to end; the file staged by the first arrives whole.
#[test]
fn a_second_session_on_a_root_waits_for_the_first() {
    let (_dir, root, _outside) = setup();
    let mut first = Agent::connect(&root);
    let big = vec![b'x'; 8 << 20];
    let tar = Tar::new().file("big.bin", &big).bytes();
    first.batch_start(1, &[], vec![]);
    first.data(&tar[..tar.len() / 2]);

    let mut second = Agent::start(&root);
    std::thread::sleep(Duration::from_millis(500));
    // The second session has not read the tree (nor touched the staging folder) yet.
    first.data(&tar[tar.len() / 2..]);
    let applied = first.applied();
    assert_eq!(applied.written, 1, "{applied:?}");
    assert_eq!(std::fs::read(root.join("big.bin")).unwrap().len(), big.len());
    first.bye();

    let end = second.until(|m| matches!(m, FromAgent::ManifestEnd { .. }));
    assert!(matches!(end, FromAgent::ManifestEnd { entries: 1, .. }), "{end:?}");
    second.bye();
}

/// A reconnect of the same CLI session takes the root over from its own stale connection (an exec
/// whose stream broke but whose agent never saw its stdin close) instead of waiting for it.
#[test]
fn a_new_connection_of_the_same_session_takes_over_from_a_stale_one() {
    let (_dir, root, _outside) = setup();
    let mut stale = Agent::start_as(&root, "cli-1");
    stale.until(|m| matches!(m, FromAgent::ManifestEnd { .. }));
    let started = Instant::now();
    let mut fresh = Agent::start_as(&root, "cli-1");
    fresh.until(|m| matches!(m, FromAgent::ManifestEnd { .. }));
    assert!(started.elapsed() < Duration::from_secs(5), "took over at once, not after the wait");
    let status = stale.child.wait().unwrap();
    assert!(!status.success(), "the stale connection was stopped");
    let applied = fresh.batch(1, &[], vec![], &Tar::new().file("a.txt", b"a").bytes());
    assert_eq!(applied.written, 1);
    fresh.bye();
}

/// Whoever can write `.devloop/session.lock` chooses the pid a new connection of the holder's
/// session stops. Only a `devloop-agent serve` holding this very lock is ever signalled: not
/// another agent serving another root, not a process whose arguments merely contain `serve`.
#[test]
fn a_forged_lock_file_signals_nobody() {
    let (dir, root, _outside) = setup();
    let other_root = dir.path().join("other");
    std::fs::create_dir_all(&other_root).unwrap();
    let mut holder = Agent::start_as(&root, "cli-1");
    holder.until(|m| matches!(m, FromAgent::ManifestEnd { .. }));
    let mut other_agent = Agent::start_as(&other_root, "cli-2");
    other_agent.until(|m| matches!(m, FromAgent::ManifestEnd { .. }));
    let mut bystander = Command::new("sh").args(["-c", "sleep 30", "sh", "serve"]).spawn().unwrap();
    let lock = root.join(".devloop/session.lock");
    for victim in [other_agent.child.id(), bystander.id()] {
        std::fs::write(&lock, format!("{victim} cli-1")).unwrap();
        let mut fresh = Agent::start_as(&root, "cli-1");
        std::thread::sleep(Duration::from_millis(700));
        assert!(other_agent.child.try_wait().unwrap().is_none(), "the agent of another root was signalled");
        assert!(bystander.try_wait().unwrap().is_none(), "a process named in the lock file was signalled");
        // The new connection waits for the real holder; it still cannot take the root.
        assert!(fresh.child.try_wait().unwrap().is_none());
        fresh.child.kill().unwrap();
        fresh.child.wait().unwrap();
    }
    bystander.kill().unwrap();
    bystander.wait().unwrap();
    other_agent.bye();
    holder.bye();
}

/// Before: a hand-built batch of a million refused entries drove the agent to 417 MiB, and its
/// answer (every path in words) outgrew the frame limit. Now a batch ends at the entry limit,
/// the answer names each refused entry by its place and describes a few in words.
#[test]
fn a_batch_of_endless_refused_entries_is_cut_at_the_limit() {
    use devloop_agent::protocol::{MAX_BATCH_ENTRIES, REFUSED_EXAMPLES};
    let (_dir, root, _outside) = setup();
    let mut agent = Agent::connect(&root);
    agent.batch_start(1, &[], vec![]);
    let entries = 100_000;
    let mut chunk = Vec::with_capacity(256 << 10);
    for i in 0..entries {
        let name = format!("{}{i:08}", "f".repeat(80));
        let header = Tar::header(name.as_bytes(), tar::EntryType::Fifo, 0, 0o644);
        chunk.extend_from_slice(header.as_bytes());
        if chunk.len() >= 256 << 10 {
            agent.data(&chunk);
            chunk.clear();
        }
    }
    chunk.extend_from_slice(&[0u8; 1024]);
    agent.data(&chunk);
    let applied = agent.applied();
    assert_eq!(applied.refused_at.len(), MAX_BATCH_ENTRIES, "every refused entry by its place, up to the limit");
    assert_eq!(applied.refused_at[..3], [0, 1, 2]);
    assert!(!applied.refused.is_empty() && applied.refused.len() <= REFUSED_EXAMPLES, "{}", applied.refused.len());
    assert_eq!(applied.written, 0);
    // The batch broke the limit: the session ends.
    let status = agent.child.wait().unwrap();
    assert!(!status.success());
    assert!(std::fs::read_dir(&root).unwrap().all(|e| e.unwrap().file_name() == ".devloop"), "nothing was made");
}
