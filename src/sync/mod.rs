//! The sync core: a local folder kept equal to the agent's, one round at a time.
//!
//! ```text
//! watch ─► scan ─► diff ─► classify ─► pack ─► client ─► (transport) ─► agent
//! hints    Tree    Changes  Plan       tar     frames     bytes
//!                                                  Applied ─► baseline (fold)
//! ```
//!
//! Architecture invariant: nothing here knows Kubernetes. The far end is a [`transport::Transport`]
//! (a byte stream); the Kubernetes one lives in `crate::kubernetes`, which the compiler keeps out
//! of this room (`cargo check --no-default-features` builds the sync core alone).

pub mod baseline;
pub mod classify;
pub mod client;
pub mod diff;
pub mod pack;
pub mod scan;
pub mod session;
pub mod transport;
pub mod watch;

use std::time::Duration;

use devloop_agent::filter::FilterError;
use devloop_agent::protocol::ProtocolError;

use self::pack::PackError;
use self::session::{Outcome, Session};
use self::transport::TransportError;
use self::watch::WatchError;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("talking to the agent: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the agent stopped: {0}")]
    Agent(String),
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("no answer from the agent for {0:?}: the connection (or the cluster) is unreachable")]
    Silent(Duration),
    #[error("{0}")]
    App(String),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error("the target does not equal the source: {count} path{} could not be synced (`{first}` first; each is named above)", if *.count == 1 { "" } else { "s" })]
    Unequal { count: usize, first: String },
}

impl SessionError {
    /// Worth a reconnect: the stream broke, the agent went away or stalled.
    pub fn is_recoverable(&self) -> bool {
        match self {
            SessionError::Protocol(e) => e.is_disconnect(),
            SessionError::Pack(_) | SessionError::Timeout(_) | SessionError::Silent(_) => true,
            SessionError::Agent(_)
            | SessionError::App(_)
            | SessionError::Transport(_)
            | SessionError::Watch(_)
            | SessionError::Filter(_)
            | SessionError::Unequal { .. } => false,
        }
    }

    pub fn hint(&self) -> Option<String> {
        match self {
            SessionError::Protocol(ProtocolError::VersionMismatch { .. }) => Some(
                "the agent and this devloop come from different versions: rebuild the dev image (or put the matching devloop-agent on the target)".into(),
            ),
            SessionError::Protocol(ProtocolError::NoPeer { .. } | ProtocolError::NoHandshake { .. }) => Some(
                "the target did not start `devloop-agent serve`: check that the agent is installed there (Dockerfile.develop copies it into the dev image; rebuild the image) and that the command is right".into(),
            ),
            SessionError::Transport(e) => e.hint(),
            SessionError::App(_) => Some("the app's own output above says why; fix it and run again".into()),
            SessionError::Unequal { .. } => Some(
                "make those paths readable, or exclude them (sync.exclude in devloop.yaml, .dockerignore), and run again".into(),
            ),
            _ => None,
        }
    }
}

/// Runs a sync session to its end: `--once` done, Ctrl+C, or a rebuild trigger.
pub async fn run(
    settings: crate::cli::settings::WatchSettings,
    transport: Box<dyn transport::Transport>,
    reporter: crate::report::Reporter,
) -> Result<Outcome, crate::error::Error> {
    let session = Session::new(settings.session, transport, reporter)?;
    Ok(session.run(settings.once, stop_signal()).await?)
}

/// Turns true on Ctrl+C or SIGTERM (an IDE or `kill` stopping devloop). One handler for the
/// whole process, installed on first use: once tokio handles SIGINT the default (ending the
/// process) is gone, so every wait of every command must watch this, never a handler of its own
/// that a later phase would not see.
pub fn stop_signal() -> tokio::sync::watch::Receiver<bool> {
    static STOP: std::sync::OnceLock<tokio::sync::watch::Receiver<bool>> = std::sync::OnceLock::new();
    STOP.get_or_init(|| {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let terminated = async {
                match term.as_mut() {
                    Some(term) => term.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminated => {}
            }
            let _ = stop.send(true);
        });
        stopped
    })
    .clone()
}
