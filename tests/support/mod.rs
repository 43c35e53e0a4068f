//! Shared helpers of the integration tests: fresh temp trees, the real binaries, convergence checks.

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devloop_agent::filter::Filter;
use devloop_agent::manifest::Manifest;
use devloop_agent::walk;

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
        let dir = tempfile::tempdir().unwrap();
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
        let output = Command::new(devloop_bin())
            .current_dir(&self.src)
            .args(["--json", "watch", "--once", "--target", &self.target()])
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

/// The manifest of a tree as devloop sees it (its own ignore files, the reserved folder left out).
pub fn manifest(root: &Path, excludes: &[String]) -> Manifest {
    let filter = Arc::new(Filter::new(root, excludes).unwrap());
    let out = walk::scan(&filter, &walk::Tree::new());
    walk::manifest_of(&out.tree)
}

pub fn converge(src: &Path, dst: &Path, excludes: &[String]) {
    if let Err(report) = try_converge(src, dst, excludes, Duration::from_secs(20)) {
        panic!("{report}");
    }
}

/// Waits until the trees are equal, or says how they differ.
pub fn try_converge(src: &Path, dst: &Path, excludes: &[String], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let a = manifest(src, excludes);
        let b = manifest(dst, excludes);
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

    /// Any command that ends up running `devloop --json …` (e.g. inside `unshare`).
    pub fn spawn(cwd: &Path, program: &Path, args: &[&str]) -> Watch {
        let mut child = Command::new(program)
            .current_dir(cwd)
            .args(args)
            .env("DEVLOOP_AGENT", agent_bin())
            .env("XDG_CACHE_HOME", cwd.parent().unwrap_or(cwd).join("cache"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
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
        watch.wait_for("watching", Duration::from_secs(20));
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
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("devloop did not stop on SIGINT");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn wait_exit(mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.drain();
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("devloop did not exit within {timeout:?}");
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
