//! The pods of a service: how they are found (one label, spelled here only), which one is Ready,
//! why one is not, and when one is gone.

use futures_util::StreamExt;
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
    format!("phase {}", status.phase.clone().unwrap_or_else(|| "Unknown".into()))
}

/// Why no pod of a service can be used now.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("no pod labelled {selector} in namespace {namespace}")]
    NoPod { namespace: String, selector: String },
    #[error("pod {pod} is not Ready: {why}")]
    NotReady { pod: String, why: String },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

impl PodError {
    pub fn hint(&self) -> Option<String> {
        match self {
            PodError::NoPod { namespace, .. } => {
                Some(format!("deploy the service first, or pick its namespace with -n (now `{namespace}`)"))
            }
            PodError::NotReady { pod, .. } => Some(format!("`kubectl describe pod {pod}` says more")),
            PodError::Cluster(e) => e.hint(),
        }
    }
}

/// The service's pods, newest first, leaving out those being deleted.
pub async fn of_service(pods: &Api<Pod>, namespace: &str, name: &str) -> Result<Vec<Pod>, ClusterError> {
    let list = pods.list(&ListParams::default().labels(&selector(name))).await.map_err(|e| explain(e, namespace))?;
    let mut found: Vec<Pod> = list.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.metadata.creation_timestamp.clone()));
    Ok(found)
}

/// The newest Ready pod of the service.
pub async fn ready(pods: &Api<Pod>, namespace: &str, name: &str) -> Result<Pod, PodError> {
    let found = of_service(pods, namespace, name).await?;
    if let Some(pod) = found.iter().find(|p| is_ready(p)) {
        return Ok(pod.clone());
    }
    match found.first() {
        None => Err(PodError::NoPod { namespace: namespace.to_string(), selector: selector(name) }),
        Some(pod) => {
            Err(PodError::NotReady { pod: pod.metadata.name.clone().unwrap_or_default(), why: not_ready_reason(pod) })
        }
    }
}

/// Resolves when the pod `name` with `uid` is deleted, replaced (another uid) or no longer Ready.
pub async fn gone(pods: Api<Pod>, name: &str, uid: &str) {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(pods, config).boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                let same = pod.metadata.uid.as_deref() == Some(uid);
                if !same || pod.metadata.deletion_timestamp.is_some() || !is_ready(&pod) {
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
