//! The second attack run's findings, pinned: the sending side confined like the agent, and no
//! input that hangs, loops or lies. Real binaries end to end.

use std::ffi::CString;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{agent_bin, converge, devloop_bin, tree, Fixture, Node};

/// What the outside folder holds; no file of the target may ever contain it.
const SECRET: &str = "-----BEGIN OPENSSH PRIVATE KEY----- outside the source";

fn mkfifo(path: &Path) {
    let c = CString::new(path.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo {}", path.display());
}

/// Swaps two paths atomically (`renameat2` with `RENAME_EXCHANGE`).
fn exchange(a: &Path, b: &Path) {
    let (a, b) = (CString::new(a.to_str().unwrap()).unwrap(), CString::new(b.to_str().unwrap()).unwrap());
    let done = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(done, 0, "renameat2: {}", std::io::Error::last_os_error());
}

/// Files of `root` holding the secret.
fn leaked(root: &Path) -> Vec<String> {
    tree(root, &[])
        .into_iter()
        .filter(|(_, node)| matches!(node, Node::File { bytes, .. } if bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes())))
        .map(|(path, _)| path)
        .collect()
}

/// A source whose folders `d` and `d/sub` keep trading places with symlinks to a folder outside
/// it (holding `id_rsa`, also two levels down), while `swapping` is set.
fn swapping_source(fx: &Fixture, swapping: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let outside = fx.dir.path().join("outside");
    std::fs::create_dir_all(outside.join("sub/deeper")).unwrap();
    for rel in ["id_rsa", "sub/id_rsa", "sub/deeper/id_rsa", "a.txt", "sub/b.txt"] {
        std::fs::write(outside.join(rel), SECRET).unwrap();
    }
    fx.write("d/a.txt", "mine");
    fx.write("d/sub/b.txt", "mine too");
    fx.write("d/sub/deeper/c.txt", "and this");
    symlink(&outside, fx.src.join("swap")).unwrap();
    symlink(outside.join("sub"), fx.src.join("d/swap-sub")).unwrap();
    let src = fx.src.clone();
    std::thread::spawn(move || {
        let mut swaps = 0;
        while swapping.load(Ordering::Relaxed) {
            exchange(&src.join("d"), &src.join("swap"));
            exchange(&src.join("swap/sub"), &src.join("swap/swap-sub"));
            exchange(&src.join("swap/sub"), &src.join("swap/swap-sub"));
            exchange(&src.join("d"), &src.join("swap"));
            exchange(&src.join("d/sub"), &src.join("d/swap-sub"));
            exchange(&src.join("d/sub"), &src.join("d/swap-sub"));
            swaps += 6;
        }
        swaps
    })
}

/// The swapping source's config: the spare names (symlinks to outside while the folders are in
/// place) are not synced.
const SWAPPING: &str = "name: demo\nsync:\n  exclude: [/swap, /d/swap-sub]\n";
const SPARE: [&str; 2] = ["swap", "d/swap-sub"];

/// Before: 17 of 40 `--once` runs exited 0 with the outside file in the target.
#[test]
fn a_folder_swapped_for_a_symlink_to_outside_never_sends_outside_content() {
    let fx = Fixture::new(SWAPPING);
    let swapping = Arc::new(AtomicBool::new(true));
    let swapper = swapping_source(&fx, Arc::clone(&swapping));
    for run in 0..40 {
        let once = fx.once(&[]);
        assert!(matches!(once.code, Some(0 | 1)), "run {run}: {}", once.stderr);
        let leaks = leaked(&fx.dst);
        assert!(leaks.is_empty(), "run {run}: outside content reached the target: {leaks:?}");
        assert!(!fx.dst.join("d/id_rsa").exists() && !fx.dst.join("d/sub/id_rsa").exists(), "run {run}");
    }
    swapping.store(false, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 40, "the swapper raced ({swaps} swaps)");
    // Once the source holds still, the target equals it.
    let once = fx.once(&[]);
    assert_eq!(once.code, Some(0), "{}", once.stderr);
    converge(&fx.src, &fx.dst, &SPARE);
}

/// Before: a live target held the outside file until the swapping stopped.
#[test]
fn a_live_watch_never_sends_outside_content_and_converges_after_the_swapping() {
    let fx = Fixture::new(SWAPPING);
    let swapping = Arc::new(AtomicBool::new(true));
    let swapper = swapping_source(&fx, Arc::clone(&swapping));
    let watch = fx.watch();
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let leaks = leaked(&fx.dst);
        assert!(leaks.is_empty(), "outside content reached the target: {leaks:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    swapping.store(false, Ordering::Relaxed);
    swapper.join().unwrap();
    converge(&fx.src, &fx.dst, &SPARE);
    assert!(leaked(&fx.dst).is_empty());
    assert_eq!(watch.stop(), Some(0));
}

/// Before: a path swapped for a FIFO blocked a thread of the live watch for good; nothing synced
/// any more and SIGTERM did not end it.
#[test]
fn a_fifo_in_place_of_a_file_neither_hangs_the_watch_nor_its_shutdown() {
    let fx = Fixture::new("name: demo\n");
    fx.write("a.txt", "a");
    fx.write("b.txt", "b");
    let mut watch = fx.watch();
    // Swapped as fast as the machine goes for two seconds: a look that saw a file and an open
    // that finds the FIFO are bound to meet.
    let until = Instant::now() + Duration::from_secs(2);
    for i in 0.. {
        if Instant::now() > until {
            break;
        }
        let (file, fifo) = (fx.src.join("file.tmp"), fx.src.join("fifo.tmp"));
        std::fs::write(&file, format!("a{i}")).unwrap();
        std::fs::rename(&file, fx.src.join("a.txt")).unwrap();
        mkfifo(&fifo);
        std::fs::rename(&fifo, fx.src.join("a.txt")).unwrap();
    }
    fx.write("b.txt", "edited after the FIFO");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(fx.dst.join("b.txt")).ok().as_deref() != Some("edited after the FIFO") {
        assert!(Instant::now() < deadline, "the edit after the FIFO never synced: {:?}", watch.drain());
        std::thread::sleep(Duration::from_millis(10));
    }
    watch.drain();
    assert!(
        watch.seen.iter().any(|e| e["event"] == "problem" && e["path"] == "a.txt"),
        "the FIFO is named: {:?}",
        watch.seen
    );
    unsafe { libc::kill(watch.child.id() as i32, libc::SIGTERM) };
    assert_eq!(watch.wait_exit(Duration::from_secs(2)), Some(0));
}

/// Before: a FIFO named as devloop.yaml hung the CLI, which ignored SIGTERM.
#[test]
fn a_fifo_as_the_config_file_is_an_error_at_once() {
    let fx = Fixture::new("name: demo\n");
    let fifo = fx.dir.path().join("devloop.yaml");
    mkfifo(&fifo);
    let started = Instant::now();
    let out = Command::new(devloop_bin())
        .current_dir(&fx.src)
        .args(["-f", fifo.to_str().unwrap(), "watch", "--once", "--target", &fx.target()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(stderr.contains("it is a FIFO, not a regular file"), "{stderr}");
    assert!(!stderr.contains("permissions"), "{stderr}");
}

/// Before: unreadable paths, a file the agent refuses and symlinks it refuses were each named,
/// and `--once` still said 0 ("the target equals the source"). And the 4 GiB file streamed
/// whole before the agent refused it.
#[test]
fn once_exits_non_zero_naming_how_many_paths_differ() {
    let fx = Fixture::new("name: demo\n");
    fx.write("fine.txt", "fine");
    std::fs::write(fx.src.join("big.bin"), vec![7u8; 64 << 10]).unwrap();
    mkfifo(&fx.src.join("pipe"));
    symlink("/etc", fx.src.join("etc-link")).unwrap();
    let target = format!("cmd:{} serve --root {} --max-file-size 4096", agent_bin().display(), fx.dst.display());
    let once = fx.once_via(&target, &[]);
    assert_eq!(once.code, Some(1), "{}", once.stderr);
    let error = once.of("error")[0];
    assert!(error["message"].as_str().unwrap().contains("3 paths could not be synced"), "{error}");
    assert!(error["hint"].as_str().unwrap().contains("exclude them"), "{error}");
    let problems: Vec<String> = once.of("problem").iter().map(|e| e["path"].as_str().unwrap().to_owned()).collect();
    for path in ["big.bin", "pipe", "etc-link"] {
        assert!(problems.iter().any(|p| p == path), "{path} is named: {problems:?}");
    }
    let big = once.of("problem").into_iter().find(|e| e["path"] == "big.bin").unwrap();
    assert!(big["message"].as_str().unwrap().contains("larger than the 4096"), "{big}");
    // Refused before it travelled: nothing of its 64 KiB was sent.
    let sent: u64 = once.of("sync_started").iter().map(|e| e["bytes"].as_u64().unwrap()).sum();
    assert!(sent < 1024, "{sent} bytes were sent");
    assert_eq!(std::fs::read_to_string(fx.dst.join("fine.txt")).unwrap(), "fine");
    // Nothing changed: the same answer again, from the refusals the agent remembers nothing of.
    assert_eq!(fx.once_via(&target, &[]).code, Some(1));
}

/// Before: 17k refused paths of ~1 KB each made the agent's answer an 18.5 MB frame, and the CLI
/// stopped on the frame limit without naming any of them.
#[test]
fn many_refusals_are_counted_and_shown_in_part() {
    let fx = Fixture::new("name: demo\n");
    let deep = format!("{}/{}/{}", "a".repeat(250), "b".repeat(250), "c".repeat(250));
    std::fs::create_dir_all(fx.src.join(&deep)).unwrap();
    let count = 17_000;
    for i in 0..count {
        symlink("/", fx.src.join(&deep).join(format!("{}{i:06}", "l".repeat(200)))).unwrap();
    }
    fx.write("fine.txt", "fine");
    let once = fx.once(&[]);
    assert_eq!(once.code, Some(1), "{}", once.stderr);
    assert!(!once.stderr.contains("larger than the"), "{}", once.stderr);
    let error = once.of("error")[0];
    assert!(error["message"].as_str().unwrap().contains(&format!("{count} paths could not be synced")), "{error}");
    let refused: u64 = once.of("applied").iter().map(|e| e["refused"].as_u64().unwrap()).sum();
    assert_eq!(refused, count);
    let named = once.of("problem").len();
    assert!((1..200).contains(&named), "{named} problems shown");
    assert!(once.of("problem").iter().any(|e| e["message"].as_str().unwrap().contains("more paths")));
    assert_eq!(std::fs::read_to_string(fx.dst.join("fine.txt")).unwrap(), "fine");
}

/// Before: 10 MB of excludes took 13.9 s and 3.0 GB, and 100,000 levels of nesting 36.9 s.
#[test]
fn config_input_that_would_cost_minutes_is_refused_at_once() {
    let fx = Fixture::new("name: demo\n");
    let huge =
        format!("name: demo\nsync:\n  exclude:\n{}", "    - some/long/pattern/to/exclude/*.tmp\n".repeat(300_000));
    let nested = format!("name: demo\nx: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let many = format!("name: demo\nsync:\n  exclude: [{}]\n", vec!["a"; 20_000].join(", "));
    for (what, text, says) in [
        ("10 MB", huge, "at most 1048576 are read"),
        ("nested", nested, "levels deep"),
        ("20,000 patterns", many, "at most 10000 are taken"),
    ] {
        std::fs::write(fx.src.join("devloop.yaml"), &text).unwrap();
        let started = Instant::now();
        let out = Command::new(devloop_bin())
            .current_dir(&fx.src)
            .args(["watch", "--once", "--target", &fx.target()])
            .output()
            .unwrap();
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        assert!(stderr.contains(says), "{what}: {stderr}");
        assert!(stderr.len() < 2048, "{what}: an error of {} bytes", stderr.len());
        assert!(took < Duration::from_secs(5), "{what} took {took:?}");
    }
    // A folder in the file's place: no word of permissions.
    std::fs::remove_file(fx.src.join("devloop.yaml")).unwrap();
    std::fs::create_dir(fx.src.join("devloop.yaml")).unwrap();
    let out = Command::new(devloop_bin()).current_dir(&fx.src).args(["watch", "--once"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("a folder, not a regular file") && !stderr.contains("permissions"), "{stderr}");
}

/// Before: `local:B/x/../src/out` (and a symlinked parent) passed the guard, and the watch
/// synced the target into itself, 296 levels deep in 8 s.
#[test]
fn a_target_inside_the_source_is_refused_however_it_is_spelled() {
    let fx = Fixture::new("name: demo\n");
    let base = fx.dir.path().canonicalize().unwrap();
    symlink(&fx.src, base.join("src-link")).unwrap();
    for spelled in [base.join("x/../src/out"), base.join("src-link/out/new"), base.join("nope/../src-link/out")] {
        let target = format!("local:{}", spelled.display());
        let out = Command::new(devloop_bin())
            .current_dir(&fx.src)
            .args(["watch", "--once", "--target", &target])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(matches!(out.status.code(), Some(c) if c != 0), "{stderr}");
        assert!(stderr.contains("overlaps the folder being synced"), "{}: {stderr}", spelled.display());
        assert!(!fx.src.join("out").exists(), "nothing was made in the source");
    }
}
