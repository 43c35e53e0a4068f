//! Command-line definitions only; [`settings`] turns them into validated settings.

pub mod settings;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "devloop",
    version = version(),
    about = "The inner loop for services on Kubernetes: edit, sync by content, restart."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct Global {
    /// Machine-readable output: one JSON event a line on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// More output (-v: debug events, -vv: tracing debug, -vvv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// The config file; its folder is the root that syncs.
    #[arg(short = 'f', long = "file", global = true, default_value = "devloop.yaml", value_name = "PATH")]
    pub file: PathBuf,
    /// The kubeconfig file (else $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (else its current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The namespace (else the context's, else `default`).
    #[arg(short = 'n', long, global = true, value_name = "NAME")]
    pub namespace: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Detect the folder's stack and write Dockerfile, Dockerfile.develop, a Helm chart and
    /// devloop.yaml (existing files are kept unless --force).
    Prep(PrepArgs),
    /// Deploy the chart (helm), wait for the rollout, sync, restart, and keep syncing until Ctrl+C.
    Up(UpArgs),
    /// Sync the folder into a running agent and keep it in sync until Ctrl+C.
    Watch(WatchArgs),
    /// Remove what `up` created (the helm release).
    Down,
    /// Services of this namespace managed by devloop: name, pod status, restarts, image, last sync.
    ListUp,
    /// Public URLs (ingress; Pending until it has an address) and the localhost tunnels of running `up`s.
    ListUris,
    /// Check that `up` can work here (cluster, namespace, rights, Pod Security, nodes, helm, the
    /// static agent, inotify, the tree) and say what to do where not. Exit 0 when it can.
    Doctor,
    /// Print shell completions (bash, zsh, fish, powershell, elvish) to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to stdout: `devloop man > devloop.1`.
    Man,
    /// Print the JSON Schema of devloop.yaml (what `prep` writes as devloop.schema.json).
    Schema,
}

/// `devloop --version`: the version, the agent protocol it speaks, and the commit it was built from.
pub fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        format!(
            "{} (agent protocol {}, commit {})",
            env!("CARGO_PKG_VERSION"),
            devloop_agent::protocol::PROTOCOL_VERSION,
            option_env!("DEVLOOP_GIT_COMMIT").unwrap_or("unknown")
        )
    })
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Where the agent is: `local:DIR` (the agent as a child process serving DIR) or
    /// `cmd:COMMAND LINE` (any command whose stdin/stdout reach `devloop-agent serve`).
    /// Without it: this service's pod in the cluster (label app.kubernetes.io/name; the newest
    /// running pod of its current rollout, Ready or not).
    #[arg(long, value_name = "TARGET")]
    pub target: Option<String>,
    /// Sync once and exit: 0 when the target equals the source, non-zero otherwise.
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, Args)]
pub struct PrepArgs {
    /// Give the service a public ingress.
    #[arg(long)]
    pub public: bool,
    /// The port the app listens on (default: the stack's usual one).
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// Rewrite files that already exist.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Deploy, sync, restart, wait until the app is ready, then exit: 0 when ready.
    #[arg(long)]
    pub once: bool,
}
