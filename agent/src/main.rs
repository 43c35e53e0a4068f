//! `devloop-agent`: the process inside the dev container.
//!
//! ```text
//! devloop-agent run [--root DIR] [--grace 5s] [--build 'ARGV'] [--ready PROBE] [--ready-timeout 60s]
//!                   [--stdio] [--wait] -- CMD...
//!     the container's main process: supervises CMD in its own process group, reaps orphans,
//!     forwards SIGTERM/SIGINT to the app and exits with its status. Restart requests come from
//!     `serve` sessions over ROOT/.devloop/agent.sock; with --stdio it also serves one protocol
//!     session on stdin/stdout itself (and stops when that session ends). --wait: start CMD only
//!     on the first restart request (the root is filled by the first sync).
//! devloop-agent serve --root DIR [--max-file-size BYTES]
//!     one protocol session on stdin/stdout, next to a running `devloop-agent run` (if any)
//! devloop-agent --version
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use devloop_agent::apply::DEFAULT_MAX_FILE_SIZE;
use devloop_agent::control::{self, Link};
use devloop_agent::index::Index;
use devloop_agent::probe::Probe;
use devloop_agent::protocol::{ProtocolError, PROTOCOL_VERSION};
use devloop_agent::reap::Reaper;
use devloop_agent::serve::{serve, ServeError, ServeOptions};
use devloop_agent::supervise::{SuperviseOptions, Supervisor};
use devloop_agent::units::parse_duration;
use tokio::signal::unix::{signal, SignalKind};

const USAGE: &str =
    "usage: devloop-agent run [--root DIR] [--grace 5s] [--build 'ARGV'] [--ready tcp:PORT|http://HOST:PORT/PATH]
                         [--ready-timeout 60s] [--stdio] [--wait] -- CMD...
       devloop-agent serve --root DIR [--max-file-size BYTES]
       devloop-agent --version";

enum Command {
    Serve { root: PathBuf, max_file_size: u64 },
    Run { options: SuperviseOptions, stdio: bool, max_file_size: u64 },
    Version,
}

fn parse() -> Result<Command, lexopt::Error> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_env();
    let mut sub: Option<String> = None;
    let mut root: Option<PathBuf> = None;
    let mut max_file_size = DEFAULT_MAX_FILE_SIZE;
    let mut grace = Duration::from_secs(5);
    let mut build = None;
    let mut ready = None;
    let mut ready_timeout = Duration::from_secs(60);
    let mut stdio = false;
    let mut wait = false;
    let mut command = Vec::new();
    while let Some(arg) = parser.next()? {
        match arg {
            Long("version") | Short('V') => return Ok(Command::Version),
            Long("help") | Short('h') => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            Long("root") => root = Some(parser.value()?.into()),
            Long("max-file-size") => max_file_size = parser.value()?.parse()?,
            Long("grace") => grace = duration(&parser.value()?.string()?)?,
            Long("build") => {
                let line = parser.value()?.string()?;
                let argv = shell_words::split(&line).map_err(|e| format!("--build: {e}"))?;
                build = (!argv.is_empty()).then_some(argv);
            }
            Long("ready") => ready = Some(Probe::parse(&parser.value()?.string()?)?),
            Long("ready-timeout") => ready_timeout = duration(&parser.value()?.string()?)?,
            Long("stdio") => stdio = true,
            Long("wait") => wait = true,
            Value(v) if sub.is_none() => sub = Some(v.string()?),
            Value(v) if sub.as_deref() == Some("run") => {
                command.push(v.string()?);
                command.extend(parser.raw_args()?.map(|a| a.to_string_lossy().into_owned()));
            }
            _ => return Err(arg.unexpected()),
        }
    }
    match sub.as_deref() {
        Some("serve") => {
            let root = root.ok_or("serve needs --root DIR")?;
            Ok(Command::Serve { root, max_file_size })
        }
        Some("run") => {
            if command.is_empty() {
                return Err("run needs the app's command after `--`".into());
            }
            let root = match root {
                Some(root) => root,
                None => std::env::current_dir().map_err(|e| e.to_string())?,
            };
            let options =
                SuperviseOptions { root, command, build, grace, ready, ready_timeout, start_now: !wait, echo: !stdio };
            Ok(Command::Run { options, stdio, max_file_size })
        }
        Some(other) => Err(format!("unknown command `{other}`").into()),
        None => Err("a command is needed".into()),
    }
}

fn duration(text: &str) -> Result<Duration, String> {
    parse_duration(text).ok_or_else(|| format!("`{text}` is not a duration of at most a week (use 5s, 300ms, 2m)"))
}

fn main() -> ExitCode {
    let command = match parse() {
        Ok(command) => command,
        Err(err) => {
            eprintln!("devloop-agent: error: {err}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Command::Version = command {
        println!("devloop-agent {} (protocol {PROTOCOL_VERSION})", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    init_tracing();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        match command {
            Command::Serve { root, max_file_size } => {
                let link = Link::Socket(control::socket_path(&root));
                let options = ServeOptions { root, max_file_size, link };
                report(serve(session_input(), tokio::io::stdout(), options).await)
            }
            Command::Run { options, stdio, max_file_size } => run(options, stdio, max_file_size).await,
            Command::Version => unreachable!("handled above"),
        }
    })
}

/// The session's input. A pipe — what every transport gives the agent: a local target's, a
/// Kubernetes exec's FIFO — is read through the runtime's own polling, straight into the frame;
/// tokio's `stdin` would read it on a blocking thread into a buffer of its own and copy it out
/// (a hand-off and a copy per read, a batch's 100 MB included). Anything else (a socket, a
/// terminal) is read as `stdin`.
fn session_input() -> Box<dyn tokio::io::AsyncRead + Send + Unpin> {
    use std::os::fd::AsFd;
    let pipe = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .and_then(|fd| tokio::net::unix::pipe::Receiver::from_file(std::fs::File::from(fd)));
    match pipe {
        Ok(pipe) => Box::new(pipe),
        Err(_) => Box::new(tokio::io::stdin()),
    }
}

async fn run(options: SuperviseOptions, stdio: bool, max_file_size: u64) -> ExitCode {
    let root = options.root.clone();
    let (reaper, mut term, mut int) =
        match (Reaper::start(), signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(reaper), Ok(term), Ok(int)) => (reaper, term, int),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                eprintln!("devloop-agent: error: cannot set up signal handling: {e}");
                return ExitCode::FAILURE;
            }
        };
    let supervisor = Supervisor::start(options, reaper);
    // With its own session (a local target) the agent lives for that session alone: no index.
    let index = (!stdio).then(|| Index::start(root.clone()));
    let _control = match control::listen(&root, supervisor.clone(), index) {
        Ok(task) => Some(task),
        Err(e) => {
            eprintln!("devloop-agent: warning: no control socket at {}: {e}", control::socket_path(&root).display());
            None
        }
    };
    let session = async {
        if stdio {
            let options = ServeOptions { root: root.clone(), max_file_size, link: Link::InProcess(supervisor.clone()) };
            Some(serve(session_input(), tokio::io::stdout(), options).await)
        } else {
            std::future::pending().await
        }
    };
    let (signal, session_result) = tokio::select! {
        _ = term.recv() => (libc::SIGTERM, None),
        _ = int.recv() => (libc::SIGINT, None),
        result = session => (libc::SIGTERM, result),
    };
    let code = supervisor.stop(signal).await;
    if let Some(result) = session_result {
        // The session (the CLI) is gone: this local agent's work is done.
        return report(result);
    }
    ExitCode::from(code.unwrap_or(0).clamp(0, 255) as u8)
}

fn report(result: Result<(), ServeError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("devloop-agent: error: {err}");
            if let ServeError::Protocol(ProtocolError::VersionMismatch { .. }) = err {
                eprintln!("hint: rebuild the dev image so its agent matches this devloop");
            }
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("DEVLOOP_AGENT_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}
