//! The `up`, `down`, `list-up` and `list-uris` flows: deploy the release, wait for the rollout,
//! open the localhost tunnel, then hand the service's pod to the sync session.

use std::time::{Duration, Instant};

use super::access::{self, Selection};
use super::exec::KubeTransport;
use super::release::{self, Release, Rollout};
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
///
/// Ctrl+C (or SIGTERM) ends it within [`STOP_GRACE`] wherever it is: a session stops by itself
/// (keeping its caches); a build, helm, the rollout wait or a broken devloop.yaml are dropped,
/// which kills helm and the build's `buildctl`.
pub async fn up(global: &Global, once: bool, reporter: Reporter) -> Result<Outcome, Error> {
    let mut stop = crate::sync::stop_signal();
    let phase = Phase::default();
    // Boxed, so that dropping it below really ends it (helm killed, `buildctl` queued to stop).
    let mut flow = Box::pin(up_flow(global, once, reporter.clone(), phase.clone()));
    tokio::select! {
        result = &mut flow => return result,
        _ = stop.wait_for(|stop| *stop) => {}
    }
    if let Ok(result) = tokio::time::timeout(STOP_GRACE, &mut flow).await {
        return result;
    }
    drop(flow);
    build::cleanup(Duration::from_millis(400)).await;
    if let Some(note) = phase.interrupted_note(global) {
        reporter.emit(Event::Error { message: note.0, hint: Some(note.1) });
    }
    Ok(Outcome::Stopped)
}

/// How long a stopping `up` lets its current step end by itself before dropping it.
const STOP_GRACE: Duration = Duration::from_millis(1000);

/// What `up` is doing, for the note an interruption leaves.
#[derive(Clone, Default)]
struct Phase(std::sync::Arc<std::sync::Mutex<Option<String>>>);

impl Phase {
    /// Marks that the release `name` is being upgraded by helm (`None`: it is not).
    fn helm(&self, name: Option<&str>) {
        *self.0.lock().expect("phase") = name.map(str::to_owned);
    }

    /// What to tell the user when `up` was stopped in the middle of a helm upgrade.
    fn interrupted_note(&self, global: &Global) -> Option<(String, String)> {
        let name = self.0.lock().expect("phase").clone()?;
        let namespace = global.namespace.as_deref().map(|ns| format!(" -n {ns}")).unwrap_or_default();
        Some((
            format!("stopped while helm was upgrading release {name}: it may be left half-made (pending-upgrade)"),
            format!(
                "run `devloop up` again, or `helm rollback {name}{namespace}` to go back to its last good revision"
            ),
        ))
    }
}

async fn up_flow(global: &Global, once: bool, reporter: Reporter, phase: Phase) -> Result<Outcome, Error> {
    let settings = settings::watch(&global.file, None, once)?;
    reporter.set_service(&settings.config.name);
    let (client, namespace) = access::connect(&selection(global)).await?;
    let deployer = Deployer { global, client: &client, namespace: &namespace, reporter: &reporter, phase: &phase };
    deployer.deploy(&settings).await?;
    mark_syncs(&reporter, &client, &namespace, &settings.config.name);
    // While `up` runs: a localhost tunnel to the app, recorded for `list-uris`.
    let mut tunnel = match once {
        true => None,
        false => Some(open_tunnel(&settings, &client, &namespace, &reporter).await?),
    };
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
        // A `port:` or `name:` change gets a tunnel of its own.
        if let Some((open, _)) = &tunnel {
            if open.remote != settings.config.port.unwrap_or(80) || open.name != settings.config.name {
                // The old one lets go of its port first: the new one may want the same.
                drop(tunnel.take());
                tunnel = Some(open_tunnel(&settings, &client, &namespace, &reporter).await?);
            }
        }
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
        if let Err(e) = deployer.deploy(&settings).await {
            // The running pod keeps serving; the next change tries again.
            reporter.emit(Event::Error { message: e.to_string(), hint: e.hint() });
        }
        current = settings::watch(&global.file, None, once).ok();
    }
}

/// What every deploy of one `up` works with.
struct Deployer<'a> {
    global: &'a Global,
    client: &'a kube::Client,
    namespace: &'a str,
    reporter: &'a Reporter,
    phase: &'a Phase,
}

impl Deployer<'_> {
    /// Builds the dev image when the config names none, deploys the release, waits for the
    /// rollout. A deploy input (a build input, the chart, a values file, devloop.yaml) edited
    /// while this ran is deployed at once, before any session: no edit waits for the next one.
    async fn deploy(&self, settings: &WatchSettings) -> Result<(), Error> {
        let mut reloaded;
        let mut settings = settings;
        loop {
            let before = deploy_inputs(&settings.config, &settings.session.root).await;
            self.deploy_once(settings).await?;
            let after = deploy_inputs(&settings.config, &settings.session.root).await;
            let Some(path) = first_difference(&before, &after) else { return Ok(()) };
            self.reporter.emit(Event::Rebuilding { path, reason: "edited while the last deploy ran".into() });
            reloaded = settings::watch(&self.global.file, None, settings.once)?;
            settings = &reloaded;
        }
    }

    async fn deploy_once(&self, settings: &WatchSettings) -> Result<(), Error> {
        let Deployer { global, client, namespace, reporter, phase } = *self;
        let release = Release::new(&settings.config, &settings.session.root, namespace)?;
        let dev = match release.image {
            Some(_) => None,
            None => {
                Some(build::dev_image(client, namespace, &settings.config, &settings.session.root, reporter).await?)
            }
        };
        reporter.emit(Event::Deploying { release: release.name.clone(), namespace: namespace.to_string() });
        let started = Instant::now();
        phase.helm(Some(&release.name));
        let deployed =
            release::deploy(&release, dev.as_ref(), global.kubeconfig.as_deref(), global.context.as_deref()).await;
        phase.helm(None);
        deployed?;
        let millis = || started.elapsed().as_millis() as u64;
        match release::wait_rollout(client, &release, ROLLOUT_TIMEOUT, true).await? {
            Rollout::Done => reporter.emit(Event::RolledOut { release: release.name.clone(), millis: millis() }),
            // A dev pod whose app crashes still gets the session: the fix must reach it.
            Rollout::AppNotReady { pod, why, last_lines } => reporter.emit(Event::RolledOutNotReady {
                release: release.name.clone(),
                pod,
                why,
                last_lines,
                millis: millis(),
            }),
        }
        Ok(())
    }
}

/// What a deploy is made of, path by path: the build inputs (docker's build context), the
/// chart, the values files and devloop.yaml. Unreadable parts count as absent.
async fn deploy_inputs(config: &crate::config::Config, root: &std::path::Path) -> devloop_agent::manifest::Manifest {
    let (config, root) = (config.clone(), root.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let mut inputs = build::build_inputs(&config, &root).unwrap_or_default();
        let mut files: Vec<String> = config.values_files();
        files.push(crate::config::FILE_NAME.into());
        if let Some(chart) = &config.chart {
            chart_files(&root, chart.trim_end_matches('/'), &mut files);
        }
        for file in files {
            // Opened as config files are: a FIFO in the chart is not waited on.
            let opened = devloop_agent::beneath::open_named_file(&root.join(&file)).map_err(|e| e.into_io());
            if let Ok((hash, size)) = opened.and_then(|o| devloop_agent::walk::hash_reader(o.file)) {
                inputs.insert(file, devloop_agent::manifest::Entry::File { hash, size, exec: false });
            }
        }
        inputs
    })
    .await
    .unwrap_or_default()
}

/// The files under the folder `rel` of `root` (a chart: a few files, a few levels).
fn chart_files(root: &std::path::Path, rel: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(root.join(rel)) else { return };
    for entry in entries.flatten() {
        let path = format!("{rel}/{}", entry.file_name().to_string_lossy());
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => chart_files(root, &path, out),
            Ok(kind) if kind.is_file() => out.push(path),
            _ => {}
        }
    }
}

/// The first path whose entry differs between two manifests.
fn first_difference(a: &devloop_agent::manifest::Manifest, b: &devloop_agent::manifest::Manifest) -> Option<String> {
    let changed = a.iter().find(|(path, entry)| b.get(*path) != Some(entry)).map(|(path, _)| path.clone());
    changed.or_else(|| b.keys().find(|path| !a.contains_key(*path)).cloned())
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
    let name = settings.config.name.clone();
    let tunnel = tunnel::open(client.clone(), namespace.to_string(), name.clone(), remote, remote)
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
    let rows = rows
        .into_iter()
        .map(|r| {
            (vec![r.name.clone(), r.url.clone(), r.kind.clone(), r.address.clone(), r.status.clone()], Event::Uri(r))
        })
        .collect();
    reporter.table(&["NAME", "URL", "KIND", "ADDRESS", "STATUS"], rows);
    Ok(())
}

/// The transport of `devloop watch` with no `--target`: the service's pod.
pub async fn transport(global: &Global, name: &str) -> Result<KubeTransport, Error> {
    let (client, namespace) = access::connect(&selection(global)).await?;
    Ok(KubeTransport::new(client, &namespace, name))
}

/// After each applied batch, and when a session finds the pod up to date, the Deployment is
/// annotated with the time (`list-up`'s LAST SYNC).
fn mark_syncs(reporter: &Reporter, client: &kube::Client, namespace: &str, name: &str) {
    let (client, namespace, name) = (client.clone(), namespace.to_string(), name.to_string());
    reporter.observe(move |event| {
        if let Event::Applied { .. } | Event::UpToDate { .. } = event {
            let (client, namespace, name) = (client.clone(), namespace.clone(), name.clone());
            tokio::spawn(async move { list::mark_synced(&client, &namespace, &name).await });
        }
    });
}
