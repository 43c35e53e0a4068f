//! What a user sees when something is wrong: a clear error, a hint, a non-zero exit, nothing lost.

use std::process::Command;

use crate::support::{agent_bin, devloop_bin, Fixture};

fn run(fx: &Fixture, args: &[&str]) -> (Option<i32>, String, String) {
    let out =
        Command::new(devloop_bin()).current_dir(&fx.src).args(args).env("DEVLOOP_AGENT", agent_bin()).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn command_target_with_a_banner_before_the_agent_works() {
    let fx = Fixture::new("name: demo\n");
    fx.write("a.txt", "a");
    let line = format!(
        "cmd:sh -c 'echo welcome to the box; exec {} serve --root {}'",
        agent_bin().display(),
        fx.dst.display()
    );
    let (code, _, stderr) = run(&fx, &["watch", "--once", "--target", &line]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(std::fs::read_to_string(fx.dst.join("a.txt")).unwrap(), "a");
}

#[test]
fn agent_of_another_protocol_version_is_refused_with_a_hint() {
    let fx = Fixture::new("name: demo\n");
    // A fake agent that answers the handshake with protocol version 99.
    let line = "cmd:sh -c 'printf \"\\177DEVLOOP\\000\\000\\000\\143\"; sleep 1'";
    let (code, _, stderr) = run(&fx, &["watch", "--once", "--target", line]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("protocol version 99"), "{stderr}");
    assert!(stderr.contains("hint: ") && stderr.contains("rebuild the dev image"), "{stderr}");
}

#[test]
fn target_that_is_no_agent_says_what_it_printed() {
    let fx = Fixture::new("name: demo\n");
    let (code, _, stderr) = run(&fx, &["watch", "--once", "--target", "cmd:sh -c 'echo sh: devloop-agent: not found'"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("devloop-agent: not found"), "{stderr}");
    assert!(stderr.contains("hint: "), "{stderr}");
}

#[test]
fn missing_program_is_named() {
    let fx = Fixture::new("name: demo\n");
    let (code, _, stderr) = run(&fx, &["watch", "--once", "--target", "cmd:no-such-program-xyz serve"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no-such-program-xyz") && stderr.contains("hint: "), "{stderr}");
}

#[test]
fn bad_config_names_file_line_and_key_and_json_errors_are_json() {
    let fx = Fixture::new("name: demo\nsync:\n  exclude: [bin/]\n  include: [x]\n");
    let (code, stdout, stderr) = run(&fx, &["watch", "--once", "--target", "local:/tmp/never"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("devloop.yaml:4") && stderr.contains("include"), "{stderr}");
    assert!(stdout.is_empty());
    let (code, stdout, _) = run(&fx, &["--json", "watch", "--once", "--target", "local:/tmp/never"]);
    assert_eq!(code, Some(1));
    let event: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(event["event"], "error");
    assert!(event["message"].as_str().unwrap().contains("include"));
    assert!(!std::path::Path::new("/tmp/never").exists(), "nothing created on a config error");
}

#[test]
fn missing_config_hints_at_the_folder() {
    let fx = Fixture::new("name: demo\n");
    std::fs::remove_file(fx.src.join("devloop.yaml")).unwrap();
    let (code, _, stderr) = run(&fx, &["watch", "--once", "--target", &fx.target()]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("devloop.yaml") && stderr.contains("hint: "), "{stderr}");
}

/// Regression: a duration beyond what the clock can add panicked (devloop) or orphaned the app
/// (the agent's supervisor).
#[test]
fn huge_durations_are_clear_errors_not_panics() {
    let fx = Fixture::new("name: demo\nrun: [sleep, '100']\ngrace: 99999999999999999999s\n");
    let target = fx.target();
    let (code, _, stderr) = run(&fx, &["watch", "--once", "--target", &target]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("grace") && stderr.contains("at most a week"), "{stderr}");
    let fx = Fixture::new("name: demo\nready: {tcp: 1, timeout: 9999999999999999999s}\n");
    let (code, _, stderr) = run(&fx, &["watch", "--once", "--target", &target]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("timeout") && !stderr.contains("panicked"), "{stderr}");
    let agent =
        Command::new(agent_bin()).args(["run", "--grace", "9999999999999999999s", "--", "true"]).output().unwrap();
    assert_eq!(agent.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&agent.stderr).contains("at most a week"));
}
