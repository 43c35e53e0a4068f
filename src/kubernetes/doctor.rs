//! `devloop doctor`: whether `up` can work here, one check a line, each saying what it found and,
//! where it failed, what to do. Nothing is changed.

use std::path::Path;

use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, PostParams};

use super::access;
use super::build::StaticAgent;
use crate::cli::settings;
use crate::cli::Global;
use crate::report::{Event, Reporter};

/// One check's verdict.
struct Check {
    name: &'static str,
    ok: bool,
    found: String,
    fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, found: impl Into<String>) -> Check {
        Check { name, ok: true, found: found.into(), fix: None }
    }

    fn fail(name: &'static str, found: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name, ok: false, found: found.into(), fix: Some(fix.into()) }
    }
}

/// The verbs `up`, `down`, `watch` and the `list-*` commands use, as (verb, resource, group).
const VERBS: [(&str, &str, &str); 15] = [
    ("get", "deployments", "apps"),
    ("create", "deployments", "apps"),
    ("patch", "deployments", "apps"),
    ("list", "replicasets", "apps"),
    ("list", "pods", ""),
    ("watch", "pods", ""),
    ("create", "pods", ""),
    ("create", "pods/exec", ""),
    ("create", "pods/portforward", ""),
    ("get", "pods/log", ""),
    ("create", "secrets", ""),
    ("delete", "secrets", ""),
    ("create", "services", ""),
    ("create", "ingresses", "networking.k8s.io"),
    ("list", "events", ""),
];

/// Runs every check, reports each, and says whether `up` can work (every check passed).
pub async fn run(global: &Global, reporter: &Reporter) -> bool {
    let mut checks = Vec::new();
    let config = settings::load_config(&global.file);
    match &config {
        Ok((config, root)) => {
            checks.push(Check::ok("devloop.yaml", format!("service {} in {}", config.name, root.display())))
        }
        Err(e) => checks.push(Check::fail(
            "devloop.yaml",
            e.to_string(),
            e.hint().unwrap_or_else(|| "run `devloop prep`".into()),
        )),
    }
    let needs_builder = config.as_ref().map(|(c, _)| c.image.is_none()).unwrap_or(true);
    let setting = config.as_ref().map(|(c, _)| c.registry.clone()).unwrap_or_default();
    let public = config.as_ref().is_ok_and(|(c, _)| c.public);
    checks.extend(cluster(global, needs_builder, &setting, public).await);
    checks.push(helm().await);
    checks.push(static_agent(needs_builder));
    if let Ok((config, root)) = &config {
        checks.extend(tree(&config.sync_excludes(), root).await);
    }
    let mut all = true;
    for check in checks {
        all &= check.ok;
        reporter.emit(Event::Check { check: check.name.into(), ok: check.ok, found: check.found, fix: check.fix });
    }
    all
}

async fn cluster(global: &Global, needs_builder: bool, setting: &crate::config::Registry, public: bool) -> Vec<Check> {
    let (client, namespace) = match access::connect(&super::up::selection(global)).await {
        Ok(connected) => connected,
        Err(e) => return vec![Check::fail("cluster", e.to_string(), e.hint().unwrap_or_default())],
    };
    let mut checks = Vec::new();
    match client.apiserver_version().await {
        Ok(version) => checks.push(Check::ok("cluster", format!("Kubernetes {} answers", version.git_version))),
        Err(e) => {
            let e = access::explain(e, &namespace);
            return vec![Check::fail("cluster", e.to_string(), e.hint().unwrap_or_default())];
        }
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let found = namespaces.get_opt(&namespace).await;
    let enforce = match &found {
        Ok(Some(ns)) => {
            checks.push(Check::ok("namespace", format!("{namespace} exists")));
            ns.metadata.labels.as_ref().and_then(|l| l.get("pod-security.kubernetes.io/enforce")).cloned()
        }
        Ok(None) => {
            checks.push(Check::fail(
                "namespace",
                format!("{namespace} does not exist"),
                format!("create it (`kubectl create namespace {namespace}`) or pick another with -n"),
            ));
            None
        }
        // Not allowed to read namespaces: the rights check below tells what matters.
        Err(_) => {
            checks.push(Check::ok("namespace", format!("{namespace} (not allowed to read it; the rights below tell)")));
            None
        }
    };
    checks.push(rights(&client, &namespace).await);
    checks.push(match (enforce.as_deref(), needs_builder) {
        (Some(level @ ("baseline" | "restricted")), true) => Check::fail(
            "pod security",
            format!("{namespace} enforces `{level}`: the in-cluster build's privileged pod is refused"),
            format!("`kubectl label namespace {namespace} pod-security.kubernetes.io/enforce=privileged`, or name a dev image built elsewhere (`image:` in devloop.yaml)"),
        ),
        (level, _) => Check::ok("pod security", format!("enforce level {}", level.unwrap_or("not set (privileged)"))),
    });
    checks.push(runtimes(&client, needs_builder).await);
    checks.push(registry(&client, setting).await);
    checks.push(ingress(&client, public).await);
    checks
}

/// For a public service: an ingress controller that will give its Ingress an address (a default
/// IngressClass, since prep's chart names none).
async fn ingress(client: &kube::Client, public: bool) -> Check {
    use k8s_openapi::api::networking::v1::IngressClass;
    if !public {
        return Check::ok("ingress", "the service is not public (`public: false`)");
    }
    let classes: Api<IngressClass> = Api::all(client.clone());
    let Ok(list) = classes.list(&Default::default()).await else {
        return Check::ok("ingress", "not allowed to list IngressClasses; `list-uris` says why a URL stays Pending");
    };
    let controller = |c: &IngressClass| c.spec.as_ref().and_then(|s| s.controller.clone()).unwrap_or_default();
    let names: Vec<String> = list.items.iter().filter_map(|c| c.metadata.name.clone()).collect();
    match list.items.iter().find(|c| super::list::is_default_class(c)) {
        Some(class) => Check::ok(
            "ingress",
            format!("IngressClass {} is the default ({})", class.metadata.name.as_deref().unwrap_or("?"), controller(class)),
        ),
        None if names.is_empty() => Check::fail(
            "ingress",
            "no IngressClass: no ingress controller is installed, so the public URL stays Pending",
            "install one (e.g. ingress-nginx or Traefik), or set `public: false` and use the localhost tunnel",
        ),
        None => Check::fail(
            "ingress",
            format!("no default IngressClass (there are {}): the chart's Ingress names none", names.join(", ")),
            format!("set `ingress.className` in the values file to one of them, or mark one default (`kubectl annotate ingressclass {} ingressclass.kubernetes.io/is-default-class=true`)", names[0]),
        ),
    }
}

/// Every verb devloop uses, asked of the API server for this user (SelfSubjectAccessReview).
async fn rights(client: &kube::Client, namespace: &str) -> Check {
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut denied = Vec::new();
    for (verb, resource, group) in VERBS {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        let review: SelfSubjectAccessReview = serde_json::from_value(serde_json::json!({
            "spec": {"resourceAttributes": {
                "namespace": namespace, "verb": verb, "group": group,
                "resource": resource, "subresource": subresource
            }}
        }))
        .expect("a valid review");
        match reviews.create(&PostParams::default(), &review).await {
            Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => denied.push(if subresource.is_empty() {
                format!("{verb} {resource}")
            } else {
                format!("{verb} {resource}/{subresource}")
            }),
            Err(e) => {
                return Check::fail(
                    "rights",
                    format!("cannot ask: {e}"),
                    "check the cluster's RBAC with `kubectl auth can-i --list`",
                )
            }
        }
    }
    if denied.is_empty() {
        return Check::ok("rights", format!("all {} verbs devloop uses are allowed in {namespace}", VERBS.len()));
    }
    Check::fail(
        "rights",
        format!("not allowed in {namespace}: {}", denied.join(", ")),
        "ask a cluster admin for a Role with those verbs in this namespace, bound to your user",
    )
}

/// The nodes' container runtimes: the no-registry build needs containerd on a node.
async fn runtimes(client: &kube::Client, needs_builder: bool) -> Check {
    let nodes: Api<Node> = Api::all(client.clone());
    let list = match nodes.list(&Default::default()).await {
        Ok(list) => list,
        Err(_) => return Check::ok("node runtimes", "not allowed to list nodes; `up` finds out"),
    };
    let runtimes: Vec<String> = list
        .items
        .iter()
        .filter_map(|n| {
            let runtime = n.status.as_ref()?.node_info.as_ref()?.container_runtime_version.clone();
            Some(format!("{} {runtime}", n.metadata.name.as_deref().unwrap_or("?")))
        })
        .collect();
    let containerd = runtimes.iter().any(|r| r.contains("containerd://"));
    match (containerd, needs_builder) {
        (false, true) => Check::fail(
            "node runtimes",
            format!("no node runs containerd ({})", runtimes.join(", ")),
            "the in-cluster build runs next to a node's containerd: name a dev image built elsewhere (`image:` in devloop.yaml)",
        ),
        _ => Check::ok("node runtimes", runtimes.join(", ")),
    }
}

/// Where `up` would put the dev image: a registry (devloop.yaml's, or the one the cluster
/// publishes the KEP-1755 way) or the builder's node.
async fn registry(client: &kube::Client, setting: &crate::config::Registry) -> Check {
    use super::registry::{destination, Target};
    match destination(client, setting).await {
        Ok(found) => match found.target {
            Target::Registry { push, pull, .. } => {
                Check::ok("registry", format!("push to {push}, nodes pull from {pull}: {}", found.why))
            }
            Target::Node => Check::ok("registry", format!("none: {}, never pulled", found.why)),
        },
        Err(e) => Check::ok("registry", format!("cannot tell ({e}); `up` finds out")),
    }
}

async fn helm() -> Check {
    let out = tokio::process::Command::new("helm").args(["version", "--short"]).kill_on_drop(true).output().await;
    match out {
        Ok(out) if out.status.success() => Check::ok("helm", String::from_utf8_lossy(&out.stdout).trim().to_string()),
        Ok(out) => Check::fail("helm", String::from_utf8_lossy(&out.stderr).trim().to_string(), "reinstall helm 3"),
        Err(_) => Check::fail(
            "helm",
            "not found on PATH",
            "install helm 3 (https://helm.sh/docs/intro/install/) and put it on PATH",
        ),
    }
}

fn static_agent(needs_builder: bool) -> Check {
    match StaticAgent::find() {
        Ok(agent) => Check::ok(
            "static agent",
            format!(
                "{:.1} MB, digest {}, protocol {}",
                agent.bytes.len() as f64 / 1e6,
                agent.digest,
                devloop_agent::protocol::PROTOCOL_VERSION
            ),
        ),
        Err(e) if needs_builder => Check::fail("static agent", e.to_string(), e.hint().unwrap_or_default()),
        Err(_) => Check::ok("static agent", "not found, not needed (`image:` is set)"),
    }
}

/// The tree that syncs: its size, what the stat cache knows, and the folders against the
/// inotify watch limit.
async fn tree(excludes: &[String], root: &Path) -> Vec<Check> {
    let (excludes, root) = (excludes.to_vec(), root.to_path_buf());
    let scanned = tokio::task::spawn_blocking(move || {
        let filter = devloop_agent::filter::Filter::new(&root, &excludes).ok()?;
        let cache = devloop_agent::walk::load_stat_cache(&crate::sync::scan::cache_path(&root)?);
        let outcome = devloop_agent::walk::scan(&std::sync::Arc::new(filter), &cache);
        Some((outcome, devloop_agent::walk::StatSource::files(&cache)))
    })
    .await
    .ok()
    .flatten();
    let Some((outcome, cached)) = scanned else {
        return vec![Check::fail("tree", "cannot read it", "check the folder's permissions")];
    };
    let folders = outcome.tree.values().filter(|s| s.entry.is_dir()).count() + 1;
    let files = outcome.tree.len() + 1 - folders;
    let bytes: u64 = outcome.tree.values().map(|s| s.entry.size()).sum();
    let mut checks = vec![Check::ok(
        "tree",
        format!(
            "{files} files in {folders} folders, {:.1} MB; the stat cache knows {cached} files",
            bytes as f64 / 1e6
        ),
    )];
    let limit = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok());
    checks.push(match limit {
        Some(limit) if folders > limit => Check::fail(
            "inotify",
            format!("{folders} folders to watch, the limit is {limit}"),
            format!(
                "`sudo sysctl fs.inotify.max_user_watches={}` (devloop falls back to polling meanwhile)",
                (folders * 2).max(524_288)
            ),
        ),
        Some(limit) => Check::ok("inotify", format!("{folders} folders to watch, the limit is {limit}")),
        None => Check::ok("inotify", "limit unknown (not Linux?)"),
    });
    checks
}
