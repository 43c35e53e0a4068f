//! `devloop list-up` and `devloop list-uris`: what devloop runs in a namespace.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Api, ListParams};

use super::access::{explain, ClusterError};
use super::pods;
use super::tunnel::SessionRecord;
use crate::report::{ServiceRow, UriRow};

/// The label on everything devloop's charts create (helm sets app.kubernetes.io/managed-by itself).
pub const MANAGED: &str = "devloop.dev/managed=true";
/// Annotation on a Deployment: when devloop last synced into its pod (RFC 3339).
pub const LAST_SYNC: &str = "devloop.dev/last-sync";

pub async fn services(client: &kube::Client, namespace: &str) -> Result<Vec<ServiceRow>, ClusterError> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = deployments.list(&ListParams::default().labels(MANAGED)).await.map_err(|e| explain(e, namespace))?;
    let mut rows = Vec::new();
    for deployment in list.items {
        let name = deployment.metadata.name.clone().unwrap_or_default();
        let label = deployment
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(pods::NAME_LABEL).cloned())
            .unwrap_or_else(|| name.clone());
        let image = deployment
            .spec
            .template
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.image.clone())
            .unwrap_or_default();
        let last_sync = deployment
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LAST_SYNC).cloned())
            .unwrap_or_else(|| "-".into());
        let found = pods::of_service(&pod_api, namespace, &label).await?;
        let restarts = found
            .iter()
            .flat_map(|p| p.status.iter().flat_map(|s| s.container_statuses.iter().flatten()))
            .map(|c| c.restart_count)
            .sum();
        let status = match found.first() {
            None => "no pod".to_string(),
            Some(pod) if pods::is_ready(pod) => "Running".to_string(),
            Some(pod) => pods::not_ready_reason(pod),
        };
        rows.push(ServiceRow { name, status, restarts, image, last_sync });
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(rows)
}

pub async fn uris(client: &kube::Client, namespace: &str) -> Result<Vec<UriRow>, ClusterError> {
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), namespace);
    let list = ingresses.list(&ListParams::default().labels(MANAGED)).await.map_err(|e| explain(e, namespace))?;
    let mut rows = Vec::new();
    for ingress in list.items {
        let name = ingress.metadata.name.clone().unwrap_or_default();
        let address = ingress
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .and_then(|i| i.first())
            .and_then(|i| i.ip.clone().or_else(|| i.hostname.clone()));
        let hosts: Vec<String> = ingress
            .spec
            .as_ref()
            .and_then(|s| s.rules.as_ref())
            .map(|rules| rules.iter().filter_map(|r| r.host.clone()).collect())
            .unwrap_or_default();
        let (url, address, status) = match (hosts.first(), address) {
            (_, None) => {
                ("Pending".to_string(), "-".to_string(), format!("Pending: {}", why_pending(client, &ingress).await))
            }
            (host, Some(address)) => {
                let url = format!("http://{}/", host.unwrap_or(&address));
                (url, address, unserved(client, namespace, &ingress).await.unwrap_or_else(|| "Available".into()))
            }
        };
        rows.push(UriRow { name, url, kind: "public".into(), address, status });
    }
    for record in SessionRecord::live(namespace) {
        for url in record.urls {
            let (name, kind) = (record.name.clone(), "tunnel".to_string());
            rows.push(UriRow { name, url, kind, address: "127.0.0.1".into(), status: "Available".into() });
        }
    }
    Ok(rows)
}

/// Why requests to an ingress that has an address would fail: a Service behind it with no Ready
/// endpoint (its pods are not Ready, or there are none).
async fn unserved(client: &kube::Client, namespace: &str, ingress: &Ingress) -> Option<String> {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let services: std::collections::BTreeSet<String> = ingress
        .spec
        .as_ref()?
        .rules
        .iter()
        .flatten()
        .filter_map(|r| r.http.as_ref())
        .flat_map(|h| h.paths.iter())
        .filter_map(|p| p.backend.service.as_ref().map(|s| s.name.clone()))
        .collect();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    for service in services {
        let selector = format!("kubernetes.io/service-name={service}");
        let found = slices.list(&ListParams::default().labels(&selector)).await.ok()?;
        let ready = found
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .any(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false));
        if !ready {
            return Some(format!(
                "no ready endpoints: Service {service} has no Ready pod behind it (`devloop list-up` says why)"
            ));
        }
    }
    None
}

/// Whether an IngressClass is the cluster's default (what an Ingress naming no class gets).
pub fn is_default_class(class: &IngressClass) -> bool {
    const DEFAULT: &str = "ingressclass.kubernetes.io/is-default-class";
    class.metadata.annotations.as_ref().and_then(|a| a.get(DEFAULT)).is_some_and(|v| v == "true")
}

/// Why an ingress has no address yet: no class to serve it, a class no controller runs, or a
/// controller that has not published one.
async fn why_pending(client: &kube::Client, ingress: &Ingress) -> String {
    let classes: Api<IngressClass> = Api::all(client.clone());
    let named = ingress.spec.as_ref().and_then(|s| s.ingress_class_name.clone());
    let Ok(list) = classes.list(&ListParams::default()).await else {
        return "no address yet (the ingress controller has not published one)".into();
    };
    match named {
        None if !list.items.iter().any(is_default_class) => {
            "no address: the ingress names no class and the cluster has no default IngressClass (is an ingress controller installed?)".into()
        }
        None => "no address yet: no controller has published one for it".into(),
        Some(class) => match list.items.iter().find(|c| c.metadata.name.as_deref() == Some(class.as_str())) {
            None => format!("no address: IngressClass {class} does not exist (is its ingress controller installed?)"),
            Some(found) => {
                let controller = found.spec.as_ref().and_then(|s| s.controller.clone()).unwrap_or_default();
                format!("no address yet: the controller of class {class} ({controller}) has not published one (is it running?)")
            }
        },
    }
}

/// Marks the service's Deployment with the time of the last sync (metadata only: no rollout).
pub async fn mark_synced(client: &kube::Client, namespace: &str, name: &str) {
    use kube::api::{Patch, PatchParams};
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({"metadata": {"annotations": {LAST_SYNC: now}}});
    let _ = deployments.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await;
}
