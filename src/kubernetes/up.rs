//! The `up`, `down`, `list-up` and `list-uris` flows: deploy the release, wait for the rollout,
//! open the localhost tunnel, then hand the service's pod to the sync session.

use std::time::{Duration, Instant};

use super::access::{self, Selection};
use super::exec::KubeTransport;
use super::release::{self, Release};
use super::{list, tunnel};
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

/// `devloop up [--once]`.
pub async fn up(global: &Global, once: bool, reporter: Reporter) -> Result<Outcome, Error> {
    let settings = settings::watch(&global.file, None, once)?;
    reporter.set_service(&settings.config.name);
    let (client, namespace) = access::connect(&selection(global)).await?;
    let release = Release::new(&settings.config, &settings.session.root, &namespace)?;
    reporter.emit(Event::Deploying { release: release.name.clone(), namespace: namespace.clone() });
    let started = Instant::now();
    release::deploy(&release, global.kubeconfig.as_deref(), global.context.as_deref()).await?;
    release::wait_rollout(&client, &release, ROLLOUT_TIMEOUT).await?;
    reporter.emit(Event::RolledOut { release: release.name.clone(), millis: started.elapsed().as_millis() as u64 });
    mark_syncs(&reporter, &client, &namespace, &release.name);
    let transport = KubeTransport::new(client.clone(), &namespace, &settings.config.name);
    // While `up` runs: a localhost tunnel to the app, recorded for `list-uris`.
    let _tunnel =
        if settings.once { None } else { Some(open_tunnel(&settings, &client, &namespace, &reporter).await?) };
    crate::sync::run(settings, Box::new(transport), reporter).await
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
    let (_, namespace) = access::connect(&selection(global)).await?;
    let release = Release::new(&config, &root, &namespace)?;
    release::remove(&release, global.kubeconfig.as_deref(), global.context.as_deref()).await?;
    reporter.emit(Event::Removed { release: release.name, namespace });
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
