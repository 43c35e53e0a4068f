//! The pods of a service: how they are found (one label, spelled here only), which one a session
//! attaches to, which container is the app's, why one is not usable, and when one is gone.
//!
//! A session follows the newest *running* pod of the Deployment's current ReplicaSet, Ready or
//! not: an app that crashed leaves its pod NotReady, and the fix must still reach it (the agent,
//! PID 1 of the dev container, keeps the container alive). Pods of older ReplicaSets are never
//! chosen, so after a rollout a session or a tunnel attaches only to the new pods.

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::watcher;

use super::access::{explain, ClusterError};

/// The label that names a service's pods (set by devloop's charts).
pub const NAME_LABEL: &str = "app.kubernetes.io/name";

/// The label selector of service `name`'s pods.
pub fn selector(name: &str) -> String {
    format!("{NAME_LABEL}={name}")
}

/// The label a Deployment's ReplicaSet puts on its pods.
const TEMPLATE_HASH: &str = "pod-template-hash";
/// The annotation that names a pod's main container when it has several (sidecars).
pub const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

/// The app's container of a pod of service `name`: the one the pod's default-container
/// annotation names, else the one named after the service (prep's charts), else the first.
pub fn dev_container(pod: &Pod, name: &str) -> Option<String> {
    let containers = &pod.spec.as_ref()?.containers;
    let annotated = pod.metadata.annotations.as_ref().and_then(|a| a.get(DEFAULT_CONTAINER));
    annotated
        .filter(|wanted| containers.iter().any(|c| &&c.name == wanted))
        .cloned()
        .or_else(|| containers.iter().find(|c| c.name == name).map(|c| c.name.clone()))
        .or_else(|| containers.first().map(|c| c.name.clone()))
}

/// Whether the pod runs, its app's container too (Ready or not), and is not being deleted.
pub fn is_running(pod: &Pod, name: &str) -> bool {
    let Some(container) = dev_container(pod, name) else { return false };
    pod.metadata.deletion_timestamp.is_none()
        && pod.status.as_ref().is_some_and(|status| {
            status.phase.as_deref() == Some("Running")
                && status
                    .container_statuses
                    .iter()
                    .flatten()
                    .any(|c| c.name == container && c.state.as_ref().is_some_and(|state| state.running.is_some()))
        })
}

/// Whether the pod reports the Ready condition.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Why a pod is not Ready, in the words `kubectl describe` would use.
pub fn not_ready_reason(pod: &Pod) -> String {
    let Some(status) = &pod.status else { return "it has no status yet".into() };
    for container in status.container_statuses.iter().flatten() {
        if let Some(waiting) = container.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = waiting.reason.clone().unwrap_or_else(|| "Waiting".into());
            let message = waiting.message.clone().unwrap_or_default();
            return format!("container {} is {reason} {message}", container.name).trim().to_string();
        }
    }
    let phase = status.phase.clone().unwrap_or_else(|| "Unknown".into());
    if phase == "Running" && !is_ready(pod) {
        let unready = status.conditions.iter().flatten().find(|c| c.type_ == "ContainersReady" && c.status != "True");
        let detail = unready.and_then(|c| c.message.clone()).unwrap_or_default();
        return format!("running, but the readiness probe fails {detail}").trim().to_string();
    }
    format!("phase {phase}")
}

/// Why no pod of a service can be used now.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("no pod labelled {selector} in namespace {namespace}")]
    NoPod { namespace: String, selector: String },
    #[error("pod {pod} is not Ready: {why}")]
    NotReady { namespace: String, pod: String, why: String },
    #[error("pod {pod} is not running: {why}")]
    NotRunning { namespace: String, pod: String, why: String },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

impl PodError {
    pub fn hint(&self) -> Option<String> {
        match self {
            PodError::NoPod { namespace, .. } => {
                Some(format!("deploy the service first, or pick its namespace with -n (now `{namespace}`)"))
            }
            PodError::NotReady { namespace, pod, .. } | PodError::NotRunning { namespace, pod, .. } => {
                Some(format!("`kubectl describe pod {pod} -n {namespace}` says more"))
            }
            PodError::Cluster(e) => e.hint(),
        }
    }
}

/// The service's pods, newest first, leaving out those being deleted.
pub async fn of_service(pods: &Api<Pod>, namespace: &str, name: &str) -> Result<Vec<Pod>, ClusterError> {
    list_newest_first(pods, namespace, &selector(name)).await
}

async fn list_newest_first(pods: &Api<Pod>, namespace: &str, labels: &str) -> Result<Vec<Pod>, ClusterError> {
    let list = pods.list(&ListParams::default().labels(labels)).await.map_err(|e| explain(e, namespace))?;
    let mut found: Vec<Pod> = list.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.metadata.creation_timestamp.clone()));
    Ok(found)
}

/// The `pod-template-hash` of the current ReplicaSet of Deployment `name` (the one whose
/// revision is the Deployment's), `None` when there is no such Deployment or it has none yet.
pub async fn current_template(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Option<String>, ClusterError> {
    // A user allowed pods but not Deployments or ReplicaSets (a `watch`-only role) chooses among
    // all the service's pods, as before rollouts were followed.
    let forbidden = |e: &kube::Error| matches!(e, kube::Error::Api(status) if status.code == 403);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let deployment = match deployments.get_opt(name).await {
        Ok(Some(deployment)) => deployment,
        Ok(None) => return Ok(None),
        Err(e) if forbidden(&e) => return Ok(None),
        Err(e) => return Err(explain(e, namespace)),
    };
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace);
    let sets = match replica_sets.list(&ListParams::default().labels(&selector(name))).await {
        Ok(sets) => sets,
        Err(e) if forbidden(&e) => return Ok(None),
        Err(e) => return Err(explain(e, namespace)),
    };
    Ok(current_of(&deployment, &sets.items))
}

/// Of `sets`, the current ReplicaSet of `deployment`'s (owned by it, at its revision): its
/// pod-template-hash.
pub fn current_of(deployment: &Deployment, sets: &[ReplicaSet]) -> Option<String> {
    const REVISION: &str = "deployment.kubernetes.io/revision";
    let uid = deployment.metadata.uid.as_deref()?;
    let revision = deployment.metadata.annotations.as_ref()?.get(REVISION)?;
    sets.iter()
        .filter(|rs| rs.metadata.owner_references.iter().flatten().any(|o| o.uid == uid))
        .find(|rs| rs.metadata.annotations.as_ref().and_then(|a| a.get(REVISION)) == Some(revision))
        .and_then(|rs| rs.metadata.labels.as_ref()?.get(TEMPLATE_HASH).cloned())
}

/// The pods of the service's current ReplicaSet, newest first (all of the service's pods when
/// they belong to no Deployment).
pub async fn current(client: &kube::Client, namespace: &str, name: &str) -> Result<Vec<Pod>, ClusterError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let labels = match current_template(client, namespace, name).await? {
        Some(hash) => format!("{},{TEMPLATE_HASH}={hash}", selector(name)),
        None => selector(name),
    };
    list_newest_first(&pods, namespace, &labels).await
}

/// The pod a session attaches to: the newest running pod of the service's current ReplicaSet.
pub async fn attachable(client: &kube::Client, namespace: &str, name: &str) -> Result<Pod, PodError> {
    let found = current(client, namespace, name).await?;
    pick(&found, namespace, name, &[&|p| is_running(p, name)], not_running)
}

/// The pod a tunnel connection goes to: a Ready pod of the current ReplicaSet when there is one
/// (it answers), else the one a session would attach to.
pub async fn serving(client: &kube::Client, namespace: &str, name: &str) -> Result<Pod, PodError> {
    let found = current(client, namespace, name).await?;
    let ready_and_running = |p: &Pod| is_ready(p) && is_running(p, name);
    pick(&found, namespace, name, &[&ready_and_running, &|p| is_running(p, name)], not_running)
}

/// The newest Ready pod of the service.
pub async fn ready(pods: &Api<Pod>, namespace: &str, name: &str) -> Result<Pod, PodError> {
    let found = of_service(pods, namespace, name).await?;
    pick(&found, namespace, name, &[&is_ready], |namespace, pod, why| PodError::NotReady { namespace, pod, why })
}

fn not_running(namespace: String, pod: String, why: String) -> PodError {
    PodError::NotRunning { namespace, pod, why }
}

/// Of `found` (newest first), the first pod the first of `wanted` accepts, else the next of
/// `wanted`, and so on; none → no pod at all, or `refused` naming the newest and why.
fn pick(
    found: &[Pod],
    namespace: &str,
    name: &str,
    wanted: &[&dyn Fn(&Pod) -> bool],
    refused: fn(String, String, String) -> PodError,
) -> Result<Pod, PodError> {
    if let Some(pod) = wanted.iter().find_map(|accept| found.iter().find(|p| accept(p))) {
        return Ok(pod.clone());
    }
    match found.first() {
        None => Err(PodError::NoPod { namespace: namespace.to_string(), selector: selector(name) }),
        Some(pod) => {
            Err(refused(namespace.to_string(), pod.metadata.name.clone().unwrap_or_default(), not_ready_reason(pod)))
        }
    }
}

/// What ends a session or tunnel on a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Until {
    /// Deleted, replaced, or its app container no longer running (a NotReady app is fine).
    Stopped,
    /// Also when it is no longer Ready (the builder).
    NotReady,
}

/// Resolves when the pod `pod` with `uid` is deleted, replaced (another uid), or stops as
/// `until` says; it is a pod of service `service`.
pub async fn gone(pods: Api<Pod>, pod: &str, uid: &str, service: &str, until: Until) {
    let config = watcher::Config::default().fields(&format!("metadata.name={pod}"));
    let mut events = watcher(pods, config).boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(found) | watcher::Event::InitApply(found)) => {
                let same = found.metadata.uid.as_deref() == Some(uid);
                let stopped = match until {
                    Until::Stopped => !is_running(&found, service),
                    Until::NotReady => !is_ready(&found),
                };
                if !same || found.metadata.deletion_timestamp.is_some() || stopped {
                    return;
                }
            }
            Ok(watcher::Event::Delete(_)) => return,
            Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
            // The API server is unreachable: the exec itself will tell; the watcher retries.
            Err(_) => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, running: bool, ready: bool) -> Pod {
        let state = if running {
            serde_json::json!({"running": {}})
        } else {
            serde_json::json!({"waiting": {"reason": "ContainerCreating"}})
        };
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"containers": [{"name": "web"}]},
            "status": {
                "phase": if running { "Running" } else { "Pending" },
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                "containerStatuses": [{"name": "web", "image": "x", "imageID": "", "ready": ready, "restartCount": 0, "state": state}]
            }
        }))
        .unwrap()
    }

    /// A session takes the newest running pod, Ready or not; a tunnel connection a Ready one
    /// first (it answers), else the same; neither takes a pod whose container does not run.
    #[test]
    fn sessions_take_running_pods_and_tunnels_prefer_ready_ones() {
        let running = |p: &Pod| is_running(p, "web");
        let ready_and_running = |p: &Pod| is_ready(p) && is_running(p, "web");
        let found = [pod("new-crashed", true, false), pod("old-serving", true, true)];
        let session = pick(&found, "ns", "web", &[&running], not_running).unwrap();
        assert_eq!(session.metadata.name.as_deref(), Some("new-crashed"));
        let tunnel = pick(&found, "ns", "web", &[&ready_and_running, &running], not_running).unwrap();
        assert_eq!(tunnel.metadata.name.as_deref(), Some("old-serving"));
        let starting = [pod("starting", false, false)];
        let err = pick(&starting, "ns", "web", &[&running], not_running).unwrap_err();
        assert!(matches!(&err, PodError::NotRunning { pod, .. } if pod == "starting"), "{err}");
        let none = pick(&[], "ns", "web", &[&running], not_running).unwrap_err();
        assert!(matches!(none, PodError::NoPod { .. }));
    }
}
