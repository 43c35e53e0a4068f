use std::process::ExitCode;

use clap::Parser;
use devloop::cli::{Cli, Command, Global};
use devloop::cluster::{self, Selection};
use devloop::report::{Event, Reporter};
use devloop::session::{Outcome, Session};
use devloop::settings::{self, Target};
use devloop::transport::{find_agent, CommandTransport, KubeTransport, Transport};
use devloop::up;
use devloop::{list, prep, tunnel};

/// Exit code when a rebuild trigger changed (the loop cannot go on with a stale image).
const EXIT_REBUILD: u8 = 3;

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    init_tracing(cli.global.verbose);
    let reporter = Reporter::new(cli.global.json, cli.global.verbose > 0);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(run(cli, reporter.clone()));
    match result {
        Ok(code) => code,
        Err((message, hint)) => {
            reporter.emit(Event::Error { message, hint });
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, reporter: Reporter) -> Result<ExitCode, (String, Option<String>)> {
    match cli.command {
        Command::Prep(args) => {
            let dir = std::env::current_dir().map_err(|e| (format!("cannot read the current folder: {e}"), None))?;
            let (stack, name) = prep::detect(&dir).map_err(|e| (e.to_string(), e.hint()))?;
            let options = prep::PrepOptions { public: args.public, port: args.port, force: args.force };
            let files = prep::files(&stack, &name, &options);
            let done = prep::write(&dir, &files, args.force).map_err(|e| (e.to_string(), e.hint()))?;
            for (path, outcome) in done {
                let outcome = match outcome {
                    prep::Outcome::Written => "wrote",
                    prep::Outcome::Overwritten => "rewrote",
                    prep::Outcome::Skipped => "skipped",
                };
                reporter.emit(Event::File { path: path.display().to_string(), outcome: outcome.into() });
            }
            reporter.emit(Event::Prepared { stack: stack.label().into(), name });
            Ok(ExitCode::SUCCESS)
        }
        Command::Up(args) => {
            let settings = settings::watch(&cli.global.file, None, args.once).map_err(|e| (e.to_string(), e.hint()))?;
            reporter.set_service(&settings.config.name);
            let (client, namespace) =
                cluster::connect(&selection(&cli.global)).await.map_err(|e| (e.to_string(), e.hint()))?;
            let release = up::Release::new(&settings.config, &settings.session.root, &namespace)
                .map_err(|e| (e.to_string(), e.hint()))?;
            reporter.emit(Event::Deploying { release: release.name.clone(), namespace: namespace.clone() });
            let started = std::time::Instant::now();
            up::deploy(&release, cli.global.kubeconfig.as_deref(), cli.global.context.as_deref())
                .await
                .map_err(|e| (e.to_string(), e.hint()))?;
            up::wait_rollout(&client, &release, std::time::Duration::from_secs(300))
                .await
                .map_err(|e| (e.to_string(), e.hint()))?;
            reporter
                .emit(Event::RolledOut { release: release.name.clone(), millis: started.elapsed().as_millis() as u64 });
            mark_syncs(&reporter, &client, &namespace, &release.name);
            let transport = KubeTransport::new(client.clone(), &namespace, &settings.config.name);
            // While `up` runs: a localhost tunnel to the app, recorded for `list-uris`.
            let mut _tunnel = None;
            let mut _record = None;
            if !settings.once {
                let remote = settings.config.port.unwrap_or(80);
                let pods = kube::Api::namespaced(client.clone(), &namespace);
                let selector = format!("app.kubernetes.io/name={}", settings.config.name);
                let tunnel = tunnel::open(pods, selector, remote, remote)
                    .await
                    .map_err(|e| (format!("cannot open a localhost tunnel: {e}"), None))?;
                let url = format!("http://localhost:{}/", tunnel.local);
                reporter.emit(Event::Tunnel { url: url.clone(), remote_port: remote });
                _record = tunnel::SessionRecord {
                    name: settings.config.name.clone(),
                    namespace: namespace.clone(),
                    pid: std::process::id(),
                    urls: vec![url],
                }
                .publish();
                _tunnel = Some(tunnel);
            }
            follow(settings, Box::new(transport), reporter).await
        }
        Command::ListUp => {
            let (client, namespace) =
                cluster::connect(&selection(&cli.global)).await.map_err(|e| (e.to_string(), e.hint()))?;
            let rows = list::services(&client, &namespace).await.map_err(|e| (e.to_string(), e.hint()))?;
            let rows = rows
                .into_iter()
                .map(|r| {
                    let cells = vec![
                        r.name.clone(),
                        r.status.clone(),
                        r.restarts.to_string(),
                        r.image.clone(),
                        r.last_sync.clone(),
                    ];
                    (cells, Event::Service(r))
                })
                .collect();
            reporter.table(&["NAME", "STATUS", "RESTARTS", "IMAGE", "LAST SYNC"], rows);
            Ok(ExitCode::SUCCESS)
        }
        Command::ListUris => {
            let (client, namespace) =
                cluster::connect(&selection(&cli.global)).await.map_err(|e| (e.to_string(), e.hint()))?;
            let rows = list::uris(&client, &namespace).await.map_err(|e| (e.to_string(), e.hint()))?;
            let rows = rows
                .into_iter()
                .map(|r| (vec![r.name.clone(), r.url.clone(), r.kind.clone()], Event::Uri(r)))
                .collect();
            reporter.table(&["NAME", "URL", "KIND"], rows);
            Ok(ExitCode::SUCCESS)
        }
        Command::Down => {
            let (config, root) = settings::load_config(&cli.global.file).map_err(|e| (e.to_string(), e.hint()))?;
            let (_, namespace) =
                cluster::connect(&selection(&cli.global)).await.map_err(|e| (e.to_string(), e.hint()))?;
            let release = up::Release::new(&config, &root, &namespace).map_err(|e| (e.to_string(), e.hint()))?;
            up::remove(&release, cli.global.kubeconfig.as_deref(), cli.global.context.as_deref())
                .await
                .map_err(|e| (e.to_string(), e.hint()))?;
            reporter.emit(Event::Removed { release: release.name, namespace });
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch(args) => {
            let settings = settings::watch(&cli.global.file, args.target.as_deref(), args.once)
                .map_err(|e| (e.to_string(), e.hint()))?;
            reporter.set_service(&settings.config.name);
            let transport: Box<dyn Transport> = match &settings.target {
                Target::Local(dir) => Box::new(CommandTransport::local(&find_agent(), dir, &settings.config)),
                Target::Command(argv) => Box::new(CommandTransport::new(argv.clone())),
                Target::Kubernetes => {
                    let selection = Selection {
                        kubeconfig: cli.global.kubeconfig.clone(),
                        context: cli.global.context.clone(),
                        namespace: cli.global.namespace.clone(),
                    };
                    let (client, namespace) =
                        cluster::connect(&selection).await.map_err(|e| (e.to_string(), e.hint()))?;
                    Box::new(KubeTransport::new(client, &namespace, &settings.config.name))
                }
            };
            follow(settings, transport, reporter).await
        }
    }
}

/// Runs the sync session until it ends: `--once` done, Ctrl+C, or a rebuild trigger.
async fn follow(
    settings: settings::WatchSettings,
    transport: Box<dyn Transport>,
    reporter: Reporter,
) -> Result<ExitCode, (String, Option<String>)> {
    let session = Session::new(settings.session, transport, reporter).map_err(|e| (e.to_string(), e.hint()))?;
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = stop.send(true);
        }
    });
    match session.run(settings.once, shutdown).await {
        Ok(Outcome::Synced | Outcome::Stopped) => Ok(ExitCode::SUCCESS),
        Ok(Outcome::RebuildNeeded { .. }) => Ok(ExitCode::from(EXIT_REBUILD)),
        Err(e) => Err((e.to_string(), e.hint())),
    }
}

/// After each applied batch, the Deployment is annotated with the time (shown by `list-up`).
fn mark_syncs(reporter: &Reporter, client: &kube::Client, namespace: &str, name: &str) {
    let (client, namespace, name) = (client.clone(), namespace.to_string(), name.to_string());
    reporter.observe(move |event| {
        if let Event::Applied { .. } = event {
            let (client, namespace, name) = (client.clone(), namespace.clone(), name.clone());
            tokio::spawn(async move { list::mark_synced(&client, &namespace, &name).await });
        }
    });
}

fn selection(global: &Global) -> Selection {
    Selection {
        kubeconfig: global.kubeconfig.clone(),
        context: global.context.clone(),
        namespace: global.namespace.clone(),
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
