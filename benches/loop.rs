//! devloop's benchmark: the core loop against its peers, measured in the same run.
//!
//! ```text
//! cargo build --release --workspace && cargo bench --bench loop [-- initial rescan latency rss restart agent] [--check]
//! cargo bench --bench loop -- million     # the 1,000,000-file case (tree generated once into ~/.cache/devloop-bench)
//! ```
//!
//! Comparisons alternate devloop and its peer, at least three runs each, and report medians; a
//! table at the end gives every figure with its peer, ratio and target. `--check` exits 1 when a
//! target is missed (run on demand, not as a timed test). Before each initial-sync run the page
//! cache is written back (`sync`), so that one run's writeback does not land on the next. The
//! file system of these machines (ext4 mounted with `discard`) slows down for minutes after mass
//! deletes: the bench deletes nothing until its end.
//!
//! Figures:
//! - initial sync of a 10,000-file / 100 MB tree into an empty folder vs `tar -c | tar -x`;
//! - no-op rescan of a 100,000-file tree (in-process, stat cache warm; and `devloop watch --once`
//!   end to end on a synced copy) vs `rsync -a` of the same tree to a synced copy;
//! - edit → applied latency of one small file in a running `devloop watch` (100 edits; median
//!   and p99);
//! - peak and steady RSS of `devloop watch` on the 100,000-file tree, and the CPU it and its agent
//!   take over 5 s with nothing changing;
//! - edit → new process accepting connections, a `dotnet run`-shaped stand-in app (a parent whose
//!   child holds the port), devloop (local target, 100 edits: median, p99, and the agent's own
//!   stop + start) vs `watchexec --restart` (30 edits; the bench installs watchexec-cli from
//!   crates.io into ~/.cache/devloop-bench-tools if missing);
//! - the static agent's size and idle RSS;
//! - `million` (on demand): 1,000,000 files in 1,000 folders: start to `watching` with the stat
//!   cache cold and warm (target synced), edit -> applied, watcher RSS;
//! - `cluster` (needs the cluster tier with its real node: `tests/cluster/up`, then
//!   DEVLOOP_TEST_KUBECONFIG and DEVLOOP_CLUSTER_STATE set as `tests/run` sets them): the
//!   in-cluster build cold, `up` with nothing changed, a Dockerfile edit to the new pod serving,
//!   and edit -> applied through the real exec vs one `kubectl exec` per batch (Skaffold's way).
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
    let check = std::env::args().any(|a| a == "--check");
    let wanted: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let run = |name: &str| (wanted.is_empty() && name != "million") || wanted.iter().any(|w| w == name);
    let mut figures = Figures::default();
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
            initial_sync(&bins, &tree, work.path(), &mut figures);
        }
        if run("latency") {
            latency(&bins, &tree, work.path(), &mut figures);
        }
    }
    if run("restart") {
        restart(&bins, work.path(), &mut figures);
    }
    if run("agent") {
        agent(&bins, work.path(), &mut figures);
    }
    if run("cluster") {
        cluster(&bins, work.path());
    }
    if run("rescan") || run("rss") {
        let tree = work.path().join("t100k");
        let t = Instant::now();
        generate(&tree, 100_000, 1_000, 1_000);
        println!("\ngenerated 100,000 files / 100 MB in {:.1} s", t.elapsed().as_secs_f64());
        // Past the racy window, so that the stat cache trusts every file's stat.
        std::thread::sleep(walk::RACY_WINDOW * 3);
        if run("rescan") {
            rescan(&bins, &tree, work.path(), &mut figures);
        }
        if run("rss") {
            rss(&bins, &tree, work.path(), &mut figures);
        }
    }
    if run("million") {
        million(&bins, work.path(), &mut figures);
    }
    let missed = figures.print();
    if check && missed > 0 {
        eprintln!("{missed} target(s) missed");
        std::process::exit(1);
    }
}

/// What a figure is held to.
#[derive(Clone, Copy)]
enum Target {
    /// At most this many times the peer's figure.
    Ratio(f64),
    /// At most this value, in the figure's unit.
    Below(f64),
    /// Reported, no target.
    None,
}

struct Figure {
    name: &'static str,
    unit: &'static str,
    ours: f64,
    peer: Option<(&'static str, f64)>,
    target: Target,
}

impl Figure {
    fn met(&self) -> bool {
        match (self.target, self.peer) {
            (Target::Ratio(max), Some((_, peer))) => self.ours <= max * peer,
            (Target::Ratio(_), None) => false,
            (Target::Below(max), _) => self.ours < max,
            (Target::None, _) => true,
        }
    }
}

#[derive(Default)]
struct Figures(Vec<Figure>);

impl Figures {
    fn add(
        &mut self,
        name: &'static str,
        unit: &'static str,
        ours: f64,
        peer: Option<(&'static str, f64)>,
        target: Target,
    ) {
        self.0.push(Figure { name, unit, ours, peer, target });
    }

    /// Prints the table (markdown, as the README carries it); returns how many targets were missed.
    fn print(&self) -> usize {
        println!("\n== summary ==\n");
        println!("| figure | devloop | peer (same run) | ratio | target | met |");
        println!("|---|---|---|---|---|---|");
        for f in &self.0 {
            let peer = f.peer.map_or("—".to_string(), |(name, v)| format!("{name} {v:.2} {}", f.unit));
            let ratio = f.peer.map_or("—".to_string(), |(_, v)| format!("{:.2}x", f.ours / v));
            let target = match f.target {
                Target::Ratio(max) => format!("≤ {max}x"),
                Target::Below(max) => format!("< {max} {}", f.unit),
                Target::None => "—".to_string(),
            };
            let met = if f.met() { "yes" } else { "**no**" };
            println!("| {} | {:.2} {} | {peer} | {ratio} | {target} | {met} |", f.name, f.ours, f.unit);
        }
        self.0.iter().filter(|f| !f.met()).count()
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

    /// The agent a pod runs: the static one when it is built (its allocator is musl's, whose
    /// memory figures are the pod's), else the one beside devloop.
    fn pod_agent(&self) -> PathBuf {
        let path = self.static_agent();
        if path.is_file() {
            path
        } else {
            println!("(the static agent is not built: the pod figures use {})", self.agent.display());
            self.agent.clone()
        }
    }

    fn static_agent(&self) -> PathBuf {
        self.devloop.parent().unwrap().parent().unwrap().join("x86_64-unknown-linux-musl/agent/devloop-agent")
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

/// Writes dirty pages back, so that a run does not pay for the previous one's writeback.
fn settle_disk() {
    unsafe { libc::sync() };
}

fn initial_sync(bins: &Bins, tree: &Path, work: &Path, figures: &mut Figures) {
    println!("\n== initial sync, 10,000 files / 100 MB, empty target (5 runs each, alternating, medians) ==");
    let mut ours = Vec::new();
    let mut rss = Vec::new();
    let mut tar = Vec::new();
    for i in 0..5 {
        let dst = work.join(format!("init-devloop-{i}"));
        let mut cmd = bins.devloop(tree);
        cmd.args(["--json", "watch", "--once", "--target"]).arg(format!("local:{}", dst.display()));
        settle_disk();
        let (secs, kib) = measure(cmd);
        ours.push(secs);
        rss.push(kib as f64);
        let dst = work.join(format!("init-tar-{i}"));
        fs::create_dir_all(&dst).unwrap();
        let line = format!("tar -C '{}' -cf - . | tar -C '{}' -xf -", tree.display(), dst.display());
        settle_disk();
        tar.push(measure(sh(&line)).0);
        println!("  run {i}: devloop {:.3} s   tar {:.3} s", ours[i], tar[i]);
    }
    let (o, t) = (median(ours), median(tar));
    println!("devloop watch --once   {:>8.3} s   peak RSS {:.1} MB", o, median(rss.clone()) / 1024.0);
    println!("tar -c | tar -x        {:>8.3} s", t);
    println!("ratio devloop / tar    {:>8.2}x   (target: <= 0.8, RSS < 64 MB)", o / t);
    figures.add("initial sync 10k files / 100 MB", "s", o, Some(("tar -c, tar -x", t)), Target::Ratio(0.8));
    figures.add("initial sync peak RSS", "MB", median(rss) / 1024.0, None, Target::Below(64.0));
}

fn rescan(bins: &Bins, tree: &Path, work: &Path, figures: &mut Figures) {
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
    // As in a pod: one `devloop-agent run` lives on, each session is a `serve` beside it and is
    // answered from the agent's live index.
    let pod = Pod::start(&bins.pod_agent(), &work.join("rescan-pod"));
    let once = |target: &str| {
        let mut cmd = bins.devloop(tree);
        cmd.args(["--json", "watch", "--once", "--target", target]);
        measure(cmd).0
    };
    // The per-session agent of a local target walks its tree for every session.
    let local = format!("local:{}", work.join("rescan-devloop").display());
    once(&pod.target);
    once(&local);
    let (mut e2e, mut walked, mut rsync) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        e2e.push(once(&pod.target));
        rsync.push(measure(sh(&line)).0);
        walked.push(once(&local));
    }
    let (w, r, e, l) = (median(warm), median(rsync), median(e2e), median(walked));
    // Reconnect: `devloop watch` started again on the synced tree, to `watching`.
    let mut reconnect = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let (mut child, _lines) = start_watch_via(bins, tree, &pod.target);
        reconnect.push(started.elapsed().as_secs_f64());
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
    }
    let reconnect = median(reconnect);
    let agent_rss = status_kib(pod.child.id(), "VmRSS:") as f64 / 1024.0;
    drop(pod);
    println!("scan, stat cache warm (the watcher's rescan)   {:>8.1} ms", w * 1000.0);
    println!("scan, cold (first scan, hashes 100 MB)        {:>8.1} ms", cold * 1000.0);
    println!(
        "devloop watch --once on a synced copy         {:>8.1} ms   (the agent's live index answers; the CLI scans)",
        e * 1000.0
    );
    println!("  same, agent started per session (local:)    {:>8.1} ms   (both sides scanned)", l * 1000.0);
    println!(
        "rsync -a to a synced copy                     {:>8.1} ms   (5 runs each, alternating, medians)",
        r * 1000.0
    );
    println!("ratio devloop --once / rsync                  {:>8.2}x   (target: <= 0.3)", e / r);
    println!("reconnect: devloop watch to `watching`        {:>8.1} ms   (target: < 150 ms)", reconnect * 1000.0);
    println!("agent RSS holding the 100k-file tree          {agent_rss:>8.1} MB   (target: < 12 MB)");
    figures.add("rescan 100k files, stat cache warm", "ms", w * 1000.0, None, Target::Below(200.0));
    figures.add(
        "no-op `watch --once`, synced 100k tree",
        "ms",
        e * 1000.0,
        Some(("rsync -a", r * 1000.0)),
        Target::Ratio(0.3),
    );
    figures.add(
        "no-op `watch --once`, agent started per session",
        "ms",
        l * 1000.0,
        Some(("rsync -a", r * 1000.0)),
        Target::None,
    );
    figures.add("reconnect, 100k synced, caches warm → watching", "ms", reconnect * 1000.0, None, Target::Below(150.0));
    figures.add("agent RSS holding a 100k-file tree", "MB", agent_rss, None, Target::Below(12.0));
}

/// `devloop-agent run` as a pod's main process (supervising `sleep`), with the target that
/// reaches it as `kubectl exec` would: a `serve` beside it.
struct Pod {
    child: std::process::Child,
    target: String,
}

impl Pod {
    fn start(agent: &Path, root: &Path) -> Pod {
        fs::create_dir_all(root).unwrap();
        let child = Command::new(agent)
            .args(["run", "--root"])
            .arg(root)
            .args(["--", "sleep", "100000"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let socket = root.join(".devloop/agent.sock");
        let started = Instant::now();
        while !socket.exists() {
            assert!(started.elapsed() < Duration::from_secs(10), "the agent never opened its control socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Pod { child, target: format!("cmd:{} serve --root {}", agent.display(), root.display()) }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Starts `devloop --json watch` and waits for `watching`; returns the child and its event lines.
fn start_watch(
    bins: &Bins,
    tree: &Path,
    dst: &Path,
) -> (std::process::Child, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    start_watch_via(bins, tree, &format!("local:{}", dst.display()))
}

fn start_watch_via(
    bins: &Bins,
    tree: &Path,
    target: &str,
) -> (std::process::Child, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let mut cmd = bins.devloop(tree);
    cmd.args(["--json", "watch", "--target", target]);
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

fn latency(bins: &Bins, tree: &Path, work: &Path, figures: &mut Figures) {
    println!("\n== edit -> applied, one 2 KB file, running devloop watch on the 10,000-file tree (100 edits) ==");
    let dst = work.join("latency");
    let (mut child, mut lines) = start_watch(bins, tree, &dst);
    let file = tree.join("d0000/edited.txt");
    let mut total = Vec::new();
    let mut sync = Vec::new();
    for i in 0..100 {
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
    figures.add("edit -> applied, 10k-file watch", "ms", median(total.clone()), None, Target::Below(5.0));
    figures.add(
        "edit -> applied, 10k-file watch, p99",
        "ms",
        percentile(total.clone(), 0.99),
        None,
        Target::Below(15.0),
    );
    println!(
        "edit -> applied     median {:>6.2} ms   p90 {:>6.2} ms   p99 {:>6.2} ms   (includes the quiet window: 1 ms once the file is closed)",
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

fn rss(bins: &Bins, tree: &Path, work: &Path, figures: &mut Figures) {
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
    let (anon, file) = (status_kib(pid, "RssAnon:"), status_kib(pid, "RssFile:"));
    // Idle: nothing changes for 5 s; the CPU the watcher and its agent take meanwhile.
    let watched = [vec![pid], children_of(pid)].concat();
    let before: u64 = watched.iter().map(|&p| cpu_ticks(p)).sum();
    // The scan of 100,000 files took CPU: a reading of none means /proc was not read.
    assert!(before > 0, "no CPU time read for the watcher from /proc/{pid}/stat");
    std::thread::sleep(Duration::from_secs(5));
    let after: u64 = watched.iter().map(|&p| cpu_ticks(p)).sum();
    let idle = (after - before) as f64 / ticks_per_second() / 5.0 * 100.0;
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "devloop watch RSS  steady {:>6.1} MB   peak {:>6.1} MB   (targets: < 24 MB steady, < 40 MB peak)",
        now as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    println!(
        "  steady: {:.1} MB anonymous (heap, stacks), {:.1} MB of mapped files (the binary's pages)",
        anon as f64 / 1024.0,
        file as f64 / 1024.0
    );
    println!(
        "idle CPU, nothing changing for 5 s: {idle:.2} % of a core (the watcher and its agent, {} processes)",
        watched.len()
    );
    figures.add("watcher RSS, 100k files, steady", "MB", now as f64 / 1024.0, None, Target::Below(24.0));
    figures.add("watcher RSS, 100k files, peak", "MB", peak as f64 / 1024.0, None, Target::Below(40.0));
    figures.add("idle CPU, 100k files, nothing changing", "% core", idle, None, Target::Below(1.0));
}

/// The processes `pid`'s threads started (the watcher's agent, for a local target).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    let mut children = Vec::new();
    for task in tasks.flatten() {
        let listed = fs::read_to_string(task.path().join("children")).unwrap_or_default();
        children.extend(listed.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    children
}

/// User and system CPU of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command's closing parenthesis; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    rest.split_whitespace().skip(11).take(2).filter_map(|t| t.parse::<u64>().ok()).sum()
}

fn ticks_per_second() -> f64 {
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// The stand-in app (crate tests/standin).
fn standin(bins: &Bins) -> PathBuf {
    let path = bins.devloop.with_file_name("standin");
    if !path.is_file() {
        eprintln!("{} is missing\nhint: cargo build --release --workspace", path.display());
        std::process::exit(2);
    }
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GET / on the port; the body when a server answers.
fn get(port: u16) -> Option<String> {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

/// Writes `body` into `file` and polls the port until the new content is served.
fn edit_until_served(file: &Path, body: &str, port: u16) -> f64 {
    let started = Instant::now();
    fs::write(file, body).unwrap();
    loop {
        if get(port).as_deref() == Some(body) {
            return started.elapsed().as_secs_f64() * 1000.0;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the new content was never served");
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn watchexec() -> Option<PathBuf> {
    if let Ok(path) = which("watchexec") {
        return Some(path);
    }
    let root = PathBuf::from(std::env::var_os("HOME")?).join(".cache/devloop-bench-tools");
    let bin = root.join("bin/watchexec");
    if !bin.is_file() {
        println!("installing watchexec-cli from crates.io into {} (once)", root.display());
        let status =
            Command::new("cargo").args(["install", "--locked", "watchexec-cli", "--root"]).arg(&root).status().ok()?;
        if !status.success() {
            return None;
        }
    }
    Some(bin)
}

fn which(name: &str) -> Result<PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file()).ok_or(())
}

fn restart(bins: &Bins, work: &Path, figures: &mut Figures) {
    println!("\n== edit -> new process serving, dotnet-run-shaped stand-in app (devloop 100 edits, watchexec 30) ==");
    let standin = standin(bins);

    // devloop: local target, the agent supervises the app.
    let src = work.join("restart-src");
    fs::create_dir_all(&src).unwrap();
    let port = free_port();
    fs::write(
        src.join("devloop.yaml"),
        format!(
            "name: bench\nrun: [{}, --port, '{port}', --file, message.txt]\nready: {{tcp: {port}}}\n",
            standin.display()
        ),
    )
    .unwrap();
    fs::write(src.join("message.txt"), "start").unwrap();
    let dst = work.join("restart-dst");
    let (mut child, mut lines) = start_watch(bins, &src, &dst);
    while get(port).as_deref() != Some("start") {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut ours = Vec::new();
    let mut restart_ms = Vec::new();
    for i in 0..100 {
        ours.push(edit_until_served(&src.join("message.txt"), &format!("devloop {i}"), port));
        let restarted = wait_event(&mut lines, "restarted");
        restart_ms.push(restarted["stop_ms"].as_f64().unwrap() + restarted["start_ms"].as_f64().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(200));

    // watchexec --restart on the same app, watching the same kind of folder.
    let peer = watchexec().map(|watchexec| {
        let src = work.join("restart-watchexec");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("message.txt"), "start").unwrap();
        let port = free_port();
        let mut child = Command::new(watchexec)
            .current_dir(&src)
            .args(["--restart", "--watch", "."])
            .arg("--")
            .arg(&standin)
            .args(["--port", &port.to_string(), "--file", "message.txt"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while get(port).as_deref() != Some("start") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut times = Vec::new();
        for i in 0..30 {
            times.push(edit_until_served(&src.join("message.txt"), &format!("watchexec {i}"), port));
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        times
    });
    let (m, p90, p99) = (median(ours.clone()), percentile(ours.clone(), 0.9), percentile(ours, 0.99));
    println!("devloop (local target)   median {m:>6.2} ms   p90 {p90:>6.2} ms   p99 {p99:>6.2} ms   (targets: < 8 ms median, < 25 ms p99)");
    let overhead = median(restart_ms);
    println!("  of which stop + start  median {overhead:>6.2} ms   (the agent's restart overhead; target: < 5 ms)");
    match peer {
        Some(times) => {
            let (wm, wp90) = (median(times.clone()), percentile(times, 0.9));
            println!("watchexec --restart      median {wm:>6.2} ms   p90 {wp90:>6.2} ms");
            println!("ratio devloop / watchexec  {:>6.2}x (median)", m / wm);
            figures.add("edit -> new process serving", "ms", m, Some(("watchexec", wm)), Target::Below(8.0));
        }
        None => {
            println!("watchexec: not available (cargo install watchexec-cli failed)");
            figures.add("edit -> new process serving", "ms", m, None, Target::Below(8.0));
        }
    }
    figures.add("edit -> new process serving, p99", "ms", p99, None, Target::Below(25.0));
    figures.add(
        "restart overhead (stop + start, beyond the app's own start)",
        "ms",
        overhead,
        None,
        Target::Below(5.0),
    );
}

fn agent(bins: &Bins, work: &Path, figures: &mut Figures) {
    println!("\n== the agent ==");
    let static_agent = bins.static_agent();
    let agent = if static_agent.is_file() {
        let size = fs::metadata(&static_agent).unwrap().len();
        println!("static agent binary {:>6.2} MB   (target: < 3 MB)  {}", size as f64 / 1e6, static_agent.display());
        figures.add("static agent binary", "MB", size as f64 / 1e6, None, Target::Below(3.0));
        static_agent
    } else {
        println!(
            "static agent not built (cargo build -p devloop-agent --profile agent --target x86_64-unknown-linux-musl)"
        );
        bins.agent.clone()
    };
    let root = work.join("agent-idle");
    fs::create_dir_all(&root).unwrap();
    let mut child = Command::new(&agent)
        .args(["run", "--root"])
        .arg(&root)
        .args(["--", "sleep", "1000"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let rss = status_kib(child.id(), "VmRSS:");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    println!("agent idle RSS (run, supervising sleep)  {:>6.2} MB   (target: < 10 MB)", rss as f64 / 1024.0);
    figures.add("agent idle RSS", "MB", rss as f64 / 1024.0, None, Target::Below(10.0));
}

/// The in-cluster build and the loop through a real pod's exec, on the cluster tier's real node:
/// once with the no-registry build (`registry: none`), once pushing to the registry the tier
/// publishes (KEP-1755) and pulling by digest.
fn cluster(bins: &Bins, work: &Path) {
    println!("\n== on a real node: in-cluster build, rebuild, edit -> applied through the real exec ==");
    let (Some(kubeconfig), Some(state)) =
        (std::env::var_os("DEVLOOP_TEST_KUBECONFIG"), std::env::var_os("DEVLOOP_CLUSTER_STATE"))
    else {
        println!("SKIPPED: start the cluster tier first (DEVLOOP_CLUSTER_STATE=/tmp/dc tests/cluster/up), then set");
        println!("         DEVLOOP_TEST_KUBECONFIG=/tmp/dc/admin.kubeconfig DEVLOOP_CLUSTER_STATE=/tmp/dc");
        return;
    };
    let (kubeconfig, state) = (PathBuf::from(kubeconfig), PathBuf::from(state));
    let none = cluster_mode(bins, work, &kubeconfig, &state, "none");
    println!("\n-- the same, pushed to the tier's registry (KEP-1755) and pulled by digest --");
    let pushed = cluster_mode(bins, work, &kubeconfig, &state, "auto");
    println!("\n| figure | no registry | registry (push + pull by digest) | ratio |");
    println!("|---|---|---|---|");
    for (what, a, b) in [
        ("up --once cold: builder, context, build, deploy", none.0, pushed.0),
        ("up --once, inputs unchanged (nothing built or pushed)", none.1, pushed.1),
        ("Dockerfile edit -> the new pod serving it", none.2, pushed.2),
    ] {
        println!("| {what} | {a:.2} s | {b:.2} s | {:.2}x |", b / a);
    }
}

/// One service through `up` on the real node with `registry: MODE`: (cold `up --once`, median
/// unchanged `up --once`, median Dockerfile edit → the new pod serving it), in seconds. The
/// no-registry run also times edit → applied through the real exec against `kubectl exec`.
fn cluster_mode(bins: &Bins, work: &Path, kubeconfig: &Path, state: &Path, registry: &str) -> (f64, f64, f64) {
    let kubectl = |args: &[&str]| {
        let out =
            Command::new("kubectl").arg("--kubeconfig").arg(kubeconfig).args(args).output().expect("kubectl on PATH");
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let ns = format!("devloop-bench-{}-{registry}", std::process::id());
    kubectl(&["create", "namespace", &ns]);
    let src = work.join(registry).join("svc");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("requirements.txt"), "").unwrap();
    let prep = bins.devloop(&src).args(["prep", "--port", "8080"]).output().unwrap();
    assert!(prep.status.success(), "{}", String::from_utf8_lossy(&prep.stderr));
    let run_id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dockerfile = format!(
        "# bench {run_id}\nFROM devloop.local/devbase:1\nCOPY devloop-agent /bin/devloop-agent\nCOPY . /app\nWORKDIR /app\n\
         ENTRYPOINT [\"devloop-agent\", \"run\", \"--root\", \"/app\", \"--ready\", \"tcp:8080\", \"--\"]\n\
         CMD [\"standin\", \"--port\", \"8080\", \"--file\", \"message.txt\", \"--bind\", \"0.0.0.0\"]\n"
    );
    fs::write(src.join("Dockerfile.develop"), &dockerfile).unwrap();
    fs::write(src.join("message.txt"), "bench").unwrap();
    let config = format!(
        "name: svc\nchart: charts/svc\nport: 8080\nregistry: {registry}\nbuilder: {{node: devloop-node, root: {}}}\n",
        state.join("buildkit").display()
    );
    fs::write(src.join("devloop.yaml"), config).unwrap();
    // Unpinned (registry mode), the pod must still land on the real node (the tier's other
    // node is kwok's).
    fs::write(
        src.join("values.dev.yaml"),
        "nodeSelector: {devloop.dev/real-node: \"true\"}\ntolerations: [{key: devloop.dev/real-node, operator: Exists, effect: NoSchedule}]\n",
    )
    .unwrap();
    let global = |cmd: &mut Command| {
        cmd.arg("--kubeconfig").arg(kubeconfig).args(["-n", &ns, "--json"]);
    };
    let up_once = || {
        let mut cmd = bins.devloop(&src);
        global(&mut cmd);
        let started = Instant::now();
        let out = cmd.args(["up", "--once"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        started.elapsed().as_secs_f64()
    };
    let cold = up_once();
    println!("up --once, cold (builder pod created, context sent, image built, deployed) {cold:>6.2} s");
    let warm: Vec<f64> = (0..3).map(|_| up_once()).collect();
    let warm = median(warm);
    println!("up --once, nothing changed (no build: straight to deploy)           median {warm:>6.2} s");

    let mut cmd = bins.devloop(&src);
    global(&mut cmd);
    let mut child = cmd.arg("up").stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let tunnel = wait_event(&mut lines, "tunnel");
    let port: u16 =
        tunnel["url"].as_str().unwrap().trim_start_matches("http://localhost:").trim_end_matches('/').parse().unwrap();
    wait_event(&mut lines, "watching");
    // The timer stops when the tunnel serves what only the *new* pod can hold: message.txt is
    // saved with the Dockerfile, and a round with a rebuild trigger syncs nothing to the old pod.
    let mut rebuilds = Vec::new();
    for i in 0..3 {
        let started = Instant::now();
        let want = format!("rebuild {i}");
        fs::write(src.join("message.txt"), &want).unwrap();
        fs::write(src.join("Dockerfile.develop"), format!("{dockerfile}# edit {i}\n")).unwrap();
        while get(port).as_deref() != Some(want.as_str()) {
            assert!(started.elapsed() < Duration::from_secs(120), "the new pod never served {want}");
            std::thread::sleep(Duration::from_millis(20));
        }
        rebuilds.push(started.elapsed().as_secs_f64());
        wait_event(&mut lines, "watching");
    }
    println!(
        "Dockerfile edit -> the new pod serving the edit (target < 5 s)       median {:>6.2} s",
        median(rebuilds.clone())
    );
    let mut applied = Vec::new();
    for i in 0..30 {
        let started = Instant::now();
        fs::write(src.join("message.txt"), format!("edit {i}")).unwrap();
        wait_event(&mut lines, "applied");
        applied.push(started.elapsed().as_secs_f64() * 1000.0);
        wait_event(&mut lines, "restarted");
    }
    let _ = child.kill();
    let _ = child.wait();
    // The newest pod (the one the session used; older ones may still be terminating).
    let pods = kubectl(&[
        "-n",
        &ns,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=svc",
        "--sort-by=.metadata.creationTimestamp",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}{\"\\n\"}{end}",
    ]);
    let pod = pods.lines().last().expect("a pod").to_string();
    let rebuild = median(rebuilds);
    if registry != "none" {
        kubectl(&["delete", "namespace", &ns, "--wait=false"]);
        return (cold, warm, rebuild);
    }
    let mut peer = Vec::new();
    for i in 0..10 {
        let started = Instant::now();
        let mut exec = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["-n", &ns, "exec", "-i", &pod, "--", "sh", "-c", "cat > /app/message.txt; echo stored"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        exec.stdin.take().unwrap().write_all(format!("peer {i}").as_bytes()).unwrap();
        assert!(exec.wait().unwrap().success());
        peer.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let (ours, theirs) = (median(applied.clone()), median(peer.clone()));
    println!(
        "edit -> applied, real exec    devloop median {ours:>6.1} ms  p90 {:>6.1} ms   kubectl exec per batch median {theirs:>6.1} ms  p90 {:>6.1} ms   ratio {:.2}x",
        percentile(applied, 0.9),
        percentile(peer, 0.9),
        ours / theirs
    );
    kubectl(&["delete", "namespace", &ns, "--wait=false"]);
    (cold, warm, rebuild)
}

/// `files` files of 16 bytes in `dirs` folders, plus a devloop.yaml.
fn generate_small(root: &Path, files: usize, dirs: usize) {
    fs::create_dir_all(root).unwrap();
    fs::write(root.join("devloop.yaml"), "name: bench\n").unwrap();
    for d in 0..dirs {
        fs::create_dir_all(root.join(format!("d{d:04}"))).unwrap();
    }
    for i in 0..files {
        fs::write(root.join(format!("d{:04}/f{i:07}.txt", i % dirs)), format!("file {i:011}\n")).unwrap();
    }
}

/// The 1,000,000-file case: 1,000 folders of 1,000 files of 16 bytes, and a synced copy, both
/// generated once into `$DEVLOOP_BENCH_CACHE` (default ~/.cache/devloop-bench; about 8 GB of
/// blocks on ext4) and kept. Cold: neither end has a stat cache (every file hashed on both ends).
fn million(bins: &Bins, work: &Path, figures: &mut Figures) {
    println!("\n== 1,000,000 files (tree and synced copy cached between runs) ==");
    let base = std::env::var_os("DEVLOOP_BENCH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/devloop-bench"));
    let (tree, dst) = (base.join("m1"), base.join("m1-target"));
    let xdg = work.join("xdg-m1");
    let watch_cmd = |once: bool, target: &str| {
        let mut cmd = bins.devloop(&tree);
        cmd.env("XDG_CACHE_HOME", &xdg).arg("--json").arg("watch");
        if once {
            cmd.arg("--once");
        }
        cmd.arg("--target").arg(target);
        cmd
    };
    if !base.join("m1.done").exists() {
        let t = Instant::now();
        generate_small(&tree, 1_000_000, 1_000);
        fs::write(base.join("m1.done"), "").unwrap();
        println!("generated 1,000,000 files in {:.1} s (once)", t.elapsed().as_secs_f64());
    }
    if !base.join("m1-target.done").exists() {
        let (secs, kib) = measure(watch_cmd(true, &format!("local:{}", dst.display())));
        fs::write(base.join("m1-target.done"), "").unwrap();
        println!("initial sync of 1,000,000 files {secs:.1} s, peak RSS {:.0} MB (once)", kib as f64 / 1024.0);
    }
    // Cold: a new agent (as in a new pod) and no stat cache on either end. Warm: the same agent,
    // its live index holding the tree, and the CLI's stat cache saved by the previous run.
    let _ = fs::remove_dir_all(&xdg);
    let _ = fs::remove_file(dst.join(".devloop/manifest.cache"));
    let pod = Pod::start(&bins.pod_agent(), &dst);
    let start = || {
        let started = Instant::now();
        let mut child = watch_cmd(false, &pod.target).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        wait_event(&mut lines, "watching");
        (started.elapsed().as_secs_f64(), child, lines)
    };
    // Stopped as a user stops it (SIGTERM), so that it saves its stat cache for the next start.
    let stop = |child: &mut std::process::Child| {
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
    };
    let (cold, mut child, _) = start();
    stop(&mut child);
    println!("start to watching, no stat cache on either end   {cold:>7.2} s");
    let mut warm = Vec::new();
    for _ in 0..3 {
        let (secs, mut child, _) = start();
        warm.push(secs);
        stop(&mut child);
    }
    let warm = median(warm);
    println!("start to watching, stat caches warm (median of 3)  {warm:>7.2} s   (target: < 2 s)");
    let (_, mut child, mut lines) = start();
    let file = tree.join("d0000/edited.txt");
    let mut applied = Vec::new();
    for i in 0..20 {
        let started = Instant::now();
        fs::write(&file, format!("edit {i:04}")).unwrap();
        wait_event(&mut lines, "applied");
        applied.push(started.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(30));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (now, peak) = (status_kib(child.id(), "VmRSS:"), status_kib(child.id(), "VmHWM:"));
    let agent_rss = status_kib(pod.child.id(), "VmRSS:") as f64 / 1024.0;
    let _ = child.kill();
    let _ = child.wait();
    drop(pod);
    let _ = fs::remove_file(&file);
    let edit = median(applied);
    println!("edit -> applied (median of 20)                    {edit:>7.2} ms  (target: < 10 ms)");
    println!(
        "watcher RSS steady {:.0} MB, peak {:.0} MB             (target: < 120 MB)",
        now as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    println!("agent RSS holding the 1,000,000-file tree {agent_rss:.0} MB");
    figures.add("1M files: start to watching, cold", "s", cold, None, Target::Below(15.0));
    figures.add("1M files: start to watching, warm", "s", warm, None, Target::Below(2.0));
    figures.add("1M files: edit -> applied", "ms", edit, None, Target::Below(10.0));
    figures.add("1M files: watcher RSS, steady", "MB", now as f64 / 1024.0, None, Target::Below(120.0));
    figures.add("1M files: agent RSS holding the tree", "MB", agent_rss, None, Target::None);
}
