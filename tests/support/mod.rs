//! Shared helpers of the integration tests: fresh temp trees, the real binaries, convergence checks.

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn devloop_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_devloop"))
}

/// The agent binary, built beside devloop by `cargo test --workspace`.
pub fn agent_bin() -> PathBuf {
    let path = devloop_bin().with_file_name("devloop-agent");
    assert!(path.is_file(), "{} is missing: run the tests with `cargo test --workspace`", path.display());
    path
}

/// A source folder with a devloop.yaml, and an empty target folder, in a fresh temp dir.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub src: PathBuf,
    pub dst: PathBuf,
}

impl Fixture {
    pub fn new(config: &str) -> Fixture {
        Fixture::new_in(config, &std::env::temp_dir())
    }

    /// A fixture under `parent` (e.g. `/dev/shm` for trees of hundreds of thousands of files: the
    /// disk file system here creates files slowly).
    pub fn new_in(config: &str, parent: &Path) -> Fixture {
        let dir = tempfile::tempdir_in(parent).unwrap();
        let src = dir.path().join("src");
        let dst = dir.path().join("dst");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("devloop.yaml"), config).unwrap();
        Fixture { dir, src, dst }
    }

    pub fn write(&self, rel: &str, body: &str) {
        write(&self.src, rel, body);
    }

    pub fn target(&self) -> String {
        format!("local:{}", self.dst.display())
    }

    /// `devloop watch --once --json` to completion.
    pub fn once(&self, extra: &[&str]) -> Run {
        self.once_via(&self.target(), extra)
    }

    /// `devloop watch --once --json --target TARGET` to completion.
    pub fn once_via(&self, target: &str, extra: &[&str]) -> Run {
        let output = Command::new(devloop_bin())
            .current_dir(&self.src)
            .args(["--json", "watch", "--once", "--target", target])
            .args(extra)
            .env("DEVLOOP_AGENT", agent_bin())
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"))
            .output()
            .unwrap();
        Run {
            code: output.status.code(),
            events: parse_events(&String::from_utf8_lossy(&output.stdout)),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// A running `devloop watch --json`, its events collected as they come.
    pub fn watch(&self) -> Watch {
        Watch::start(&self.src, &["--json", "watch", "--target", &self.target()])
    }

    /// [`Fixture::watch`] in a process group of its own, as a shell starts a foreground job (see
    /// [`Watch::ctrl_c_to_group`]).
    pub fn watch_in_own_group(&self) -> Watch {
        let args = ["--json", "watch", "--target", &self.target()];
        Watch::spawn_within(&self.src, &devloop_bin(), &args, Duration::from_secs(20), true)
    }

    /// A running `devloop watch --json` whose app has started once (first `restarted`).
    pub fn watch_restarts(&self) -> Watch {
        let mut watch = self.watch();
        if !watch.seen.iter().any(|e| e["event"] == "restarted") {
            watch.wait_for("restarted", Duration::from_secs(20));
        }
        watch
    }

    /// Waits until the target's tree equals the source's (ignored paths left out on both sides).
    pub fn converge(&self) {
        converge(&self.src, &self.dst, &[]);
    }
}

pub fn write(root: &Path, rel: &str, body: &str) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, body).unwrap();
}

pub struct Run {
    pub code: Option<i32>,
    pub events: Vec<serde_json::Value>,
    pub stderr: String,
}

impl Run {
    pub fn of(&self, kind: &str) -> Vec<&serde_json::Value> {
        self.events.iter().filter(|e| e["event"] == kind).collect()
    }
}

pub fn parse_events(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l}")))
        .collect()
}

pub fn converge(src: &Path, dst: &Path, skip: &[&str]) {
    if let Err(report) = try_converge(src, dst, skip, Duration::from_secs(20)) {
        panic!("{report}");
    }
}

/// One path of a tree as this test sees it, independently of devloop's own walk, filter and
/// hashing: raw bytes and the exec bit, a symlink's target, or a folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    File { bytes: Vec<u8>, exec: bool },
    Link(PathBuf),
    Dir,
}

/// Everything under `root` except `.git` folders, the agent's `.devloop/` and the `skip` paths
/// (each relative to the root, a file or a whole folder), read with plain `std::fs`.
pub fn tree(root: &Path, skip: &[&str]) -> std::collections::BTreeMap<String, Node> {
    use std::os::unix::fs::PermissionsExt;
    let skip: Vec<&str> = skip.iter().map(|s| s.trim_end_matches('/')).collect();
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = if rel.is_empty() { root.to_path_buf() } else { root.join(&rel) };
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
            if name == ".git" || path == ".devloop" || skip.contains(&path.as_str()) {
                continue;
            }
            let Ok(meta) = fs::symlink_metadata(entry.path()) else { continue };
            let node = if meta.is_dir() {
                stack.push(path.clone());
                Node::Dir
            } else if meta.file_type().is_symlink() {
                Node::Link(fs::read_link(entry.path()).unwrap_or_default())
            } else {
                let Ok(bytes) = fs::read(entry.path()) else { continue };
                Node::File { bytes, exec: meta.permissions().mode() & 0o111 != 0 }
            };
            out.insert(path, node);
        }
    }
    out
}

/// Waits until the trees are equal (compared by [`tree`]), or says how they differ.
pub fn try_converge(src: &Path, dst: &Path, skip: &[&str], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let a = tree(src, skip);
        let b = tree(dst, skip);
        if a == b {
            return Ok(());
        }
        if Instant::now() > deadline {
            let only_src: Vec<_> = a.iter().filter(|(k, v)| b.get(*k) != Some(v)).map(|(k, _)| k).take(10).collect();
            let only_dst: Vec<_> = b.iter().filter(|(k, v)| a.get(*k) != Some(v)).map(|(k, _)| k).take(10).collect();
            return Err(format!(
                "target never converged\n source-only/different: {only_src:?}\n target-only/different: {only_dst:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Watch {
    pub child: Child,
    events: mpsc::Receiver<serde_json::Value>,
    pub seen: Vec<serde_json::Value>,
}

impl Watch {
    pub fn start(cwd: &Path, args: &[&str]) -> Watch {
        Watch::spawn(cwd, &devloop_bin(), args)
    }

    /// `start`, for runs that do long work before they watch (an image build).
    pub fn start_within(cwd: &Path, args: &[&str], timeout: Duration) -> Watch {
        Watch::spawn_within(cwd, &devloop_bin(), args, timeout, false)
    }

    /// Any command that ends up running `devloop --json …` (e.g. inside `unshare`).
    pub fn spawn(cwd: &Path, program: &Path, args: &[&str]) -> Watch {
        Watch::spawn_within(cwd, program, args, Duration::from_secs(20), false)
    }

    fn spawn_within(cwd: &Path, program: &Path, args: &[&str], timeout: Duration, own_group: bool) -> Watch {
        let mut command = Command::new(program);
        command
            .current_dir(cwd)
            .args(args)
            .env("DEVLOOP_AGENT", agent_bin())
            .env("XDG_CACHE_HOME", cwd.parent().unwrap_or(cwd).join("cache"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if own_group {
            std::os::unix::process::CommandExt::process_group(&mut command, 0);
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let event: serde_json::Value = serde_json::from_str(&line).expect("JSON event");
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        let mut watch = Watch { child, events: rx, seen: Vec::new() };
        watch.wait_for("watching", timeout);
        watch
    }

    /// Waits for the next event of this kind (events before it are kept in `seen`).
    pub fn wait_for(&mut self, kind: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) => {
                    self.seen.push(event.clone());
                    if event["event"] == kind {
                        return event;
                    }
                }
                Err(_) => panic!("no `{kind}` event within {timeout:?}; saw {:?}", self.seen),
            }
        }
    }

    /// Events that arrived so far, without waiting.
    pub fn drain(&mut self) -> Vec<serde_json::Value> {
        let fresh: Vec<_> = self.events.try_iter().collect();
        self.seen.extend(fresh.iter().cloned());
        fresh
    }

    /// Ctrl+C, then the exit code.
    pub fn stop(mut self) -> Option<i32> {
        unsafe { libc_kill(self.child.id() as i32, 2) };
        self.exit_within(Duration::from_secs(10), "stop on SIGINT")
    }

    /// Ctrl+C as a terminal sends it, to every process of the group (the watch must have been
    /// started in its own, [`Fixture::watch_in_own_group`]); then the exit code, with every
    /// event the process printed on its way out in `seen`.
    pub fn ctrl_c_to_group(&mut self) -> Option<i32> {
        unsafe { libc_kill(-(self.child.id() as i32), 2) };
        let code = self.exit_within(Duration::from_secs(10), "stop on SIGINT to its group");
        // Up to the end of its output (the reader stops there).
        while let Ok(event) = self.events.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(event);
        }
        code
    }

    pub fn wait_exit(mut self, timeout: Duration) -> Option<i32> {
        let code = self.exit_within(timeout, &format!("exit within {timeout:?}"));
        self.drain();
        code
    }

    /// The exit code once the process ends; kills it and fails the test after `timeout`.
    fn exit_within(&mut self, timeout: Duration, what: &str) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("devloop did not {what}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

pub fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .current_dir(dir)
        .args(["-c", "user.email=t@t", "-c", "user.name=t", "-c", "init.defaultBranch=main"])
        .args(args)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?} failed");
}

/// Whether `unshare --user` works here (a user namespace's own inotify limits let a test lower
/// them for one process alone). When it does not, a test may skip only where the runner says so
/// (DEVLOOP_SKIP_USERNS): never a silent pass.
pub fn user_namespace_or_skip() -> bool {
    let probe = Command::new("unshare").args(["--user", "--map-root-user", "true"]).status();
    if probe.is_ok_and(|s| s.success()) {
        return true;
    }
    assert!(
        std::env::var_os("DEVLOOP_SKIP_USERNS").is_some(),
        "unshare --user is not available here: this test needs a user namespace (set DEVLOOP_SKIP_USERNS=1 to skip it deliberately)"
    );
    eprintln!("SKIPPED (DEVLOOP_SKIP_USERNS): unshare --user is not available here");
    false
}
