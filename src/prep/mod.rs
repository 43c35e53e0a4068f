//! `devloop prep`: detect the folder's stack and write what `up` needs — `Dockerfile`
//! (production, multi-stage), `Dockerfile.develop` (the agent as main process), a Helm chart under
//! `charts/NAME/`, `.dockerignore` and `devloop.yaml`. Never overwrites a file without `--force`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// What a folder holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stack {
    /// `*.csproj`: the project file and its assembly name.
    Dotnet { project: String, assembly: String },
    /// `package.json`.
    Node,
    /// `requirements.txt` or `pyproject.toml`; the script to run.
    Python { main: String },
    /// `go.mod`.
    Go,
}

impl Stack {
    pub fn label(&self) -> &'static str {
        match self {
            Stack::Dotnet { .. } => ".NET",
            Stack::Node => "Node.js",
            Stack::Python { .. } => "Python",
            Stack::Go => "Go",
        }
    }

    fn default_port(&self) -> u16 {
        match self {
            Stack::Dotnet { .. } | Stack::Go => 8080,
            Stack::Node => 3000,
            Stack::Python { .. } => 8000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrepError {
    #[error("cannot tell the stack of {0}: no *.csproj, package.json, requirements.txt, pyproject.toml or go.mod")]
    UnknownStack(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

impl PrepError {
    pub fn hint(&self) -> Option<String> {
        match self {
            PrepError::UnknownStack(_) => Some("run devloop prep in the folder of the service's project file".into()),
            PrepError::Read { .. } | PrepError::Write { .. } => Some("check the folder's permissions".into()),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct PrepOptions {
    pub public: bool,
    pub port: Option<u16>,
    pub force: bool,
}

/// What happened to one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Written,
    Overwritten,
    /// It exists and `--force` was not given.
    Skipped,
}

/// Detects the stack of `dir` and the service's name.
pub fn detect(dir: &Path) -> Result<(Stack, String), PrepError> {
    let read_dir = |dir: &Path| fs::read_dir(dir).map_err(|source| PrepError::Read { path: dir.to_path_buf(), source });
    let mut csproj: Vec<String> = read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".csproj"))
        .collect();
    csproj.sort();
    let folder = dir.canonicalize().ok().and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
    let folder = folder.unwrap_or_else(|| "app".into());
    if let Some(project) = csproj.into_iter().next() {
        let assembly = project.trim_end_matches(".csproj").to_string();
        return Ok((Stack::Dotnet { project, assembly: assembly.clone() }, dns_name(&assembly)));
    }
    if dir.join("package.json").is_file() {
        let path = dir.join("package.json");
        let text = fs::read_to_string(&path).map_err(|source| PrepError::Read { path: path.clone(), source })?;
        let name = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["name"].as_str().map(|n| n.rsplit('/').next().unwrap_or(n).to_string()))
            .unwrap_or(folder);
        return Ok((Stack::Node, dns_name(&name)));
    }
    if dir.join("requirements.txt").is_file() || dir.join("pyproject.toml").is_file() {
        let main = ["app.py", "main.py", "server.py"].iter().find(|f| dir.join(f).is_file()).unwrap_or(&"app.py");
        return Ok((Stack::Python { main: main.to_string() }, dns_name(&folder)));
    }
    if dir.join("go.mod").is_file() {
        return Ok((Stack::Go, dns_name(&folder)));
    }
    Err(PrepError::UnknownStack(dir.to_path_buf()))
}

impl Stack {
    /// The dependency manifests the dev image installs at build time: a change to one needs a new
    /// image (as Azure Dev Spaces rebuilt on a `.csproj` change).
    pub fn build_inputs(&self) -> &'static [&'static str] {
        match self {
            Stack::Dotnet { .. } => &["*.csproj"],
            Stack::Node => &["package.json", "package-lock.json", "npm-shrinkwrap.json", "yarn.lock", "pnpm-lock.yaml"],
            Stack::Python { .. } => &["requirements*.txt", "pyproject.toml"],
            Stack::Go => &["go.mod", "go.sum"],
        }
    }
}

/// A DNS label from any name: `Producer.Api` → `producer-api`.
pub fn dns_name(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out: String = out.trim_matches('-').chars().take(63).collect();
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() {
        "app".into()
    } else {
        out
    }
}

/// The files `prep` writes, relative to the folder, with their content.
pub fn files(stack: &Stack, name: &str, options: &PrepOptions) -> Vec<(PathBuf, String)> {
    let port = options.port.unwrap_or_else(|| stack.default_port());
    let (dockerfile, develop) = match stack {
        Stack::Dotnet { .. } => (include_str!("dotnet.Dockerfile"), include_str!("dotnet.Dockerfile.develop")),
        Stack::Node => (include_str!("node.Dockerfile"), include_str!("node.Dockerfile.develop")),
        Stack::Python { .. } => (include_str!("python.Dockerfile"), include_str!("python.Dockerfile.develop")),
        Stack::Go => (include_str!("go.Dockerfile"), include_str!("go.Dockerfile.develop")),
    };
    let (project, assembly, main) = match stack {
        Stack::Dotnet { project, assembly } => (project.as_str(), assembly.as_str(), ""),
        Stack::Python { main } => ("", "", main.as_str()),
        _ => ("", "", ""),
    };
    // Names from the project (a .csproj file name may hold spaces, commas, quotes) enter the
    // Dockerfiles only as JSON strings of exec-form arrays, and command lines only shell-quoted.
    let json = |text: &str| serde_json::to_string(text).expect("strings serialize");
    let dotnet_build = shell_words::join(["dotnet", "build", project]);
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{port}}", &port.to_string())
            .replace("{{public}}", if options.public { "true" } else { "false" })
            .replace("{{project_json}}", &json(project))
            .replace("{{dotnet_build_json}}", &json(&dotnet_build))
            .replace("{{assembly_dll_json}}", &json(&format!("{assembly}.dll")))
            .replace("{{main_json}}", &json(main))
    };
    let chart = PathBuf::from("charts").join(name);
    vec![
        ("Dockerfile".into(), fill(dockerfile)),
        ("Dockerfile.develop".into(), fill(develop)),
        (".dockerignore".into(), dockerignore(stack)),
        (chart.join("Chart.yaml"), fill(include_str!("chart/Chart.yaml"))),
        (chart.join("values.yaml"), fill(include_str!("chart/values.yaml"))),
        (chart.join("templates/deployment.yaml"), fill(include_str!("chart/templates/deployment.yaml"))),
        (chart.join("templates/service.yaml"), fill(include_str!("chart/templates/service.yaml"))),
        (chart.join("templates/secret.yaml"), fill(include_str!("chart/templates/secret.yaml"))),
        (chart.join("templates/ingress.yaml"), fill(include_str!("chart/templates/ingress.yaml"))),
        ("devloop.yaml".into(), devloop_yaml(stack, name, port, options.public)),
        // Beside devloop.yaml, named by its first line: editors validate and complete the file
        // offline (`devloop schema` prints it again).
        (crate::config::SCHEMA_FILE.into(), crate::config::schema()),
    ]
}

fn dockerignore(stack: &Stack) -> String {
    // The values file holds `secrets:`: never in an image.
    let mut lines = vec![".git/", ".devloop/", crate::config::DEFAULT_VALUES, crate::config::SCHEMA_FILE];
    match stack {
        Stack::Dotnet { .. } => lines.extend(["bin/", "obj/"]),
        Stack::Node => lines.push("node_modules/"),
        Stack::Python { .. } => lines.extend(["__pycache__/", "*.pyc", ".venv/"]),
        Stack::Go => {}
    }
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// devloop.yaml as prep writes it, serialized (never assembled as text: names are quoted as
/// YAML needs them).
#[derive(serde::Serialize)]
struct PreparedConfig<'a> {
    name: &'a str,
    sync: PreparedSync,
    rebuild: Vec<&'a str>,
    no_restart: Vec<&'a str>,
    run: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    build: Option<Vec<String>>,
    ready: PreparedReady,
    chart: String,
    port: u16,
    public: bool,
}

#[derive(serde::Serialize)]
struct PreparedSync {
    exclude: Vec<String>,
}

#[derive(serde::Serialize)]
struct PreparedReady {
    tcp: u16,
}

fn devloop_yaml(stack: &Stack, name: &str, port: u16, public: bool) -> String {
    let argv = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let (run, build, no_restart) = match stack {
        Stack::Dotnet { project, .. } => (
            argv(&["dotnet", "run", "--no-build", "--project", project]),
            Some(argv(&["dotnet", "build", project])),
            "wwwroot/**",
        ),
        Stack::Node => (argv(&["npm", "start"]), None, "public/**"),
        Stack::Python { main } => (argv(&["python", main]), None, "static/**"),
        Stack::Go => (argv(&["/tmp/app"]), Some(argv(&["go", "build", "-o", "/tmp/app", "."])), "static/**"),
    };
    let config = PreparedConfig {
        name,
        sync: PreparedSync { exclude: Vec::new() },
        rebuild: [crate::config::DEFAULT_REBUILD, stack.build_inputs()].concat(),
        no_restart: vec![no_restart],
        run,
        build,
        ready: PreparedReady { tcp: port },
        chart: format!("charts/{name}"),
        port,
        public,
    };
    let body = serde_yaml_ng::to_string(&config).expect("the config serializes");
    format!(
        "# yaml-language-server: $schema={schema}\n\
         # devloop.yaml for {name} ({stack}), written by `devloop prep`.\n\
         # chart, port and public are the Kubernetes side (devloop up).\n{body}",
        schema = crate::config::SCHEMA_FILE,
        stack = stack.label()
    )
}

/// `devloop prep`: detects the stack of the current folder and writes its files.
pub fn run(args: &crate::cli::PrepArgs, reporter: &crate::report::Reporter) -> Result<(), PrepError> {
    use crate::report::Event;
    let dir = std::env::current_dir().map_err(|source| PrepError::Read { path: ".".into(), source })?;
    let (stack, name) = detect(&dir)?;
    let options = PrepOptions { public: args.public, port: args.port, force: args.force };
    let files = files(&stack, &name, &options);
    for (path, outcome) in write(&dir, &files, args.force)? {
        let outcome = match outcome {
            Outcome::Written => "wrote",
            Outcome::Overwritten => "rewrote",
            Outcome::Skipped => "skipped",
        };
        reporter.emit(Event::File { path: path.display().to_string(), outcome: outcome.into() });
    }
    reporter.emit(Event::Prepared { stack: stack.label().into(), name });
    Ok(())
}

/// Writes the files under `dir`; existing ones are kept unless `force`.
pub fn write(dir: &Path, files: &[(PathBuf, String)], force: bool) -> Result<Vec<(PathBuf, Outcome)>, PrepError> {
    let mut done = Vec::new();
    for (rel, content) in files {
        let path = dir.join(rel);
        let exists = path.exists();
        if exists && !force {
            done.push((rel.clone(), Outcome::Skipped));
            continue;
        }
        let err = |source| PrepError::Write { path: path.clone(), source };
        fs::create_dir_all(path.parent().expect("files have a parent")).map_err(err)?;
        // Written next to the destination, then renamed: never a half-written file.
        let tmp = path.with_file_name(format!(".{}.devloop-tmp", path.file_name().unwrap().to_string_lossy()));
        fs::write(&tmp, content).map_err(err)?;
        fs::rename(&tmp, &path).map_err(err)?;
        done.push((rel.clone(), if exists { Outcome::Overwritten } else { Outcome::Written }));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_dns_labels() {
        assert_eq!(dns_name("Producer.Api"), "producer-api");
        assert_eq!(dns_name("My_Service"), "my-service");
        assert_eq!(dns_name("--"), "app");
    }

    #[test]
    fn detects_each_stack() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(detect(dir.path()), Err(PrepError::UnknownStack(_))));
        fs::write(dir.path().join("go.mod"), "module x").unwrap();
        assert_eq!(detect(dir.path()).unwrap().0, Stack::Go);
        fs::write(dir.path().join("requirements.txt"), "").unwrap();
        fs::write(dir.path().join("main.py"), "").unwrap();
        assert_eq!(detect(dir.path()).unwrap().0, Stack::Python { main: "main.py".into() });
        fs::write(dir.path().join("package.json"), r#"{"name": "@shop/Web"}"#).unwrap();
        assert_eq!(detect(dir.path()).unwrap(), (Stack::Node, "web".into()));
        fs::write(dir.path().join("Producer.csproj"), "<Project/>").unwrap();
        let (stack, name) = detect(dir.path()).unwrap();
        assert_eq!(stack, Stack::Dotnet { project: "Producer.csproj".into(), assembly: "Producer".into() });
        assert_eq!(name, "producer");
    }

    #[test]
    fn generated_config_is_valid_for_every_stack() {
        for stack in [
            Stack::Dotnet { project: "P.csproj".into(), assembly: "P".into() },
            Stack::Node,
            Stack::Python { main: "app.py".into() },
            Stack::Go,
        ] {
            let files = files(&stack, "svc", &PrepOptions { public: true, port: Some(5000), force: false });
            let (_, yaml) = files.iter().find(|(p, _)| p == Path::new("devloop.yaml")).unwrap();
            let config = crate::config::Config::parse(Path::new("devloop.yaml"), yaml)
                .unwrap_or_else(|e| panic!("{stack:?}: {e}\n{yaml}"));
            assert_eq!(config.name, "svc");
            for input in stack.build_inputs() {
                assert!(config.rebuild.iter().any(|r| r == input), "{stack:?}: {input} rebuilds");
            }
            assert_eq!(config.port, Some(5000));
            assert!(config.public);
            let (_, develop) = files.iter().find(|(p, _)| p == Path::new("Dockerfile.develop")).unwrap();
            assert!(develop.contains("ENTRYPOINT [\"devloop-agent\", \"run\""), "{develop}");
            assert!(!develop.contains("{{"), "{develop}");
        }
    }

    /// A project file named with spaces, commas, quotes and YAML punctuation stays one argument
    /// everywhere: in devloop.yaml's lists and in the Dockerfiles' exec-form arrays.
    #[test]
    fn unusual_project_names_are_quoted_not_spliced() {
        let project = "My App, \"v2\": [x].csproj";
        let stack = Stack::Dotnet { project: project.into(), assembly: "My App".into() };
        let files = files(&stack, "my-app", &PrepOptions { public: false, port: None, force: false });
        let get = |name: &str| files.iter().find(|(p, _)| p == Path::new(name)).unwrap().1.clone();
        let config = crate::config::Config::parse(Path::new("devloop.yaml"), &get("devloop.yaml")).unwrap();
        assert_eq!(config.run, ["dotnet", "run", "--no-build", "--project", project]);
        assert_eq!(config.build, ["dotnet", "build", project]);
        let develop = get("Dockerfile.develop");
        let entrypoint = develop.lines().find(|l| l.starts_with("ENTRYPOINT ")).unwrap();
        let argv: Vec<String> = serde_json::from_str(&entrypoint["ENTRYPOINT ".len()..]).unwrap();
        let build = &argv[argv.iter().position(|a| a == "--build").unwrap() + 1];
        assert_eq!(shell_words::split(build).unwrap(), ["dotnet", "build", project]);
        let cmd = develop.lines().find(|l| l.starts_with("CMD ")).unwrap();
        let argv: Vec<String> = serde_json::from_str(&cmd["CMD ".len()..]).unwrap();
        assert_eq!(argv.last().unwrap(), project);
        let production = get("Dockerfile");
        for line in production.lines().filter(|l| l.starts_with("RUN [") || l.starts_with("ENTRYPOINT [")) {
            let json = &line[line.find('[').unwrap()..];
            serde_json::from_str::<Vec<String>>(json).unwrap_or_else(|e| panic!("{line}: {e}"));
        }
    }

    #[test]
    fn never_overwrites_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let files = vec![(PathBuf::from("a/b.txt"), "new".to_string())];
        fs::create_dir_all(dir.path().join("a")).unwrap();
        fs::write(dir.path().join("a/b.txt"), "mine").unwrap();
        assert_eq!(write(dir.path(), &files, false).unwrap()[0].1, Outcome::Skipped);
        assert_eq!(fs::read_to_string(dir.path().join("a/b.txt")).unwrap(), "mine");
        assert_eq!(write(dir.path(), &files, true).unwrap()[0].1, Outcome::Overwritten);
        assert_eq!(fs::read_to_string(dir.path().join("a/b.txt")).unwrap(), "new");
    }
}
