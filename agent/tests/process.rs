//! The agent as a real process: bytes in on stdin, bytes out on stdout, as over any transport.

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use devloop_agent::protocol::{encode_frame, Frame, FromAgent, ToAgent, MAGIC, PROTOCOL_VERSION};

mod common;
use common::Tar;

fn agent(root: &std::path::Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_devloop-agent"))
        .args(["serve", "--root"])
        .arg(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn hello(version: u32) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&version.to_be_bytes());
    bytes
}

fn message(msg: &ToAgent) -> Vec<u8> {
    encode_frame(&Frame::Message(serde_json::to_vec(msg).unwrap()))
}

/// Parses the agent's whole stdout: handshake, then frames.
fn frames(stdout: &[u8]) -> Vec<FromAgent> {
    assert_eq!(&stdout[..8], &MAGIC);
    let mut rest = &stdout[12..];
    let mut out = Vec::new();
    while rest.len() >= 5 {
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        assert_eq!(rest[4], 1, "only messages come back");
        out.push(serde_json::from_slice(&rest[5..5 + len]).unwrap());
        rest = &rest[5 + len..];
    }
    out
}

#[test]
fn hostile_batch_through_the_real_binary_writes_nothing_outside() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();

    let mut child = agent(&root);
    let mut input = hello(PROTOCOL_VERSION);
    input.extend(message(&ToAgent::Hello {
        client: "test".into(),
        session: String::new(),
        excludes: vec![],
        docker_context: None,
        ask: false,
    }));
    input.extend(message(&ToAgent::Batch { id: 1, deletes: vec![], chmods: vec![] }));
    let tar = Tar::new()
        .file("../outside/evil.txt", b"evil")
        .file(&format!("{}/abs.txt", outside.display()), b"evil")
        .symlink("out", "../outside")
        .file("good.txt", b"good")
        .bytes();
    input.extend(encode_frame(&Frame::Data(tar)));
    input.extend(encode_frame(&Frame::DataEnd));
    input.extend(message(&ToAgent::Bye));
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let mut stdout = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut stdout).unwrap();
    assert!(child.wait().unwrap().success());

    let applied = frames(&stdout)
        .into_iter()
        .find_map(|m| match m {
            FromAgent::Applied(a) => Some(a),
            _ => None,
        })
        .expect("an Applied message");
    assert_eq!(applied.written, 1);
    assert_eq!(applied.refused.len(), 3, "{:?}", applied.refused);
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    assert_eq!(std::fs::read(root.join("good.txt")).unwrap(), b"good");
}

#[test]
fn version_mismatch_is_a_clear_error_on_the_agent_side() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = agent(dir.path());
    child.stdin.take().unwrap().write_all(&hello(PROTOCOL_VERSION + 98)).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("protocol version {}", PROTOCOL_VERSION + 98)), "{stderr}");
    assert!(stderr.contains("hint:"), "{stderr}");
}

#[test]
fn junk_before_the_handshake_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = agent(dir.path());
    let mut input = b"Welcome to the container!\r\n".to_vec();
    input.extend(hello(PROTOCOL_VERSION));
    input.extend(message(&ToAgent::Hello {
        client: "test".into(),
        session: String::new(),
        excludes: vec![],
        docker_context: None,
        ask: false,
    }));
    input.extend(message(&ToAgent::Bye));
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let messages = frames(&output.stdout);
    assert!(matches!(messages.last(), Some(FromAgent::ManifestEnd { entries: 0, .. })), "{messages:?}");
}
