//! `devloop prep` on the examples: the files a deploy needs, never an overwrite without --force.

use std::path::Path;
use std::process::Command;

use crate::support::devloop_bin;

fn copy_tree(from: &Path, to: &Path, skip: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if skip.contains(&name.as_str()) {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target, skip);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn prep(dir: &Path, args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(devloop_bin()).current_dir(dir).args(["--json", "prep"]).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    crate::support::parse_events(&String::from_utf8_lossy(&out.stdout))
}

fn outcomes(events: &[serde_json::Value]) -> Vec<String> {
    events.iter().filter(|e| e["event"] == "file").map(|e| e["outcome"].as_str().unwrap().to_string()).collect()
}

#[test]
fn prep_writes_then_keeps_then_rewrites_with_force() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for (example, stack, name) in [
        ("producer", ".NET", "producer"),
        ("consumer", ".NET", "consumer"),
        ("node-web", "Node.js", "node-web"),
        ("hello", "Python", "hello"),
    ] {
        let temp = tempfile::tempdir().unwrap();
        // Named like the example: a Python or Go service takes its folder's name.
        let dir = temp.path().join(example);
        let generated =
            ["Dockerfile", "Dockerfile.develop", ".dockerignore", "charts", "devloop.yaml", "devloop.schema.json"];
        copy_tree(&examples.join(example), dir.as_path(), &generated);

        let first = prep(dir.as_path(), &["--public"]);
        assert!(outcomes(&first).iter().all(|o| o == "wrote"), "{example}: {first:?}");
        let done = first.iter().find(|e| e["event"] == "prepared").unwrap();
        assert_eq!((done["stack"].as_str(), done["name"].as_str()), (Some(stack), Some(name)));
        for file in ["Dockerfile", "Dockerfile.develop", "devloop.yaml", "devloop.schema.json"] {
            assert!(dir.as_path().join(file).is_file(), "{example}: {file}");
        }
        // Editors find the schema through devloop.yaml's first line.
        let yaml = std::fs::read_to_string(dir.as_path().join("devloop.yaml")).unwrap();
        assert!(yaml.starts_with("# yaml-language-server: $schema=devloop.schema.json\n"), "{example}: {yaml}");
        let chart = dir.as_path().join("charts").join(name);
        for file in [
            "Chart.yaml",
            "values.yaml",
            "templates/deployment.yaml",
            "templates/service.yaml",
            "templates/secret.yaml",
            "templates/ingress.yaml",
        ] {
            assert!(chart.join(file).is_file(), "{example}: {file}");
        }
        let dockerignore = std::fs::read_to_string(dir.as_path().join(".dockerignore")).unwrap();
        assert!(dockerignore.lines().any(|l| l == "values.dev.yaml"), "{example}: secrets stay out of images");
        let config = devloop::config::Config::load(&dir.as_path().join("devloop.yaml")).unwrap();
        assert_eq!(config.name, name);
        assert!(config.public);

        std::fs::write(dir.as_path().join("Dockerfile"), "# mine").unwrap();
        let second = prep(dir.as_path(), &[]);
        assert!(outcomes(&second).iter().all(|o| o == "skipped"), "{example}: {second:?}");
        assert_eq!(std::fs::read_to_string(dir.as_path().join("Dockerfile")).unwrap(), "# mine");

        let forced = prep(dir.as_path(), &["--force"]);
        assert!(outcomes(&forced).iter().all(|o| o == "rewrote"), "{example}: {forced:?}");
        assert_ne!(std::fs::read_to_string(dir.as_path().join("Dockerfile")).unwrap(), "# mine");

        // The chart renders (helm is on PATH under tests/run).
        if let Ok(out) = Command::new("helm").arg("template").arg(name).arg(&chart).output() {
            assert!(out.status.success(), "{example}: {}", String::from_utf8_lossy(&out.stderr));
            let rendered = String::from_utf8_lossy(&out.stdout);
            assert!(rendered.contains("kind: Deployment") && rendered.contains("kind: Secret"), "{rendered}");
            assert!(rendered.contains("app.kubernetes.io/name: ") && rendered.contains("kind: Service"));
        }
    }
}

#[test]
fn prep_in_a_folder_without_a_project_says_what_it_looks_for() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(devloop_bin()).current_dir(dir.path()).arg("prep").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("*.csproj") && stderr.contains("hint:"), "{stderr}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written");
}
