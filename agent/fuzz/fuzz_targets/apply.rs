//! Arbitrary bytes as a batch's tar stream (with deletions and exec-bit changes taken from the
//! first bytes), applied to a root beside an `outside` folder: no panic, and nothing ever appears
//! outside the root. Memory stays within libFuzzer's RSS limit (tests/fuzz sets 384 MB).
#![no_main]

use std::sync::OnceLock;

use devloop_agent::apply::Applier;
use devloop_agent::protocol::Chmod;
use libfuzzer_sys::fuzz_target;

struct Playground {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    outside: std::path::PathBuf,
}

fn playground() -> &'static Playground {
    static PLAYGROUND: OnceLock<Playground> = OnceLock::new();
    PLAYGROUND.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        // What a hostile tree might already hold: a link out, a folder, a file.
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("f"), "f").unwrap();
        Playground { _dir: dir, root, outside }
    })
}

fuzz_target!(|data: &[u8]| {
    let p = playground();
    // The first line names paths to delete and to chmod; the rest is the tar stream.
    let (head, tar) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&[][..], data),
    };
    let names: Vec<String> = String::from_utf8_lossy(head).split(' ').map(str::to_owned).collect();
    let chmods: Vec<Chmod> = names.iter().map(|n| Chmod { path: n.clone(), exec: n.len() % 2 == 0 }).collect();
    let mut applier = Applier::new(&p.root, 1 << 20).unwrap();
    let _ = applier.apply(1, &names, &chmods, tar);
    let outside: Vec<_> = std::fs::read_dir(&p.outside).unwrap().collect();
    assert!(outside.is_empty(), "written outside the root: {outside:?}");
});
