//! How devloop fits the shell and the tools around it: completions, the manual, the version.

use std::process::Command;

use crate::support::devloop_bin;

fn stdout(args: &[&str]) -> String {
    let out = Command::new(devloop_bin()).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn completions_for_every_shell_name_every_command() {
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let script = stdout(&["completions", shell]);
        for command in ["prep", "up", "watch", "down", "list-up", "list-uris", "doctor"] {
            assert!(script.contains(command), "{shell} completions lack `{command}`");
        }
    }
    let out = Command::new(devloop_bin()).args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "an unknown shell is a usage error");
}

#[test]
fn the_manual_comes_from_the_same_definitions() {
    let man = stdout(&["man"]);
    assert!(man.contains(".TH devloop 1"), "{}", &man[..200.min(man.len())]);
    for flag in ["\\-\\-kubeconfig", "\\-\\-json", "list\\-uris", "doctor"] {
        assert!(man.contains(flag), "the manual lacks {flag}");
    }
}

#[test]
fn the_version_names_the_agent_protocol_and_the_commit() {
    let version = stdout(&["--version"]);
    let protocol = format!("agent protocol {}", devloop_agent::protocol::PROTOCOL_VERSION);
    assert!(version.starts_with("devloop ") && version.contains(&protocol), "{version}");
    assert!(version.contains("commit "), "{version}");
}
