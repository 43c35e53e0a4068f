//! Where a dev image goes: into the builder's node's image store (no registry; the pod pinned
//! there), or to a registry the builder pushes to and every node pulls from. A registry comes from
//! devloop.yaml (`registry:`) or from the cluster, which publishes it the KEP-1755 way: ConfigMap
//! `kube-public/local-registry-hosting`, key `localRegistryHosting.v1` (as kind, k3d, minikube
//! and ctlptl write it; Tilt reads it the same way).
//!
//! ```text
//! registry: none ────────────────► the node's store, pod pinned, imagePullPolicy: Never
//! registry: HOST / {push, pull} ─► builder pushes to push, pods pull pull/NS/NAME:TAG@DIGEST
//! registry: auto (default) ──────► the published registry if any (hostFromClusterNetwork to
//!                                  push, hostFromContainerRuntime to pull), else the node
//! ```

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;

use super::access::{explain, ClusterError};
use crate::config::Registry as Setting;

/// The ConfigMap of KEP-1755, and its key.
pub const HOSTING_NAMESPACE: &str = "kube-public";
pub const HOSTING_NAME: &str = "local-registry-hosting";
const HOSTING_KEY: &str = "localRegistryHosting.v1";

/// Where the dev image goes, and why (shown by `up`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub target: Target,
    pub why: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The builder's node's image store: nothing pushed, the pod pinned to that node.
    Node,
    /// A registry: the builder pushes to `push`, the nodes pull from `pull`.
    Registry { push: String, pull: String, insecure: bool },
}

impl Target {
    /// The repository a service's image is pushed to and pulled from (`HOST/NAMESPACE/NAME`).
    pub fn repositories(&self, namespace: &str, name: &str) -> Option<(String, String)> {
        match self {
            Target::Node => None,
            Target::Registry { push, pull, .. } => {
                let at = |host: &str| format!("{}/{namespace}/{name}", host.trim_end_matches('/'));
                Some((at(push), at(pull)))
            }
        }
    }
}

/// The hosts a KEP-1755 document publishes.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Hosting {
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    host_from_cluster_network: Option<String>,
    #[serde(default)]
    host_from_container_runtime: Option<String>,
}

/// Where the dev image of a service configured with `setting` goes on this cluster.
pub async fn destination(client: &kube::Client, setting: &Setting) -> Result<Destination, ClusterError> {
    match setting {
        Setting::Named(word) if word == "none" => {
            Ok(Destination { target: Target::Node, why: "devloop.yaml says `registry: none`".into() })
        }
        Setting::Named(word) if word == "auto" => published(client).await,
        Setting::Named(host) => Ok(Destination {
            target: Target::Registry { push: host.clone(), pull: host.clone(), insecure: is_local(host) },
            why: "named in devloop.yaml".into(),
        }),
        Setting::Hosts(hosts) => {
            let pull = hosts.pull.clone().unwrap_or_else(|| hosts.push.clone());
            let insecure = hosts.insecure.unwrap_or_else(|| is_local(&hosts.push));
            Ok(Destination {
                target: Target::Registry { push: hosts.push.clone(), pull, insecure },
                why: "named in devloop.yaml".into(),
            })
        }
    }
}

/// The registry the cluster publishes, if it publishes one the builder can push to.
async fn published(client: &kube::Client) -> Result<Destination, ClusterError> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), HOSTING_NAMESPACE);
    let found = match maps.get_opt(HOSTING_NAME).await {
        Ok(found) => found,
        // kube-public is readable by everyone on a standard cluster; where it is not, there is
        // nothing published to this user.
        Err(kube::Error::Api(status)) if status.code == 403 => None,
        Err(e) => return Err(explain(e, HOSTING_NAMESPACE)),
    };
    let document = found.and_then(|m| m.data).and_then(|d| d.get(HOSTING_KEY).cloned());
    Ok(from_hosting(document.as_deref()))
}

/// The destination a KEP-1755 document (or its absence) gives.
fn from_hosting(document: Option<&str>) -> Destination {
    let source = format!("ConfigMap {HOSTING_NAMESPACE}/{HOSTING_NAME}");
    let Some(document) = document else {
        return Destination { target: Target::Node, why: format!("the cluster publishes none in {source}") };
    };
    let hosting: Hosting = match serde_yaml_ng::from_str(document) {
        Ok(hosting) => hosting,
        Err(e) => return Destination { target: Target::Node, why: format!("{source} cannot be read: {e}") },
    };
    let usable = |h: Option<String>| h.filter(|h| crate::config::is_registry_host(h));
    let Some(push) = usable(hosting.host_from_cluster_network) else {
        // Unset means pods cannot reach it: the in-cluster builder could not push.
        return Destination {
            target: Target::Node,
            why: format!(
                "{source} publishes {} for use from outside the cluster only, no hostFromClusterNetwork",
                hosting.host.as_deref().unwrap_or("a registry")
            ),
        };
    };
    let pull = usable(hosting.host_from_container_runtime).or(usable(hosting.host)).unwrap_or_else(|| push.clone());
    Destination {
        target: Target::Registry { insecure: is_local(&push), push, pull },
        why: format!("published by the cluster in {source}"),
    }
}

/// Registries a development cluster serves over plain HTTP: loopback, private addresses,
/// cluster-local and `.local`/`.localhost` names, single-label names (`registry:5000`).
pub fn is_local(host: &str) -> bool {
    let name = host.split('/').next().unwrap_or(host);
    let name = name.rsplit_once(':').map(|(n, _)| n).unwrap_or(name);
    if let Ok(ip) = name.parse::<std::net::Ipv4Addr>() {
        return ip.is_loopback() || ip.is_private() || ip.is_link_local();
    }
    name == "localhost"
        || !name.contains('.')
        || [".localhost", ".local", ".svc", ".cluster.local", ".internal"].iter().any(|s| name.ends_with(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_registry_is_pushed_to_from_the_cluster_network_and_pulled_by_the_runtimes_name() {
        let doc = "host: \"localhost:5000\"\nhostFromClusterNetwork: \"10.213.0.1:5000\"\nhostFromContainerRuntime: \"localhost:5000\"\nhelp: https://x\n";
        let d = from_hosting(Some(doc));
        assert_eq!(
            d.target,
            Target::Registry { push: "10.213.0.1:5000".into(), pull: "localhost:5000".into(), insecure: true }
        );
        assert!(d.why.contains("kube-public/local-registry-hosting"), "{}", d.why);
        assert_eq!(
            d.target.repositories("team-a", "web"),
            Some(("10.213.0.1:5000/team-a/web".into(), "localhost:5000/team-a/web".into()))
        );
        // k3d's shape: the runtime's name unset → `host`.
        let d = from_hosting(Some("host: reg.example.com:5000\nhostFromClusterNetwork: registry:5000\n"));
        assert_eq!(
            d.target,
            Target::Registry { push: "registry:5000".into(), pull: "reg.example.com:5000".into(), insecure: true }
        );
    }

    #[test]
    fn no_registry_or_one_pods_cannot_reach_builds_into_the_node() {
        assert_eq!(from_hosting(None).target, Target::Node);
        let outside_only = from_hosting(Some("host: localhost:5000\n"));
        assert_eq!(outside_only.target, Target::Node);
        assert!(outside_only.why.contains("hostFromClusterNetwork"), "{}", outside_only.why);
        let garbage = from_hosting(Some("host: [unclosed\n"));
        assert_eq!(garbage.target, Target::Node);
        assert!(garbage.why.contains("cannot be read"), "{}", garbage.why);
    }

    #[test]
    fn plain_http_only_for_registries_of_a_development_cluster() {
        for local in [
            "localhost:5000",
            "127.0.0.1:5000",
            "10.213.0.1:5000",
            "registry:5000",
            "reg.kube-system.svc:5000",
            "kind-registry.local",
        ] {
            assert!(is_local(local), "{local}");
        }
        for public in ["ghcr.io", "myregistry.azurecr.io/team", "8.8.8.8:443"] {
            assert!(!is_local(public), "{public}");
        }
    }
}
