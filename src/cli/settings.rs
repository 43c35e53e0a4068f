//! Flags + `devloop.yaml` resolved into what a command needs, validated once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Config, ConfigError, Globs};
use crate::sync::classify::Rules;
use crate::sync::session::SessionConfig;
use crate::sync::watch::Window;

/// Where the agent runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `local:DIR` — the agent as a child process, serving DIR.
    Local(PathBuf),
    /// `cmd:LINE` — any command whose stdio reaches an agent.
    Command(Vec<String>),
    /// No `--target`: the service's pod in the cluster.
    Kubernetes,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("bad --target `{target}`: {reason}")]
    Target { target: String, reason: String },
}

impl SettingsError {
    pub fn hint(&self) -> Option<String> {
        match self {
            SettingsError::Config(e) => e.hint.clone(),
            SettingsError::Target { .. } => Some(
                "use --target local:DIR, or --target 'cmd:podman exec -i CONTAINER devloop-agent serve --root /app'"
                    .into(),
            ),
        }
    }
}

pub struct WatchSettings {
    pub config: Config,
    pub session: SessionConfig,
    pub target: Target,
    pub once: bool,
}

pub fn load_config(file: &Path) -> Result<(Config, PathBuf), SettingsError> {
    let config = Config::load(file)?;
    let folder = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let root = folder.canonicalize().map_err(|e| ConfigError {
        file: file.to_path_buf(),
        line: None,
        key: None,
        message: format!("cannot resolve its folder: {e}"),
        hint: None,
    })?;
    Ok((config, root))
}

pub fn watch(file: &Path, target: Option<&str>, once: bool) -> Result<WatchSettings, SettingsError> {
    let (config, root) = load_config(file)?;
    let target = match target {
        Some(target) => parse_target(target, &root)?,
        None => Target::Kubernetes,
    };
    let session = SessionConfig {
        root,
        excludes: config.sync_excludes(),
        docker_context: None,
        // The values files never sync, yet a change to them redeploys.
        rules: Rules {
            rebuild: Globs::new(&[config.rebuild.clone(), config.values_files()].concat()),
            no_restart: Globs::new(&config.no_restart),
        },
        window: Window::default(),
        connect_timeout: Duration::from_secs(60),
    };
    Ok(WatchSettings { config, session, target, once })
}

pub fn parse_target(target: &str, root: &Path) -> Result<Target, SettingsError> {
    let bad = |reason: &str| SettingsError::Target { target: target.to_string(), reason: reason.to_string() };
    if let Some(dir) = target.strip_prefix("local:") {
        if dir.is_empty() {
            return Err(bad("no folder after `local:`"));
        }
        let dir = std::path::absolute(dir).map_err(|e| bad(&e.to_string()))?;
        let resolved = resolve(&dir).map_err(|e| bad(&format!("cannot resolve it: {e}")))?;
        let root = resolve(root).unwrap_or_else(|_| root.to_path_buf());
        if resolved.starts_with(&root) || root.starts_with(&resolved) {
            let shown = resolved.display();
            return Err(bad(&format!(
                "the target folder `{shown}` overlaps the folder being synced `{}` (it would sync into itself)",
                root.display()
            )));
        }
        return Ok(Target::Local(resolved));
    }
    if let Some(line) = target.strip_prefix("cmd:") {
        let argv = shell_words::split(line).map_err(|e| bad(&format!("cannot split the command line: {e}")))?;
        if argv.is_empty() {
            return Err(bad("no command after `cmd:`"));
        }
        return Ok(Target::Command(argv));
    }
    Err(bad("it must start with `local:` or `cmd:`"))
}

/// The path `path` will name once its missing folders are created (`mkdir -p`): every existing
/// prefix resolved through its symlinks, `..` of a missing folder taken lexically (as the
/// folder will exist by then), so `B/x/../src/out` and a symlinked parent resolve as the agent
/// will see them.
fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    use std::path::Component;
    let mut resolved = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                resolved.pop();
            }
            Component::Normal(name) => {
                resolved.push(name);
                if std::fs::symlink_metadata(&resolved).is_ok() {
                    resolved = resolved.canonicalize()?;
                }
            }
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let root = Path::new("/work/app");
        assert_eq!(parse_target("local:/tmp/out", root).unwrap(), Target::Local("/tmp/out".into()));
        assert_eq!(
            parse_target("cmd:podman exec -i 'my ct' devloop-agent serve", root).unwrap(),
            Target::Command(vec![
                "podman".into(),
                "exec".into(),
                "-i".into(),
                "my ct".into(),
                "devloop-agent".into(),
                "serve".into()
            ])
        );
        assert!(parse_target("local:/work/app/out", root).is_err());
        assert!(parse_target("local:/work", root).is_err());
        assert!(parse_target("local:", root).is_err());
        assert!(parse_target("cmd:", root).is_err());
        assert!(parse_target("cmd:'unclosed", root).is_err());
        let err = parse_target("/tmp/out", root).unwrap_err();
        assert!(err.hint().unwrap().contains("local:DIR"));
    }

    /// The guard compares where the target will really be: `..` after a folder that does not
    /// exist yet, and a symlinked parent, both led into the source before.
    #[test]
    fn a_target_inside_the_source_is_refused_however_it_is_spelled() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let src = base.join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::os::unix::fs::symlink(&src, base.join("link")).unwrap();
        for spelled in ["x/../src/out", "x/y/../../src/out", "link/out", "link/new/deeper", "src/./a/../out", "link"] {
            let target = format!("local:{}", base.join(spelled).display());
            let err = parse_target(&target, &src).unwrap_err();
            assert!(err.to_string().contains("overlaps"), "{spelled}: {err}");
        }
        let target = format!("local:{}", base.join("x/../elsewhere").display());
        assert_eq!(parse_target(&target, &src).unwrap(), Target::Local(base.join("elsewhere")));
        let err = parse_target("/tmp/out", &src).unwrap_err();
        assert!(err.hint().unwrap().contains("local:DIR"));
    }
}
