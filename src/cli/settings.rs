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
        let resolved = dir.canonicalize().unwrap_or_else(|_| dir.clone());
        if resolved.starts_with(root) || root.starts_with(&resolved) {
            return Err(bad("the target folder overlaps the folder being synced (it would sync into itself)"));
        }
        return Ok(Target::Local(dir));
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
}
