//! `devloop.yaml`: the one config file. Parsed strictly: an unknown key or a bad value is an error
//! that names the file, the line and the key.

use std::fmt;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;

pub const FILE_NAME: &str = "devloop.yaml";

/// What forces a rebuild when nothing else is said.
pub const DEFAULT_REBUILD: &[&str] = &["Dockerfile*", "charts/**", "devloop.yaml"];

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "devloop.yaml",
    description = "devloop's one config file: the service, what syncs, how it runs and deploys."
)]
pub struct Config {
    /// The service's name (a DNS label: it names Kubernetes objects later).
    pub name: String,
    #[serde(default)]
    pub sync: SyncConfig,
    /// Changes to these paths need a new image, not a sync.
    #[serde(default = "default_rebuild")]
    pub rebuild: Vec<String>,
    /// Changes only to these paths sync without restarting the app.
    #[serde(default)]
    pub no_restart: Vec<String>,
    /// The app's command line, as argv.
    #[serde(default)]
    pub run: Vec<String>,
    /// Run before each restart (e.g. `[dotnet, build]`); when it fails the old app keeps running.
    #[serde(default)]
    pub build: Vec<String>,
    /// When the app counts as ready after a (re)start.
    #[serde(default)]
    pub ready: Option<Ready>,
    /// How long the app gets to stop after SIGTERM before its process group is killed.
    #[serde(default = "default_grace")]
    pub grace: String,
    /// The Helm chart (`devloop up`), relative to this file's folder.
    #[serde(default)]
    pub chart: Option<String>,
    /// The port the app listens on in the container (tunneled to localhost by `devloop up`).
    #[serde(default)]
    pub port: Option<u16>,
    /// Whether the service gets a public ingress.
    #[serde(default)]
    pub public: bool,
    /// Values files for the chart (default: `values.dev.yaml` when it exists). Their `secrets:`
    /// trees become environment variables through a Secret; they never sync.
    #[serde(default)]
    pub values: Vec<String>,
    /// The dev image to deploy (`repository:tag`), until devloop builds it in the cluster.
    #[serde(default)]
    pub image: Option<String>,
    /// Joins nested keys of `secrets:` into environment variable names (`urls__producer`).
    #[serde(default = "default_separator")]
    pub secret_separator: String,
    /// How `devloop up` builds the dev image in the cluster when `image:` is not set.
    #[serde(default)]
    pub builder: Builder,
    /// Build arguments of `Dockerfile.develop` (`BASE` names its base image in prep's files).
    #[serde(default)]
    pub build_args: std::collections::BTreeMap<String, String>,
    /// Where the dev image goes: `auto` (the registry the cluster publishes in ConfigMap
    /// kube-public/local-registry-hosting, else the builder's node), `none` (always the
    /// builder's node: no registry, the pod pinned there), `HOST[:PORT][/PATH]`, or
    /// `{push: …, pull: …}` when the builder and the nodes reach the registry by different names.
    #[serde(default)]
    pub registry: Registry,
}

/// `registry:` of devloop.yaml.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum Registry {
    /// `auto`, `none`, or the registry's `HOST[:PORT][/PATH]`.
    Named(String),
    /// The registry by the names the builder and the nodes reach it by.
    Hosts(RegistryHosts),
}

impl Default for Registry {
    fn default() -> Self {
        Registry::Named("auto".into())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistryHosts {
    /// Where the in-cluster builder pushes (`HOST[:PORT][/PATH]`).
    pub push: String,
    /// What the nodes' container runtime pulls from (default: `push`).
    #[serde(default)]
    pub pull: Option<String>,
    /// Plain HTTP / unverified TLS for the push (default: only for loopback, private
    /// addresses and cluster-local names).
    #[serde(default)]
    pub insecure: Option<bool>,
}

/// Whether `host` looks like a registry's `HOST[:PORT][/PATH]` (no scheme, no tag, no spaces).
pub fn is_registry_host(host: &str) -> bool {
    let (name, path) = host.split_once('/').unwrap_or((host, ""));
    let (name, port) = match name.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (name, None),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    let path_ok = path.is_empty()
        || path.split('/').all(|c| {
            !c.is_empty() && c.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch))
        });
    name_ok && port_ok && path_ok
}

/// The in-cluster builder: BuildKit next to a node's containerd.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Builder {
    /// The BuildKit image the builder pod runs.
    #[serde(default = "default_builder_image")]
    pub image: String,
    /// The node to build on (the service's pod is pinned there); default: the only node, or
    /// the one labelled `devloop.dev/builder=true`.
    #[serde(default)]
    pub node: Option<String>,
    /// The node's containerd socket (default: found from the node: what its kubelet is
    /// configured with, else k3s's or the standard path).
    #[serde(default)]
    pub containerd: Option<String>,
    /// BuildKit's state on the node (a host folder that must be a shared mount).
    #[serde(default = "default_builder_root")]
    pub root: String,
}

impl Default for Builder {
    fn default() -> Self {
        Builder { image: default_builder_image(), node: None, containerd: None, root: default_builder_root() }
    }
}

fn default_builder_image() -> String {
    "moby/buildkit:v0.34.2".into()
}

fn default_builder_root() -> String {
    "/var/lib/devloop/buildkit".into()
}

fn default_separator() -> String {
    "__".into()
}

/// A readiness check: `{tcp: PORT}`, `{http: URL}` or `{http: PATH, port: PORT}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    #[serde(default)]
    pub http: Option<String>,
    #[serde(default)]
    pub tcp: Option<u16>,
    #[serde(default)]
    pub port: Option<u16>,
    /// How long to wait, e.g. `60s`.
    #[serde(default = "default_ready_timeout")]
    pub timeout: String,
}

impl Ready {
    /// The agent's probe spec (`tcp:PORT` or `http://HOST:PORT/PATH`), from a validated config.
    pub fn probe(&self) -> String {
        match (&self.tcp, &self.http) {
            (Some(port), _) => format!("tcp:{port}"),
            (None, Some(url)) if url.starts_with("http://") => url.clone(),
            (None, Some(path)) => format!("http://127.0.0.1:{}{path}", self.port.unwrap_or(80)),
            (None, None) => unreachable!("validated: one of http or tcp"),
        }
    }
}

/// The values file used when `values:` names none (and it exists).
pub const DEFAULT_VALUES: &str = "values.dev.yaml";

impl Config {
    /// The values files, relative to the config's folder: `values:`, or [`DEFAULT_VALUES`].
    /// They hold `secrets:`: they never sync into the container and never enter a build context.
    /// The values files, as paths relative to the folder (`./values.dev.yaml` is `values.dev.yaml`:
    /// it matches the watcher's paths and the rebuild rules alike).
    pub fn values_files(&self) -> Vec<String> {
        if self.values.is_empty() {
            return vec![DEFAULT_VALUES.to_string()];
        }
        self.values.iter().map(|v| v.trim_start_matches("./").to_string()).collect()
    }

    /// What sync leaves out on top of the ignore files: `sync.exclude`, the values files
    /// (anchored at the root, whatever `.gitignore` says about them), and the agent binary that
    /// the in-cluster build puts at the root of the build context (the image's copy is left alone).
    pub fn sync_excludes(&self) -> Vec<String> {
        let values = self.values_files().into_iter().map(|v| format!("/{}", v.trim_start_matches("./")));
        let agent = std::iter::once("/devloop-agent".to_string());
        self.sync.exclude.iter().cloned().chain(values).chain(agent).collect()
    }
}

fn default_grace() -> String {
    "5s".into()
}

fn default_ready_timeout() -> String {
    "60s".into()
}

pub use devloop_agent::units::parse_duration;

/// What syncs, on top of `.gitignore` and `.dockerignore`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// gitignore-style patterns left out of sync, on top of `.gitignore` and `.dockerignore`.
    #[serde(default)]
    pub exclude: Vec<String>,
}

fn default_rebuild() -> Vec<String> {
    DEFAULT_REBUILD.iter().map(|s| s.to_string()).collect()
}

/// Largest devloop.yaml read: a real one is a few hundred bytes; 10 MB of patterns took
/// seconds and gigabytes to parse.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Deepest nesting of a devloop.yaml read (its own schema nests three levels).
const MAX_NESTING: usize = 64;
/// Most sync exclude patterns (each is compiled into the filter every scan consults).
const MAX_EXCLUDES: usize = 10_000;

/// Why a small text file (devloop.yaml, a values file) could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read it: {0}")]
    Io(#[from] std::io::Error),
    #[error("it is {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("it holds {size} bytes; at most {max} are read")]
    TooLarge { size: u64, max: u64 },
    #[error("it is not UTF-8 text")]
    NotUtf8,
}

/// Reads a small text file the user names: never blocks on a FIFO, never reads more than `max`
/// bytes (whatever the file grows to meanwhile).
pub fn read_bounded(path: &Path, max: u64) -> Result<String, ReadError> {
    use devloop_agent::beneath::{open_named_file, OpenError};
    use std::io::Read;
    let opened = match open_named_file(path) {
        Ok(opened) => opened,
        Err(OpenError::NotRegular(kind)) => return Err(ReadError::NotRegular(kind)),
        Err(OpenError::Io(e)) => return Err(ReadError::Io(e)),
    };
    let size = opened.stat.st_size as u64;
    if size > max {
        return Err(ReadError::TooLarge { size, max });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    opened.file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(ReadError::TooLarge { size: bytes.len() as u64, max });
    }
    String::from_utf8(bytes).map_err(|_| ReadError::NotUtf8)
}

/// Whether YAML `text` nests deeper than `max` (flow brackets, or block indentation), and how
/// deep it got before the check stopped: a parser spends quadratic time on 100,000 levels.
fn too_deep(text: &str, max: usize) -> Option<usize> {
    let mut flow = 0usize;
    let mut quote: Option<char> = None;
    let mut indents: Vec<usize> = Vec::new();
    for line in text.lines() {
        if quote.is_none() && flow == 0 {
            let indent = line.len() - line.trim_start_matches([' ', '-']).len();
            if !line.trim().is_empty() && !line.trim_start().starts_with('#') {
                while indents.last().is_some_and(|&last| last >= indent) {
                    indents.pop();
                }
                indents.push(indent);
                if indents.len() > max {
                    return Some(indents.len());
                }
            }
        }
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match (quote, c) {
                (None, '#') => break,
                (None, '\'' | '"') => quote = Some(c),
                (Some('"'), '\\') => {
                    chars.next();
                }
                (Some(q), c) if c == q => quote = None,
                (None, '[' | '{') => {
                    flow += 1;
                    if flow + indents.len() > max {
                        return Some(flow + indents.len());
                    }
                }
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
        }
        // A single-quoted scalar cannot span lines in a config this simple; reset at the end.
        if quote == Some('\'') {
            quote = None;
        }
    }
    None
}

/// A value or message as an error shows it: at most a few hundred characters.
fn shorten(text: &str) -> String {
    const SHOWN: usize = 300;
    match text.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}… ({} bytes in all)", &text[..cut], text.len()),
        None => text.to_string(),
    }
}

/// The JSON Schema of devloop.yaml, generated from these types (`devloop schema`; committed as
/// `devloop.schema.json`, which editors read through prep's `yaml-language-server` line).
pub fn schema() -> String {
    let schema = schemars::schema_for!(Config);
    serde_json::to_string_pretty(&schema).expect("a schema serializes") + "\n"
}

/// The name of the schema file prep writes beside devloop.yaml.
pub const SCHEMA_FILE: &str = "devloop.schema.json";

/// A config error, located in its file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": ")?;
        if let Some(key) = &self.key {
            write!(f, "`{key}`: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read_bounded(path, MAX_CONFIG_BYTES).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: None,
            message: e.to_string(),
            hint: Some(match &e {
                ReadError::Io(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    format!("run devloop in the folder that holds {FILE_NAME}, or pass -f PATH")
                }
                ReadError::Io(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    "check the file's permissions (devloop only reads it)".into()
                }
                ReadError::NotRegular(_) => format!("{FILE_NAME} must be a regular file; pass -f PATH to name one"),
                ReadError::TooLarge { .. } => {
                    "a devloop.yaml is a few lines: move long exclude lists into .dockerignore or .gitignore".into()
                }
                ReadError::Io(_) | ReadError::NotUtf8 => {
                    format!("check that {} is the YAML file you meant", path.display())
                }
            }),
        })?;
        if let Some(depth) = too_deep(&text, MAX_NESTING) {
            return Err(ConfigError {
                file: path.to_path_buf(),
                line: None,
                key: None,
                message: format!("nested {depth} levels deep or more; at most {MAX_NESTING} are read"),
                hint: Some("devloop.yaml nests a few levels: check the file's brackets and indentation".into()),
            });
        }
        Config::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let config: Config = serde_yaml_ng::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line());
            let message = e.to_string();
            // serde_yaml_ng prefixes the key path ("sync.exclude: ..."); keep the rest as the message.
            let (key, message) = split_key(&message);
            let message = shorten(message.split(" at line ").next().unwrap_or(&message));
            ConfigError { file: path.to_path_buf(), line, key, hint: hint_for(&message), message }
        })?;
        config.validate(path, text)?;
        Ok(config)
    }

    fn validate(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let at = Locator { path, text };
        self.validate_patterns(&at)?;
        self.validate_commands(&at)?;
        if let Some(ready) = &self.ready {
            self.validate_ready(ready, &at)?;
        }
        self.validate_registry(&at)
    }

    fn validate_registry(&self, at: &Locator) -> Result<(), ConfigError> {
        let hint = "registry: auto, none, HOST[:PORT] (e.g. localhost:5000), or {push: HOST[:PORT], pull: HOST[:PORT]}";
        let hosts: Vec<&str> = match &self.registry {
            Registry::Named(word) if word == "auto" || word == "none" => vec![],
            Registry::Named(host) => vec![host],
            Registry::Hosts(hosts) => std::iter::once(hosts.push.as_str()).chain(hosts.pull.as_deref()).collect(),
        };
        for host in hosts {
            if !is_registry_host(host) {
                let message = format!("`{}` is not a registry host (HOST[:PORT][/PATH], no scheme)", shorten(host));
                return Err(at.error("registry", host, message, hint));
            }
        }
        Ok(())
    }

    /// The name, the globs and the exclude patterns.
    fn validate_patterns(&self, at: &Locator) -> Result<(), ConfigError> {
        if !is_dns_label(&self.name) {
            return Err(at.error(
                "name",
                &self.name,
                format!("`{}` is not a valid service name", shorten(&self.name)),
                "use lowercase letters, digits and `-`, at most 63 characters, starting and ending with a letter or digit",
            ));
        }
        for (key, globs) in [("rebuild", &self.rebuild), ("no_restart", &self.no_restart)] {
            for pattern in globs {
                if let Err(e) = glob(pattern) {
                    let message = format!("bad glob `{}`: {}", shorten(pattern), e.kind());
                    return Err(at.error(key, pattern, message, "globs look like `src/**/*.cs` or `Dockerfile*`"));
                }
            }
        }
        if self.sync.exclude.len() > MAX_EXCLUDES {
            let message = format!("{} patterns; at most {MAX_EXCLUDES} are taken", self.sync.exclude.len());
            let hint = "exclude whole folders (`bin/`) rather than each file, or list them in .dockerignore";
            return Err(at.error("sync.exclude", "", message, hint));
        }
        for pattern in &self.sync.exclude {
            let mut builder = ignore::gitignore::GitignoreBuilder::new("/");
            if let Err(e) = builder.add_line(None, pattern) {
                let hint = "patterns follow .gitignore syntax, e.g. `bin/` or `*.log`";
                return Err(at.error(
                    "sync.exclude",
                    pattern,
                    format!("bad pattern `{}`: {e}", shorten(pattern)),
                    hint,
                ));
            }
        }
        Ok(())
    }

    /// The app's command lines, how it stops, how secrets are named.
    fn validate_commands(&self, at: &Locator) -> Result<(), ConfigError> {
        for (key, argv) in [("run", &self.run), ("build", &self.build)] {
            if argv.iter().any(|a| a.is_empty()) {
                let hint = "write the command as a list: run: [dotnet, run]";
                return Err(at.error(key, "", "an argument of the command is empty".into(), hint));
            }
        }
        if !self.build.is_empty() && self.run.is_empty() {
            let message = "a build needs the app's `run` command".into();
            return Err(at.error("build", "", message, "add run: [your, command]"));
        }
        if self.secret_separator.is_empty() || self.secret_separator.contains(|c: char| c == '=' || c.is_whitespace()) {
            let message = format!("`{}` cannot join environment variable names", self.secret_separator);
            let hint = "use `__` (what .NET binds) or `_`";
            return Err(at.error("secret_separator", &self.secret_separator, message, hint));
        }
        if parse_duration(&self.grace).is_none() {
            let message = format!("`{}` is not a duration", self.grace);
            return Err(at.error(
                "grace",
                &self.grace,
                message,
                "write durations like 5s, 300ms or 2m (at most a week)",
            ));
        }
        Ok(())
    }

    fn validate_ready(&self, ready: &Ready, at: &Locator) -> Result<(), ConfigError> {
        let bad = |value: &str, message: String, hint: &str| at.error("ready", value, message, hint);
        match (&ready.http, &ready.tcp) {
            (Some(_), Some(_)) | (None, None) => {
                let hint = "ready: {tcp: 8080} or ready: {http: /health, port: 8080}";
                return Err(bad("", "give exactly one of `http` and `tcp`".into(), hint));
            }
            (Some(url), None) if !url.starts_with('/') && !url.starts_with("http://") => {
                let hint = "ready: {http: /health, port: 8080} or {http: http://127.0.0.1:8080/health}";
                return Err(bad(url, format!("`{url}` is neither a path nor an http:// URL"), hint));
            }
            (Some(url), None) if url.starts_with('/') && ready.port.is_none() => {
                return Err(bad(url, "a path needs the app's `port`".into(), "ready: {http: /health, port: 8080}"));
            }
            _ => {}
        }
        if parse_duration(&ready.timeout).is_none() {
            let message = format!("`{}` is not a duration", ready.timeout);
            let hint = "write durations like 60s or 2m (at most a week)";
            return Err(at.error("ready.timeout", &ready.timeout, message, hint));
        }
        if self.run.is_empty() {
            return Err(bad("", "a readiness check needs the app's `run` command".into(), "add run: [your, command]"));
        }
        Ok(())
    }
}

fn split_key(message: &str) -> (Option<String>, String) {
    match message.split_once(": ") {
        Some((key, rest)) if !key.contains(' ') && !key.is_empty() => (Some(key.to_string()), rest.to_string()),
        _ => (None, message.to_string()),
    }
}

fn hint_for(message: &str) -> Option<String> {
    if message.starts_with("unknown field") {
        Some("check the spelling; the keys are listed after `expected`".into())
    } else if message.starts_with("missing field") {
        Some("add the key; see README.md for an example devloop.yaml".into())
    } else if message.starts_with("invalid type") {
        Some("lists are written `[a, b]` or as `- a` lines".into())
    } else {
        None
    }
}

/// The first line mentioning both the key's last segment and the value (best effort for errors
/// found after parsing).
/// Locates a bad value in its file for the error.
struct Locator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    fn error(&self, key: &str, value: &str, message: String, hint: &str) -> ConfigError {
        ConfigError {
            file: self.path.to_path_buf(),
            line: line_of(self.text, key, value),
            key: Some(key.to_string()),
            message,
            hint: Some(hint.to_string()),
        }
    }
}

fn line_of(text: &str, key: &str, value: &str) -> Option<usize> {
    let last = key.rsplit('.').next().unwrap_or(key);
    let mut in_key = false;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with(&format!("{last}:")) {
            in_key = true;
            if value.is_empty() || line.contains(value) {
                return Some(i + 1);
            }
        } else if in_key && (value.is_empty() || line.contains(value)) {
            return Some(i + 1);
        }
    }
    // Flow style: `ready: {tcp: 1, timeout: 5s}`.
    let pattern = format!("{last}:");
    text.lines().position(|l| l.contains(&pattern) && l.contains(value)).map(|i| i + 1)
}

fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

fn glob(pattern: &str) -> Result<Glob, globset::Error> {
    globset::GlobBuilder::new(pattern).literal_separator(true).build()
}

/// A compiled list of globs, matched against relative paths.
#[derive(Clone, Debug)]
pub struct Globs {
    patterns: Vec<String>,
    set: GlobSet,
}

impl Globs {
    /// Patterns come from a validated [`Config`].
    pub fn new(patterns: &[String]) -> Globs {
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            builder.add(glob(pattern).expect("globs are validated when the config loads"));
        }
        Globs { patterns: patterns.to_vec(), set: builder.build().expect("validated globs build") }
    }

    /// The first pattern matching `path`.
    pub fn first_match(&self, path: &str) -> Option<&str> {
        self.set.matches(path).first().map(|&i| self.patterns[i].as_str())
    }

    pub fn is_match(&self, path: &str) -> bool {
        self.set.is_match(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("devloop.yaml"), text)
    }

    /// `./values.dev.yaml` is the file the watcher reports as `values.dev.yaml`: it redeploys
    /// and never syncs, like the default.
    #[test]
    fn values_files_named_with_a_leading_dot_slash_match_like_the_default() {
        let config = parse("name: web\nvalues: [./values.dev.yaml, ./secrets/more.yaml]\n").unwrap();
        assert_eq!(config.values_files(), ["values.dev.yaml", "secrets/more.yaml"]);
        let rules = Globs::new(&config.values_files());
        assert!(rules.first_match("values.dev.yaml").is_some());
        assert!(config.sync_excludes().contains(&"/values.dev.yaml".to_string()));
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let config = parse("name: producer\n").unwrap();
        assert_eq!(config.rebuild, ["Dockerfile*", "charts/**", "devloop.yaml"]);
        assert!(config.sync.exclude.is_empty());
    }

    #[test]
    fn full_config() {
        let config = parse(
            "name: web\nsync:\n  exclude: [bin/, obj/]\nrebuild: [Dockerfile.develop]\nno_restart:\n  - wwwroot/**\nrun: [dotnet, run]\n",
        )
        .unwrap();
        assert_eq!(config.sync.exclude, ["bin/", "obj/"]);
        assert_eq!(config.no_restart, ["wwwroot/**"]);
        assert_eq!(config.run, ["dotnet", "run"]);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse("name: web\nsync:\n  exclud: [bin/]\n").unwrap_err();
        assert_eq!(err.line, Some(3));
        let text = err.to_string();
        assert!(text.starts_with("devloop.yaml:3: "), "{text}");
        assert!(text.contains("unknown field `exclud`"), "{text}");
        assert!(text.contains("sync"), "{text}");
        assert!(err.hint.is_some());
    }

    #[test]
    fn bad_values_are_located() {
        let err = parse("name: Web_App\n").unwrap_err();
        assert_eq!((err.line, err.key.as_deref()), (Some(1), Some("name")));
        let err = parse("name: web\nrebuild:\n  - ok\n  - 'src/{a'\n").unwrap_err();
        assert_eq!((err.line, err.key.as_deref()), (Some(4), Some("rebuild")));
        let err = parse("name: web\nrun: dotnet run\n").unwrap_err();
        assert_eq!(err.line, Some(2));
        assert!(err.to_string().contains("run"), "{err}");
        let err = parse("").unwrap_err();
        assert!(err.to_string().contains("name"), "{err}");
    }

    #[test]
    fn the_registry_is_auto_none_a_host_or_push_and_pull_hosts() {
        assert_eq!(parse("name: web\n").unwrap().registry, Registry::Named("auto".into()));
        for good in ["none", "localhost:5000", "myregistry.azurecr.io/team-a", "10.0.0.1:5000"] {
            assert_eq!(
                parse(&format!("name: web\nregistry: {good}\n")).unwrap().registry,
                Registry::Named(good.into())
            );
        }
        let hosts = parse("name: web\nregistry: {push: 'registry:5000', pull: 'localhost:5000'}\n").unwrap().registry;
        let want = RegistryHosts { push: "registry:5000".into(), pull: Some("localhost:5000".into()), insecure: None };
        assert_eq!(hosts, Registry::Hosts(want));
        for bad in ["https://ghcr.io", "'reg:5000:1'", "'my reg'", "'reg:99999'", "'reg/UPPER'", "'{push: a b}'"] {
            let err = parse(&format!("name: web\nregistry: {bad}\n")).unwrap_err();
            assert_eq!((err.line, err.key.as_deref()), (Some(2), Some("registry")), "{bad}: {err}");
            assert!(err.hint.as_deref().unwrap().contains("HOST[:PORT]"), "{bad}: {err:?}");
        }
    }

    #[test]
    fn supervision_keys() {
        let config = parse(
            "name: web\nrun: [dotnet, run]\nbuild: [dotnet, build]\nready: {http: /health, port: 5000}\ngrace: 300ms\n",
        )
        .unwrap();
        assert_eq!(config.ready.unwrap().probe(), "http://127.0.0.1:5000/health");
        assert_eq!(parse_duration(&config.grace), Some(std::time::Duration::from_millis(300)));
        let config = parse("name: web\nrun: [x]\nready: {tcp: 8080}\n").unwrap();
        assert_eq!(config.ready.unwrap().probe(), "tcp:8080");
        let err = parse("name: web\nrun: [x]\nready: {http: /health}\n").unwrap_err();
        assert_eq!((err.line, err.key.as_deref()), (Some(3), Some("ready")));
        assert!(parse("name: web\nrun: [x]\nready: {tcp: 1, http: /}\n").is_err());
        assert!(parse("name: web\nready: {tcp: 1}\n").is_err());
        assert_eq!(parse("name: web\n").unwrap().secret_separator, "__");
        assert_eq!(parse("name: web\nsecret_separator: _\n").unwrap().secret_separator, "_");
        let err = parse("name: web\nsecret_separator: ' '\n").unwrap_err();
        assert_eq!((err.line, err.key.as_deref()), (Some(2), Some("secret_separator")));
        let err = parse("name: web\nrun: [x]\ngrace: soon\n").unwrap_err();
        assert_eq!(err.line, Some(3));
        let err = parse("name: web\nrun: [x]\nready: {tcp: 99999}\n").unwrap_err();
        assert_eq!(err.line, Some(3), "{err}");
    }

    #[test]
    fn globs_match_relative_paths() {
        let globs = Globs::new(&default_rebuild());
        assert_eq!(globs.first_match("Dockerfile.develop"), Some("Dockerfile*"));
        assert_eq!(globs.first_match("charts/web/values.yaml"), Some("charts/**"));
        assert_eq!(globs.first_match("src/Dockerfile"), None);
        assert_eq!(globs.first_match("devloop.yaml"), Some("devloop.yaml"));
    }

    /// The committed schema is the one the types give: CI fails when they part.
    #[test]
    fn the_committed_schema_is_the_generated_one() {
        assert!(
            schema() == include_str!("../devloop.schema.json"),
            "devloop.schema.json is stale: run `devloop schema > devloop.schema.json`"
        );
    }

    /// The schema and the loader agree: every example and every well-formed config the loader
    /// takes, the schema takes; every shape the loader refuses (unknown key, wrong type, no
    /// name), the schema refuses. (Names, globs and durations are the loader's alone.)
    #[test]
    fn the_schema_and_the_loader_agree() {
        let schema: serde_json::Value = serde_json::from_str(&schema()).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let valid = |text: &str| {
            let value: serde_json::Value = serde_yaml_ng::from_str(text).unwrap_or(serde_json::Value::Null);
            validator.is_valid(&value)
        };
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let mut taken = vec![
            "name: web\n".to_string(),
            "name: web\nrun: [x]\nready: {tcp: 8080}\n".into(),
            "name: web\nrun: [x]\nready: {http: /health, port: 5000, timeout: 5s}\n".into(),
            "name: web\nsecret_separator: _\nvalues: [./values.dev.yaml]\nbuild_args: {BASE: 'python:3.11'}\n".into(),
            "name: web\nbuilder: {node: n1, containerd: /run/k3s/containerd/containerd.sock}\nimage: reg/web:1\n"
                .into(),
        ];
        for entry in std::fs::read_dir(&examples).unwrap().flatten() {
            if let Ok(text) = std::fs::read_to_string(entry.path().join(FILE_NAME)) {
                taken.push(text);
            }
        }
        assert!(taken.len() >= 8, "the examples were read");
        for text in &taken {
            assert!(parse(text).is_ok(), "the loader takes:\n{text}");
            assert!(valid(text), "the schema takes:\n{text}");
        }
        for text in [
            "",
            "run: [x]\n",
            "name: web\nsync:\n  exclud: [bin/]\n",
            "name: web\nrun: dotnet run\n",
            "name: web\nport: http\n",
            "name: web\nport: 99999\n",
            "name: web\nready: {tcp: 1, timout: 5s}\n",
            "name: web\npublic: maybe\n",
            "name: web\nbuilder: {nodes: [a]}\n",
            "name: web\nbuild_args: {BASE: [a]}\n",
        ] {
            assert!(parse(text).is_err(), "the loader refuses:\n{text}");
            assert!(!valid(text), "the schema refuses:\n{text}");
        }
    }
}
