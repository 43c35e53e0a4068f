//! The container tier: a real podman container whose main process is `devloop-agent run`,
//! driven by `devloop watch --target 'cmd:podman exec -i CT devloop-agent serve --root /app'`.
//!
//! Needs the image of `tests/container/image`; `tests/run` builds it, sets DEVLOOP_TEST_IMAGE
//! and runs these tests, which are `#[ignore]`d for a plain `cargo test` (shown as ignored) and
//! fail when run without the image.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::supervise::{free_port, get};
use crate::support::{self, devloop_bin, Fixture};

fn image() -> String {
    std::env::var("DEVLOOP_TEST_IMAGE")
        .expect("the container tier needs DEVLOOP_TEST_IMAGE: run tests/run, which builds the image")
}

fn podman(args: &[&str]) -> String {
    let out = Command::new("podman").args(args).output().expect("podman runs");
    assert!(out.status.success(), "podman {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A running container with the agent as its main process, removed on drop.
struct Container {
    id: String,
    port: u16,
}

impl Container {
    fn start(image: &str) -> Container {
        let port = free_port();
        let port_arg = port.to_string();
        let id = podman(&[
            "run",
            "-d",
            "--network",
            "host",
            image,
            "devloop-agent",
            "run",
            "--root",
            "/app",
            "--grace",
            "2s",
            "--ready",
            &format!("tcp:{port}"),
            "--",
            "standin",
            "--port",
            &port_arg,
            "--file",
            "message.txt",
        ]);
        let container = Container { id, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while get(port).is_none() {
            assert!(Instant::now() < deadline, "the app in the container never served");
            std::thread::sleep(Duration::from_millis(20));
        }
        container
    }

    fn target(&self) -> String {
        format!("cmd:podman exec -i {} devloop-agent serve --root /app", self.id)
    }

    /// The container's /app as a host folder.
    fn app_dir(&self) -> PathBuf {
        PathBuf::from(podman(&["mount", &self.id])).join("app")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rm", "-f", "-t", "0", &self.id]).output();
    }
}

fn once(fx: &Fixture, target: &str) -> support::Run {
    let out = Command::new(devloop_bin())
        .current_dir(&fx.src)
        .args(["--json", "watch", "--once", "--target", target])
        .output()
        .unwrap();
    support::Run {
        code: out.status.code(),
        events: support::parse_events(&String::from_utf8_lossy(&out.stdout)),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
#[ignore = "needs podman and the image of tests/container/image: tests/run builds it and runs the ignored tests"]
fn sync_restart_and_delete_in_a_real_container() {
    let image = image();
    let ct = Container::start(&image);
    let fx = Fixture::new("name: shop\n");
    fx.write("message.txt", "from the laptop");
    fx.write("src/Program.cs", "class Program {}");
    fx.write("obsolete.txt", "to be deleted");

    let run = once(&fx, &ct.target());
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.of("restarted").len(), 1, "{:?}", run.events);
    assert_eq!(get(ct.port).unwrap().0, "from the laptop");
    assert!(run.events.iter().any(|e| e["event"] == "output"), "the app's output reaches the user: {:?}", run.events);

    std::fs::remove_file(fx.src.join("obsolete.txt")).unwrap();
    fx.write("message.txt", "second version");
    let run = once(&fx, &ct.target());
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.of("applied")[0]["deleted"], 1);
    assert_eq!(get(ct.port).unwrap().0, "second version");
    support::converge(&fx.src, &ct.app_dir(), &[]);

    // Nothing changed: nothing is sent, and the app is only checked for readiness.
    let run = once(&fx, &ct.target());
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.of("sync_started").is_empty(), "{:?}", run.events);
}

#[test]
#[ignore = "needs podman and the image of tests/container/image: tests/run builds it and runs the ignored tests"]
fn watch_through_podman_exec_restarts_on_each_edit() {
    let image = image();
    let ct = Container::start(&image);
    let fx = Fixture::new("name: shop\n");
    fx.write("message.txt", "v0");
    let mut watch = support::Watch::start(&fx.src, &["--json", "watch", "--target", &ct.target()]);
    for i in 1..=5 {
        fx.write("message.txt", &format!("v{i}"));
        watch.wait_for("restarted", Duration::from_secs(20));
        assert_eq!(get(ct.port).unwrap().0, format!("v{i}"));
    }
    assert_eq!(watch.stop(), Some(0));
    support::converge(&fx.src, &ct.app_dir(), &[]);
}
