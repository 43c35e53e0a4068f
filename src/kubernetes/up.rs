//! The `up`, `down`, `list-up` and `list-uris` flows: deploy the release, wait for the rollout,
//! open the localhost tunnel, then hand the service's pod to the sync session.

use std::time::{Duration, Instant};

use super::access::{self, Selection};
use super::exec::KubeTransport;
use super::release::{self, Release};
use super::{build, list, tunnel};
use crate::cli::settings::{self, WatchSettings};
use crate::cli::Global;
use crate::error::Error;
use crate::report::{Event, Reporter};
use crate::sync::session::Outcome;

/// How long `up` waits for the release to roll out.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(300);

/// The cluster selection of the global flags.
pub fn selection(global: &Global) -> Selection {
    Selection {
        kubeconfig: global.kubeconfig.clone(),
        context: global.context.clone(),
        namespace: global.namespace.clone(),
    }
}

/// `devloop up [--once]`: the dev image built in the cluster (unless `image:` names one),
/// the release deployed and rolled out, a localhost tunnel, then the sync session on the pod.
/// While it runs, a change to a build input rebuilds the image and upgrades the release, a chart
/// or values change upgrades it, a devloop.yaml change reloads it; a failed build or upgrade
/// leaves the running pod serving and the loop watching.
pub async fn up(global: &Global, once: bool, reporter: Reporter) -> Result<Outcome, Error> {
    let settings = settings::watch(&global.file, None, once)?;
    reporter.set_service(&settings.config.name);
    let (client, namespace) = access::connect(&selection(global)).await?;
    deploy(global, &client, &namespace, &settings, &reporter).await?;
    mark_syncs(&reporter, &client, &namespace, &settings.config.name);
    // While `up` runs: a localhost tunnel to the app, recorded for `list-uris`.
    let _tunnel = if once { None } else { Some(open_tunnel(&settings, &client, &namespace, &reporter).await?) };
    let mut current = Some(settings);
    // Sessions in a row that broke off as they began.
    let mut broken = 0;
    loop {
        let settings = match current.take() {
            Some(settings) => settings,
            // A broken devloop.yaml keeps the loop waiting for a fix (the error says what is wrong).
            None => match settings::watch(&global.file, None, once) {
                Ok(settings) => settings,
                Err(e) => {
                    reporter.emit(Event::Error { message: e.to_string(), hint: e.hint() });
                    wait_for_a_change(&global.file).await;
                    continue;
                }
            },
        };
        let transport = KubeTransport::new(client.clone(), &namespace, &settings.config.name);
        let outcome = match crate::sync::run(settings, Box::new(transport), reporter.clone()).await {
            Ok(outcome) => outcome,
            // The pod went away under a session that had just begun (a rollout's old pod): the
            // next session connects to the pod of the moment.
            Err(Error::Session(e)) if e.is_recoverable() && broken < 5 => {
                broken += 1;
                reporter.emit(Event::Disconnected { reason: e.to_string() });
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        broken = 0;
        let Outcome::RebuildNeeded { path, .. } = &outcome else { return Ok(outcome) };
        if once {
            return Ok(outcome);
        }
        let config = settings::load_config(&global.file).map(|(c, _)| c).ok();
        reporter.emit(Event::Rebuilding { path: path.clone(), reason: trigger_reason(config.as_ref(), path).into() });
        let Ok(settings) = settings::watch(&global.file, None, once) else { continue };
        if let Err(e) = deploy(global, &client, &namespace, &settings, &reporter).await {
            // The running pod keeps serving; the next change tries again.
            reporter.emit(Event::Error { message: e.to_string(), hint: e.hint() });
        }
        current = Some(settings);
    }
}

/// Builds the dev image when the config names none, deploys the release, waits for the rollout.
async fn deploy(
    global: &Global,
    client: &kube::Client,
    namespace: &str,
    settings: &WatchSettings,
    reporter: &Reporter,
) -> Result<(), Error> {
    let release = Release::new(&settings.config, &settings.session.root, namespace)?;
    let dev = match release.image {
        Some(_) => None,
        None => Some(build::dev_image(client, namespace, &settings.config, &settings.session.root, reporter).await?),
    };
    reporter.emit(Event::Deploying { release: release.name.clone(), namespace: namespace.to_string() });
    let started = Instant::now();
    release::deploy(&release, dev.as_ref(), global.kubeconfig.as_deref(), global.context.as_deref()).await?;
    release::wait_rollout(client, &release, ROLLOUT_TIMEOUT).await?;
    reporter.emit(Event::RolledOut { release: release.name.clone(), millis: started.elapsed().as_millis() as u64 });
    Ok(())
}

/// Why a changed path needs more than a sync.
fn trigger_reason(config: Option<&crate::config::Config>, path: &str) -> &'static str {
    if path == crate::config::FILE_NAME {
        return "reloading the config";
    }
    let Some(config) = config else { return "rebuilding the image" };
    let chart = config.chart.as_deref().map(|c| format!("{}/", c.trim_end_matches('/')));
    if chart.is_some_and(|c| path.starts_with(&c)) || config.values_files().iter().any(|v| v == path) {
        "upgrading the release"
    } else {
        "a build input: rebuilding the image"
    }
}

/// Waits until the config file changes (after an error in it).
async fn wait_for_a_change(file: &std::path::Path) {
    let stamp = |f: &std::path::Path| std::fs::metadata(f).and_then(|m| m.modified()).ok();
    let before = stamp(file);
    while stamp(file) == before {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The tunnel and its record; both end when dropped.
async fn open_tunnel(
    settings: &WatchSettings,
    client: &kube::Client,
    namespace: &str,
    reporter: &Reporter,
) -> Result<(tunnel::Tunnel, Option<tunnel::RecordGuard>), Error> {
    let remote = settings.config.port.unwrap_or(80);
    let pods = kube::Api::namespaced(client.clone(), namespace);
    let name = settings.config.name.clone();
    let tunnel = tunnel::open(pods, namespace.to_string(), name.clone(), remote, remote)
        .await
        .map_err(|e| Error::Other { message: format!("cannot open a localhost tunnel: {e}"), hint: None })?;
    let url = format!("http://localhost:{}/", tunnel.local);
    reporter.emit(Event::Tunnel { url: url.clone(), remote_port: remote });
    let record =
        tunnel::SessionRecord { name, namespace: namespace.to_string(), pid: std::process::id(), urls: vec![url] }
            .publish();
    Ok((tunnel, record))
}

/// `devloop down`.
pub async fn down(global: &Global, reporter: &Reporter) -> Result<(), Error> {
    let (config, root) = settings::load_config(&global.file)?;
    let (client, namespace) = access::connect(&selection(global)).await?;
    let release = Release::new(&config, &root, &namespace)?;
    release::remove(&release, global.kubeconfig.as_deref(), global.context.as_deref()).await?;
    reporter.emit(Event::Removed { release: release.name, namespace: namespace.clone() });
    // The builder goes too when no service of this namespace uses it any more.
    if build::remove_if_unused(&client, &namespace).await? {
        reporter.emit(Event::Removed { release: build::BUILDER.into(), namespace });
    }
    Ok(())
}

/// `devloop list-up`.
pub async fn list_up(global: &Global, reporter: &Reporter) -> Result<(), Error> {
    let (client, namespace) = access::connect(&selection(global)).await?;
    let rows = list::services(&client, &namespace).await?;
    let rows = rows
        .into_iter()
        .map(|r| {
            let cells =
                vec![r.name.clone(), r.status.clone(), r.restarts.to_string(), r.image.clone(), r.last_sync.clone()];
            (cells, Event::Service(r))
        })
        .collect();
    reporter.table(&["NAME", "STATUS", "RESTARTS", "IMAGE", "LAST SYNC"], rows);
    Ok(())
}

/// `devloop list-uris`.
pub async fn list_uris(global: &Global, reporter: &Reporter) -> Result<(), Error> {
    let (client, namespace) = access::connect(&selection(global)).await?;
    let rows = list::uris(&client, &namespace).await?;
    let rows = rows.into_iter().map(|r| (vec![r.name.clone(), r.url.clone(), r.kind.clone()], Event::Uri(r))).collect();
    reporter.table(&["NAME", "URL", "KIND"], rows);
    Ok(())
}

/// The transport of `devloop watch` with no `--target`: the service's pod.
pub async fn transport(global: &Global, name: &str) -> Result<KubeTransport, Error> {
    let (client, namespace) = access::connect(&selection(global)).await?;
    Ok(KubeTransport::new(client, &namespace, name))
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
