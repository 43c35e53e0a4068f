//! `devloop-agent`: the process inside the dev container.
//!
//! ```text
//! devloop-agent serve --root DIR [--max-file-size BYTES]   one protocol session on stdin/stdout
//! devloop-agent --version
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use devloop_agent::apply::DEFAULT_MAX_FILE_SIZE;
use devloop_agent::protocol::PROTOCOL_VERSION;
use devloop_agent::serve::{serve, ServeOptions};

const USAGE: &str = "usage: devloop-agent serve --root DIR [--max-file-size BYTES]
       devloop-agent --version";

enum Command {
    Serve(ServeOptions),
    Version,
}

fn parse() -> Result<Command, lexopt::Error> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_env();
    let mut sub = None;
    let mut root: Option<PathBuf> = None;
    let mut max_file_size = DEFAULT_MAX_FILE_SIZE;
    while let Some(arg) = parser.next()? {
        match arg {
            Long("version") | Short('V') => return Ok(Command::Version),
            Long("help") | Short('h') => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            Long("root") => root = Some(parser.value()?.into()),
            Long("max-file-size") => max_file_size = parser.value()?.parse()?,
            Value(v) if sub.is_none() => sub = Some(v.string()?),
            _ => return Err(arg.unexpected()),
        }
    }
    match sub.as_deref() {
        Some("serve") => {
            let root = root.ok_or("serve needs --root DIR")?;
            Ok(Command::Serve(ServeOptions { root, max_file_size }))
        }
        Some(other) => Err(format!("unknown command `{other}`").into()),
        None => Err("a command is needed".into()),
    }
}

fn main() -> ExitCode {
    let command = match parse() {
        Ok(command) => command,
        Err(err) => {
            eprintln!("devloop-agent: error: {err}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Version => {
            println!("devloop-agent {} (protocol {PROTOCOL_VERSION})", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Serve(options) => {
            init_tracing();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            let result = runtime.block_on(serve(tokio::io::stdin(), tokio::io::stdout(), options));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("devloop-agent: error: {err}");
                    if let devloop_agent::serve::ServeError::Protocol(
                        devloop_agent::protocol::ProtocolError::VersionMismatch { .. },
                    ) = err
                    {
                        eprintln!("hint: rebuild the dev image so its agent matches this devloop");
                    }
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("DEVLOOP_AGENT_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}
