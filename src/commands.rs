//! One function per command: the dispatch of `main`.

use std::process::ExitCode;

use crate::cli::settings::{self, Target};
use crate::cli::{Command, Global};
use crate::error::Error;
use crate::report::Reporter;
use crate::sync::session::Outcome;
use crate::sync::transport::{find_agent, CommandTransport, Transport};

/// Exit code when a rebuild trigger changed (the loop cannot go on with a stale image).
pub const EXIT_REBUILD: u8 = 3;

pub async fn run(command: Command, global: Global, reporter: Reporter) -> Result<ExitCode, Error> {
    match command {
        Command::Prep(args) => Ok(crate::prep::run(&args, &reporter).map(|()| ExitCode::SUCCESS)?),
        Command::Watch(args) => {
            let settings = settings::watch(&global.file, args.target.as_deref(), args.once)?;
            reporter.set_service(&settings.config.name);
            let transport: Box<dyn Transport> = match &settings.target {
                Target::Local(dir) => Box::new(CommandTransport::local(&find_agent(), dir, &settings.config)),
                Target::Command(argv) => Box::new(CommandTransport::new(argv.clone())),
                Target::Kubernetes => kubernetes_transport(&global, &settings.config.name).await?,
            };
            crate::sync::run(settings, transport, reporter).await.map(exit_code)
        }
        #[cfg(feature = "kubernetes")]
        Command::Up(args) => crate::kubernetes::up::up(&global, args.once, reporter).await.map(exit_code),
        #[cfg(feature = "kubernetes")]
        Command::Down => crate::kubernetes::up::down(&global, &reporter).await.map(|()| ExitCode::SUCCESS),
        #[cfg(feature = "kubernetes")]
        Command::ListUp => crate::kubernetes::up::list_up(&global, &reporter).await.map(|()| ExitCode::SUCCESS),
        #[cfg(feature = "kubernetes")]
        Command::ListUris => crate::kubernetes::up::list_uris(&global, &reporter).await.map(|()| ExitCode::SUCCESS),
        #[cfg(feature = "kubernetes")]
        Command::Doctor => Ok(match crate::kubernetes::doctor::run(&global, &reporter).await {
            true => ExitCode::SUCCESS,
            false => ExitCode::FAILURE,
        }),
        #[cfg(not(feature = "kubernetes"))]
        Command::Up(_) | Command::Down | Command::ListUp | Command::ListUris | Command::Doctor => Err(no_kubernetes()),
        Command::Completions { shell } => {
            let mut command = <crate::cli::Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "devloop", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema => {
            print!("{}", crate::config::schema());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            let command = <crate::cli::Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(command)
                .render(&mut std::io::stdout())
                .map_err(|e| Error::Other { message: format!("cannot write the manual: {e}"), hint: None })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn exit_code(outcome: Outcome) -> ExitCode {
    match outcome {
        Outcome::Synced | Outcome::Stopped => ExitCode::SUCCESS,
        Outcome::RebuildNeeded { .. } => ExitCode::from(EXIT_REBUILD),
    }
}

#[cfg(feature = "kubernetes")]
async fn kubernetes_transport(global: &Global, name: &str) -> Result<Box<dyn Transport>, Error> {
    Ok(Box::new(crate::kubernetes::up::transport(global, name).await?))
}

#[cfg(not(feature = "kubernetes"))]
async fn kubernetes_transport(_: &Global, _: &str) -> Result<Box<dyn Transport>, Error> {
    Err(no_kubernetes())
}

#[cfg(not(feature = "kubernetes"))]
fn no_kubernetes() -> Error {
    Error::Other {
        message: "this devloop was built without Kubernetes support".into(),
        hint: Some(
            "build it with the default features (`cargo build --release`), or use --target local:DIR or cmd:…".into(),
        ),
    }
}
