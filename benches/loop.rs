//! devloop's benchmark: the core loop against its peers, measured in the same run.
//!
//! ```text
//! cargo build --release --workspace && cargo bench --bench loop [-- initial rescan latency rss]
//! ```
//!
//! Prints medians and ratios:
//! - initial sync of a 10,000-file / 100 MB tree into an empty folder vs `tar -c | tar -x`;
//! - no-op rescan of a 100,000-file tree (in-process, stat cache warm; and `devloop watch --once`
//!   end to end on a synced copy) vs `rsync -a` of the same tree to a synced copy;
//! - edit → applied latency of one small file in a running `devloop watch` (50 edits);
//! - peak and steady RSS of `devloop watch` on the 100,000-file tree.
//!
//! Trees are generated in a fresh folder (`$DEVLOOP_BENCH_DIR`, default the system temp dir).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devloop_agent::filter::Filter;
use devloop_agent::walk;

fn main() {
    let wanted: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let run = |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
    let bins = Bins::find();
    let base = std::env::var_os("DEVLOOP_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new().prefix("devloop-bench-").tempdir_in(base).expect("bench folder");
    println!("devloop benchmark — work folder {}", work.path().display());
    println!("machine: {} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));

    if run("initial") || run("latency") {
        let tree = work.path().join("t10k");
        let t = Instant::now();
        generate(&tree, 10_000, 100, 10_000);
        println!("\ngenerated 10,000 files / 100 MB in {:.1} s", t.elapsed().as_secs_f64());
        if run("initial") {
            initial_sync(&bins, &tree, work.path());
        }
        if run("latency") {
            latency(&bins, &tree, work.path());
        }
    }
    if run("rescan") || run("rss") {
        let tree = work.path().join("t100k");
        let t = Instant::now();
        generate(&tree, 100_000, 1_000, 1_000);
        println!("\ngenerated 100,000 files / 100 MB in {:.1} s", t.elapsed().as_secs_f64());
        if run("rescan") {
            rescan(&bins, &tree, work.path());
        }
        if run("rss") {
            rss(&bins, &tree, work.path());
        }
    }
}

struct Bins {
    devloop: PathBuf,
    agent: PathBuf,
}

impl Bins {
    fn find() -> Bins {
        let devloop = PathBuf::from(env!("CARGO_BIN_EXE_devloop"));
        let agent = devloop.with_file_name("devloop-agent");
        if !agent.is_file() {
            eprintln!("{} is missing\nhint: cargo build --release --workspace first", agent.display());
            std::process::exit(2);
        }
        Bins { devloop, agent }
    }

    fn devloop(&self, src: &Path) -> Command {
        let mut cmd = Command::new(&self.devloop);
        cmd.current_dir(src).env("DEVLOOP_AGENT", &self.agent);
        cmd
    }
}

/// `files` files of `size` pseudo-random bytes in `dirs` folders, plus a devloop.yaml.
fn generate(root: &Path, files: usize, dirs: usize, size: usize) {
    fs::create_dir_all(root).unwrap();
    fs::write(root.join("devloop.yaml"), "name: bench\n").unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = vec![0u8; size];
    for d in 0..dirs {
        fs::create_dir_all(root.join(format!("d{d:04}"))).unwrap();
    }
    for i in 0..files {
        for chunk in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let bytes = state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        fs::write(root.join(format!("d{:04}/f{i:06}.bin", i % dirs)), &buf).unwrap();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// Runs a command to completion; wall time and peak RSS (KiB, of it and its waited children).
fn measure(mut cmd: Command) -> (f64, i64) {
    cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
    let started = Instant::now();
    // Reaped by wait4 below, which also reports the peak RSS.
    #[allow(clippy::zombie_processes)]
    let child = cmd.spawn().expect("spawn");
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(pid, child.id() as i32);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "{cmd:?} failed ({status})");
    (secs, usage.ru_maxrss)
}

fn sh(line: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", line]);
    cmd
}

fn initial_sync(bins: &Bins, tree: &Path, work: &Path) {
    println!("\n== initial sync, 10,000 files / 100 MB, empty target (median of 3) ==");
    let mut ours = Vec::new();
    let mut rss = Vec::new();
    let mut tar = Vec::new();
    for i in 0..3 {
        let dst = work.join(format!("init-devloop-{i}"));
        let mut cmd = bins.devloop(tree);
        cmd.args(["--json", "watch", "--once", "--target"]).arg(format!("local:{}", dst.display()));
        let (secs, kib) = measure(cmd);
        ours.push(secs);
        rss.push(kib as f64);
        let dst = work.join(format!("init-tar-{i}"));
        fs::create_dir_all(&dst).unwrap();
        let line = format!("tar -C '{}' -cf - . | tar -C '{}' -xf -", tree.display(), dst.display());
        tar.push(measure(sh(&line)).0);
    }
    let (o, t) = (median(ours), median(tar));
    println!("devloop watch --once   {:>8.3} s   peak RSS {:.1} MB", o, median(rss) / 1024.0);
    println!("tar -c | tar -x        {:>8.3} s", t);
    println!("ratio devloop / tar    {:>8.2}x   (target: <= 1.0, RSS < 64 MB)", o / t);
}

fn rescan(bins: &Bins, tree: &Path, work: &Path) {
    println!("\n== no-op rescan, 100,000 files ==");
    let filter = Arc::new(Filter::new(tree, &[]).unwrap());
    let cold_started = Instant::now();
    let mut previous = walk::scan(&filter, &walk::Tree::new()).tree;
    let cold = cold_started.elapsed().as_secs_f64();
    let mut warm = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let out = walk::scan(&filter, &previous);
        warm.push(t.elapsed().as_secs_f64());
        assert_eq!(out.stats.hashed_files, 0);
        previous = out.tree;
    }
    drop(previous);

    let synced = work.join("rescan-rsync");
    let line = format!("rsync -a '{}/' '{}/'", tree.display(), synced.display());
    measure(sh(&line));
    let mut rsync = Vec::new();
    for _ in 0..3 {
        rsync.push(measure(sh(&line)).0);
    }
    let dst = work.join("rescan-devloop");
    let once = |dst: &Path| {
        let mut cmd = bins.devloop(tree);
        cmd.args(["--json", "watch", "--once", "--target"]).arg(format!("local:{}", dst.display()));
        measure(cmd).0
    };
    once(&dst);
    let mut e2e = Vec::new();
    for _ in 0..3 {
        e2e.push(once(&dst));
    }
    let (w, r, e) = (median(warm), median(rsync), median(e2e));
    println!("scan, stat cache warm (the watcher's rescan)   {:>8.1} ms", w * 1000.0);
    println!("scan, cold (first scan, hashes 100 MB)        {:>8.1} ms", cold * 1000.0);
    println!(
        "devloop watch --once on a synced copy         {:>8.1} ms   (both sides scanned, manifests exchanged)",
        e * 1000.0
    );
    println!("rsync -a to a synced copy                     {:>8.1} ms", r * 1000.0);
    println!("ratio warm rescan / rsync                     {:>8.2}x   (target: < 200 ms)", w / r);
    println!("ratio devloop --once / rsync                  {:>8.2}x", e / r);
}

/// Starts `devloop --json watch` and waits for `watching`; returns the child and its event lines.
fn start_watch(
    bins: &Bins,
    tree: &Path,
    dst: &Path,
) -> (std::process::Child, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let mut cmd = bins.devloop(tree);
    cmd.args(["--json", "watch", "--target"]).arg(format!("local:{}", dst.display()));
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    wait_event(&mut lines, "watching");
    (child, lines)
}

fn wait_event(lines: &mut impl Iterator<Item = std::io::Result<String>>, kind: &str) -> serde_json::Value {
    for line in lines.by_ref() {
        let event: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if event["event"] == kind {
            return event;
        }
    }
    panic!("devloop ended before `{kind}`");
}

fn latency(bins: &Bins, tree: &Path, work: &Path) {
    println!("\n== edit -> applied, one 2 KB file, running devloop watch on the 10,000-file tree (50 edits) ==");
    let dst = work.join("latency");
    let (mut child, mut lines) = start_watch(bins, tree, &dst);
    let file = tree.join("d0000/edited.txt");
    let mut total = Vec::new();
    let mut sync = Vec::new();
    for i in 0..50 {
        let body = format!("{i:04}").repeat(512);
        let started = Instant::now();
        let mut f = fs::File::create(&file).unwrap();
        f.write_all(body.as_bytes()).unwrap();
        drop(f);
        let applied = wait_event(&mut lines, "applied");
        total.push(started.elapsed().as_secs_f64() * 1000.0);
        sync.push(applied["millis"].as_f64().unwrap());
        assert_eq!(fs::read(dst.join("d0000/edited.txt")).unwrap(), body.as_bytes());
        std::thread::sleep(Duration::from_millis(30));
    }
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "edit -> applied     median {:>6.2} ms   p90 {:>6.2} ms   p99 {:>6.2} ms   (includes the 5 ms quiet window)",
        median(total.clone()),
        percentile(total.clone(), 0.9),
        percentile(total, 0.99)
    );
    println!(
        "of which sync       median {:>6.2} ms   p90 {:>6.2} ms   (pack + send + agent apply + ack)",
        median(sync.clone()),
        percentile(sync, 0.9)
    );
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss(bins: &Bins, tree: &Path, work: &Path) {
    println!("\n== watcher memory, 100,000 files ==");
    let dst = work.join("rss");
    let (mut child, mut lines) = start_watch(bins, tree, &dst);
    for i in 0..10 {
        fs::write(tree.join(format!("d{:04}/rss.txt", i)), format!("edit {i}")).unwrap();
        wait_event(&mut lines, "applied");
    }
    std::thread::sleep(Duration::from_millis(500));
    let pid = child.id();
    let (now, peak) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "devloop watch RSS  steady {:>6.1} MB   peak {:>6.1} MB   (target: < 32 MB steady)",
        now as f64 / 1024.0,
        peak as f64 / 1024.0
    );
}
