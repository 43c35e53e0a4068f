//! A byte stream to an agent. The session sees only `AsyncRead + AsyncWrite`; what is at the other
//! end (a child process, a command such as `podman exec -i`, a Kubernetes exec) is the business of
//! the [`Transport`] alone. This module holds the trait and the command transports; the Kubernetes
//! one lives in `kubernetes::exec`, beyond the sync core.

use std::future::Future;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::process::{Child, Command};

use crate::config::Config;

pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// One open stream to an agent. Dropping it ends the session (and kills a child process).
pub struct Connection {
    pub reader: Reader,
    pub writer: Writer,
    pub child: Option<Child>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot start `{program}`: {source}")]
    Spawn { program: String, source: std::io::Error },
    /// The far end cannot be reached now (no Ready pod, the API server refused, ...), as its
    /// transport explains it.
    #[error("{message}")]
    Unavailable {
        message: String,
        hint: Option<String>,
        /// Retrying cannot help (401/403, no such namespace): the reconnect loop stops.
        permanent: bool,
    },
}

impl TransportError {
    /// Retrying cannot help (401/403, no such namespace, no such program): a reconnect loop
    /// says so and stops instead of trying forever.
    pub fn is_permanent(&self) -> bool {
        match self {
            TransportError::Spawn { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            TransportError::Unavailable { permanent, .. } => *permanent,
        }
    }

    pub fn hint(&self) -> Option<String> {
        match self {
            TransportError::Spawn { program, source } if source.kind() == std::io::ErrorKind::NotFound => {
                Some(format!(
                    "`{program}` is not on PATH; install it, or set DEVLOOP_AGENT to the agent binary for local targets"
                ))
            }
            TransportError::Spawn { .. } => None,
            TransportError::Unavailable { hint, .. } => hint.clone(),
        }
    }
}

pub type ConnectFuture<'a> = Pin<Box<dyn Future<Output = Result<Connection, TransportError>> + Send + 'a>>;

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn connect(&self) -> ConnectFuture<'_> {
        (**self).connect()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

pub trait Transport: Send + Sync {
    /// Opens a new stream to an agent that is about to speak the protocol.
    fn connect(&self) -> ConnectFuture<'_>;
    /// For messages: where the stream goes.
    fn describe(&self) -> String;
}

/// Any command whose stdin/stdout reach `devloop-agent serve`.
#[derive(Clone, Debug)]
pub struct CommandTransport {
    argv: Vec<String>,
    label: String,
}

impl CommandTransport {
    pub fn new(argv: Vec<String>) -> CommandTransport {
        let label = shell_words::join(&argv);
        CommandTransport { argv, label }
    }

    /// The agent as a child process serving a local folder. With a `run` command in the config
    /// the same process also supervises the app (`devloop-agent run --stdio`), starting it after
    /// the first sync; without one it only syncs (`devloop-agent serve`).
    pub fn local(agent: &Path, root: &Path, config: &Config) -> CommandTransport {
        let mut argv = vec![agent.display().to_string()];
        if config.run.is_empty() {
            argv.extend(["serve".into(), "--root".into(), root.display().to_string()]);
        } else {
            argv.extend(["run".into(), "--stdio".into(), "--wait".into(), "--root".into(), root.display().to_string()]);
            argv.extend(["--grace".into(), config.grace.clone()]);
            if !config.build.is_empty() {
                argv.extend(["--build".into(), shell_words::join(&config.build)]);
            }
            if let Some(ready) = &config.ready {
                argv.extend(["--ready".into(), ready.probe(), "--ready-timeout".into(), ready.timeout.clone()]);
            }
            argv.push("--".into());
            argv.extend(config.run.iter().cloned());
        }
        CommandTransport { argv, label: format!("local:{}", root.display()) }
    }
}

/// The size asked for the pipe into a command transport (see [`CommandTransport::connect`]).
const PIPE_SIZE: usize = 1 << 20;

impl Transport for CommandTransport {
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(async move {
            // In a process group of its own: Ctrl+C in a terminal signals the whole foreground
            // group, and an agent that died of it at the same moment made devloop report a broken
            // stream (and a reconnect) on its way out. devloop alone gets the signal, says
            // goodbye, and the agent ends its side (stopping the app it supervises); should
            // devloop die, the agent's stdin closes and it ends the same way.
            let mut child = Command::new(&self.argv[0])
                .args(&self.argv[1..])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .map_err(|source| TransportError::Spawn { program: self.argv[0].clone(), source })?;
            let writer = child.stdin.take().expect("piped stdin");
            // A batch streams through this pipe: a larger one lets each side run longer before
            // the other must (64 KiB is Linux's default; 1 MiB any process may ask for). Best
            // effort: the default serves too.
            let _ = rustix::pipe::fcntl_setpipe_size(writer.as_fd(), PIPE_SIZE);
            let reader = child.stdout.take().expect("piped stdout");
            Ok(Connection { reader: Box::new(reader), writer: Box::new(writer), child: Some(child) })
        })
    }

    fn describe(&self) -> String {
        self.label.clone()
    }
}

/// Where the agent binary for local targets is: `$DEVLOOP_AGENT`, next to this executable, or PATH.
pub fn find_agent() -> PathBuf {
    if let Some(path) = std::env::var_os("DEVLOOP_AGENT") {
        return PathBuf::from(path);
    }
    if let Ok(exe) = std::env::current_exe() {
        let sibling = exe.with_file_name("devloop-agent");
        if sibling.is_file() {
            return sibling;
        }
    }
    PathBuf::from("devloop-agent")
}
