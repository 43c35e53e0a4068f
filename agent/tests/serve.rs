//! The real agent's session over an in-memory duplex, driven by a hand-written client: the batches
//! here are crafted byte by byte, hostile ones included.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use devloop_agent::manifest::{Digest, Entry, Record};
use devloop_agent::protocol::{self, Applied, Chmod, FrameReader, FrameWriter, FromAgent, ToAgent};
use devloop_agent::serve::{serve, ServeOptions};
use tokio::io::{DuplexStream, ReadHalf, WriteHalf};

mod common;
use common::Tar;

struct Client {
    frames: FrameReader<ReadHalf<DuplexStream>>,
    out: FrameWriter<WriteHalf<DuplexStream>>,
    agent: tokio::task::JoinHandle<Result<(), devloop_agent::serve::ServeError>>,
}

async fn connect(root: &Path, max_file_size: u64) -> (Client, Vec<Record>) {
    let mut client = open(root, max_file_size, false).await;
    let records = client.manifest_records().await;
    (client, records)
}

/// Connects and says hello (`ask`: the manifest's digest first).
async fn open(root: &Path, max_file_size: u64, ask: bool) -> Client {
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    let (agent_read, agent_write) = tokio::io::split(theirs);
    let link = devloop_agent::control::Link::Socket(devloop_agent::control::socket_path(root));
    let options = ServeOptions { root: root.to_path_buf(), max_file_size, link };
    let agent = tokio::spawn(serve(agent_read, agent_write, options));
    let (mut read, mut write) = tokio::io::split(ours);
    protocol::handshake(&mut read, &mut write).await.unwrap();
    let mut client = Client { frames: FrameReader::new(read), out: FrameWriter::new(write), agent };
    client
        .out
        .message(&ToAgent::Hello {
            client: "test".into(),
            session: String::new(),
            excludes: vec!["ignored/".into()],
            docker_context: None,
            ask,
        })
        .await
        .unwrap();
    client.out.flush().await.unwrap();
    client
}

impl Client {
    /// The manifest's records up to its end (after the welcome, or after a `Manifest` answer).
    async fn manifest_records(&mut self) -> Vec<Record> {
        let mut records = Vec::new();
        loop {
            match self.frames.message::<FromAgent>().await.unwrap() {
                FromAgent::Welcome { .. } => {}
                FromAgent::Manifest { records: chunk } => records.extend(chunk),
                FromAgent::ManifestEnd { entries, .. } => return records.into_iter().take(entries as usize).collect(),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// After an asking hello: the welcome, then the digest and size of the agent's manifest.
    async fn manifest_digest(&mut self) -> (Digest, u64) {
        loop {
            match self.frames.message::<FromAgent>().await.unwrap() {
                FromAgent::Welcome { .. } => {}
                FromAgent::ManifestDigest { digest, entries, .. } => return (digest, entries),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    async fn batch(&mut self, id: u64, deletes: &[&str], chmods: Vec<Chmod>, tar: Vec<u8>) -> Applied {
        let deletes = deletes.iter().map(|s| s.to_string()).collect();
        self.out.message(&ToAgent::Batch { id, deletes, chmods }).await.unwrap();
        for chunk in tar.chunks(1000) {
            self.out.data(chunk).await.unwrap();
        }
        self.out.data_end().await.unwrap();
        self.out.flush().await.unwrap();
        match self.frames.message::<FromAgent>().await.unwrap() {
            FromAgent::Applied(applied) => applied,
            other => panic!("unexpected {other:?}"),
        }
    }

    async fn bye(mut self) {
        self.out.message(&ToAgent::Bye).await.unwrap();
        self.out.flush().await.unwrap();
        self.agent.await.unwrap().unwrap();
    }
}

fn paths(records: &[Record]) -> Vec<&str> {
    records.iter().map(|r| r.path.as_str()).collect()
}

#[tokio::test]
async fn manifest_then_batches_then_a_second_session_sees_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(root.join("ignored")).unwrap();
    fs::write(root.join("ignored/cache.bin"), "x").unwrap();
    fs::write(root.join("stale.txt"), "old").unwrap();

    let (mut client, records) = connect(&root, 1 << 20).await;
    assert_eq!(paths(&records), ["stale.txt"], "ignored paths and .devloop stay out of the manifest");

    let tar = Tar::new()
        .dir("src")
        .file("src/app.js", b"console.log(1)")
        .exec_file("run.sh", b"#!/bin/sh\n")
        .symlink("latest", "src/app.js")
        .bytes();
    let applied = client.batch(1, &["stale.txt"], vec![], tar).await;
    assert_eq!((applied.written, applied.deleted, applied.bytes), (4, 1, 24));
    assert!(applied.refused.is_empty(), "{:?}", applied.refused);
    assert_eq!(fs::read_to_string(root.join("src/app.js")).unwrap(), "console.log(1)");
    assert_eq!(fs::metadata(root.join("run.sh")).unwrap().permissions().mode() & 0o777, 0o755);
    assert_eq!(fs::read_link(root.join("latest")).unwrap(), Path::new("src/app.js"));
    assert!(!root.join("stale.txt").exists());
    assert!(root.join("ignored/cache.bin").exists(), "ignored paths are left alone");

    let applied = client.batch(2, &[], vec![Chmod { path: "run.sh".into(), exec: false }], Tar::new().bytes()).await;
    assert!(applied.refused.is_empty());
    assert_eq!(fs::metadata(root.join("run.sh")).unwrap().permissions().mode() & 0o777, 0o644);
    client.bye().await;

    let (client, records) = connect(&root, 1 << 20).await;
    assert_eq!(paths(&records), ["latest", "run.sh", "src", "src/app.js"]);
    let app = records.iter().find(|r| r.path == "src/app.js").unwrap();
    assert_eq!(app.entry, Entry::File { hash: Digest::of(b"console.log(1)"), size: 14, exec: false });
    let staging = fs::read_dir(root.join(".devloop/staging")).unwrap().count();
    assert_eq!(staging, 0, "no staging leftovers");
    client.bye().await;
}

#[tokio::test]
async fn a_client_that_asks_gets_the_digest_first_and_the_records_only_when_it_wants_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir_all(root.join("src")).unwrap();
    fs::write(root.join("src/app.js"), "console.log(1)").unwrap();
    fs::create_dir_all(root.join("ignored")).unwrap();
    fs::write(root.join("ignored/cache.bin"), "left out").unwrap();
    symlink("src/app.js", root.join("latest")).unwrap();
    // What the CLI computes from its own scan of an equal tree.
    let filter = std::sync::Arc::new(
        devloop_agent::filter::Filter::new(root, &["ignored/".into(), ".devloop/".into()]).unwrap(),
    );
    let ours = devloop_agent::walk::scan(&filter, &devloop_agent::walk::Tree::new()).tree;

    let mut client = open(root, 1 << 20, true).await;
    let (digest, entries) = client.manifest_digest().await;
    assert_eq!((digest, entries), (devloop_agent::walk::digest(&ours), 3));
    client.out.message(&ToAgent::Manifest { wanted: false }).await.unwrap();
    client.out.flush().await.unwrap();
    assert_eq!(client.manifest_records().await, [], "equal trees: no records travel");
    client.bye().await;

    // A different tree: another digest, and the records when asked for.
    fs::write(root.join("src/app.js"), "console.log(2)").unwrap();
    let mut client = open(root, 1 << 20, true).await;
    let (digest, _) = client.manifest_digest().await;
    assert_ne!(digest, devloop_agent::walk::digest(&ours));
    client.out.message(&ToAgent::Manifest { wanted: true }).await.unwrap();
    client.out.flush().await.unwrap();
    assert_eq!(paths(&client.manifest_records().await), ["latest", "src", "src/app.js"]);
    client.bye().await;
}

#[tokio::test]
async fn hostile_batch_writes_nothing_outside_the_root_and_loses_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    fs::create_dir_all(&root).unwrap();
    fs::create_dir_all(&outside).unwrap();
    // A symlink that the app (not devloop) left in the container, pointing out of the root.
    symlink(&outside, root.join("escape")).unwrap();
    let absolute = format!("{}/abs.txt", outside.display());

    let (mut client, _) = connect(&root, 64).await;
    let tar = Tar::new()
        .file("before.txt", b"kept")
        .file(&absolute, b"evil")
        .file("../up.txt", b"evil")
        .file("a/../../up2.txt", b"evil")
        .file("escape/through-link.txt", b"evil")
        .symlink("link-out", "../outside")
        .symlink("link-abs", "/etc")
        .special("dev-null", tar::EntryType::Char)
        .special("disk", tar::EntryType::Block)
        .special("pipe", tar::EntryType::Fifo)
        .file("big.bin", &[0u8; 65])
        .file_with_digest("tampered.txt", b"real", Digest::of(b"claimed"))
        .file(".devloop/staging/x", b"evil")
        .file("after.txt", b"kept too")
        .bytes();
    let applied = client.batch(1, &["../outside", "escape/x"], vec![], tar).await;

    let refused: Vec<&str> = applied.refused.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        refused,
        [
            "escape/x",
            "../outside",
            absolute.as_str(),
            "../up.txt",
            "a/../../up2.txt",
            "escape/through-link.txt",
            "link-out",
            "link-abs",
            "dev-null",
            "disk",
            "pipe",
            "big.bin",
            "tampered.txt",
            ".devloop/staging/x",
        ]
    );
    for problem in &applied.refused {
        assert!(!problem.message.is_empty());
    }
    assert_eq!(applied.written, 2);
    assert_eq!(fs::read_to_string(root.join("before.txt")).unwrap(), "kept");
    assert_eq!(fs::read_to_string(root.join("after.txt")).unwrap(), "kept too");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "nothing written outside the root");
    assert!(!dir.path().join("up.txt").exists() && !dir.path().join("up2.txt").exists());
    for name in ["link-out", "link-abs", "dev-null", "disk", "pipe", "big.bin", "tampered.txt"] {
        assert!(fs::symlink_metadata(root.join(name)).is_err(), "{name} must not exist");
    }
    client.bye().await;
}

/// Small files go to the writer threads in groups: every file of a long batch lands with its
/// own content, and the refused ones (a bad digest here and there, in different groups) are
/// reported at their own places in the stream, whichever thread wrote which group.
#[tokio::test]
async fn a_long_batch_of_small_files_lands_whole_and_reports_refusals_in_stream_order() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(&root).unwrap();
    let (mut client, _) = connect(&root, 1 << 20).await;
    let tampered = [3usize, 20, 21, 57, 199];
    let mut tar = Tar::new();
    for i in 0..200 {
        let path = format!("d{}/f{i:03}.txt", i % 7);
        let body = format!("file {i} ").repeat(i % 50 + 1);
        tar = match tampered.contains(&i) {
            true => tar.file_with_digest(&path, body.as_bytes(), Digest::of(b"claimed")),
            false => tar.file(&path, body.as_bytes()),
        };
    }
    let applied = client.batch(1, &[], vec![], tar.bytes()).await;

    assert_eq!(applied.written, 195);
    let at: Vec<u32> = tampered.iter().map(|&i| i as u32).collect();
    assert_eq!(applied.refused_at, at);
    for i in 0..200 {
        let path = root.join(format!("d{}/f{i:03}.txt", i % 7));
        match tampered.contains(&i) {
            true => assert!(!path.exists(), "{} was refused", path.display()),
            false => assert_eq!(fs::read_to_string(&path).unwrap(), format!("file {i} ").repeat(i % 50 + 1)),
        }
    }
    client.bye().await;
}

#[tokio::test]
async fn a_batch_cut_off_midway_leaves_old_or_new_files_and_the_next_session_converges() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("a.txt"), "old a").unwrap();
    fs::write(root.join("b.txt"), "old b").unwrap();

    let (mut client, _) = connect(&root, 1 << 20).await;
    let big = vec![b'n'; 200_000];
    let tar = Tar::new().file("a.txt", b"new a").file("b.txt", &big).bytes();
    // Send the header, the first file and only part of the second, then vanish.
    client.out.message(&ToAgent::Batch { id: 1, deletes: vec![], chmods: vec![] }).await.unwrap();
    client.out.data(&tar[..100_000]).await.unwrap();
    client.out.flush().await.unwrap();
    drop(client.out);
    drop(client.frames);
    assert!(client.agent.await.unwrap().is_err(), "a cut stream ends the session with an error");

    assert_eq!(fs::read_to_string(root.join("a.txt")).unwrap(), "new a");
    assert_eq!(fs::read_to_string(root.join("b.txt")).unwrap(), "old b", "never half a file");

    let (client, records) = connect(&root, 1 << 20).await;
    let b = records.iter().find(|r| r.path == "b.txt").unwrap();
    assert_eq!(b.entry, Entry::File { hash: Digest::of(b"old b"), size: 5, exec: false });
    assert_eq!(fs::read_dir(root.join(".devloop/staging")).unwrap().count(), 0);
    client.bye().await;
}
