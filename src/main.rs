use std::process::ExitCode;

use clap::Parser;
use devloop::cli::Cli;
use devloop::report::{Event, Reporter};

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    init_tracing(cli.global.verbose);
    let reporter = Reporter::new(cli.global.json, cli.global.verbose > 0);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    match runtime.block_on(devloop::commands::run(cli.command, cli.global, reporter.clone())) {
        Ok(code) => code,
        Err(err) => {
            reporter.emit(Event::Error { message: err.to_string(), hint: err.hint() });
            ExitCode::FAILURE
        }
    }
}

/// glibc gives each thread that allocates its own arena; the scan, pack and runtime threads would
/// each keep megabytes of freed memory. Two arenas keep the watcher's RSS close to its live data.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 | 1 => "warn",
        2 => "devloop=debug,devloop_agent=debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}
