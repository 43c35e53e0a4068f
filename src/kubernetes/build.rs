//! The in-cluster build: BuildKit next to a node's containerd, in a pod devloop creates on first
//! use, building `Dockerfile.develop` straight into the node's image store (no registry); the
//! service's pod then runs the image with `imagePullPolicy: Never`, pinned to that node.
//!
//! ```text
//! static agent ─► Secret (chunks) ─► builder pod: init copies it to /tools
//! service folder ─► (content-hash sync, an agent serving /context/NAME) ─► builder
//! tag = blake3(build inputs) ─► on the node already? ─► nothing to build
//!                             └► buildctl build (progress streamed) ─► NAME:TAG in k8s.io
//! ```
//!
//! The build context lives in the builder between builds and is kept current by the same sync as
//! the app: after the first build, a one-file change sends one file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::ByteString;
use kube::api::{Api, AttachParams, DeleteParams, PostParams};
use kube::runtime::wait::await_condition;
use tokio::io::AsyncBufReadExt;

use super::access::{explain, ClusterError};
use super::exec::KubeTransport;
use super::pods;
use super::registry;
use crate::config::{Builder as BuilderConfig, Config, Globs};
use crate::report::{Event, Reporter};
use crate::sync::classify::Rules;
use crate::sync::session::{Session, SessionConfig};
use crate::sync::watch::Window;

/// The builder pod's name (one per namespace).
pub const BUILDER: &str = "devloop-builder";
/// Where the agent binary lands in the builder, and where build contexts live.
const TOOLS: &str = "/tools";
const CONTEXTS: &str = "/contexts";
const BUILDKIT_SOCKET: &str = "unix:///run/buildkit/buildkitd.sock";
/// A Secret holds at most 1 MiB: the agent travels in several, one chunk each, projected into
/// one folder of the builder pod.
const CHUNK: usize = 900 << 10;
/// Annotation of the builder pod: a digest of its spec (a changed spec replaces the pod).
const SPEC_ANNOTATION: &str = "devloop.dev/spec";
/// Repository of the images devloop builds (never pulled: they exist only on the node).
pub const REPOSITORY_PREFIX: &str = "devloop.local";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("no static devloop-agent to put into the image (looked for {looked})")]
    NoStaticAgent { looked: String },
    #[error("cannot choose the node to build on: {0}")]
    NoNode(String),
    #[error("node {node} runs {runtime}, not containerd, which the in-cluster builder works with")]
    NotContainerd { node: String, runtime: String },
    #[error("the builder pod did not become ready: {message}")]
    Builder { namespace: String, message: String },
    #[error("the build context did not reach the builder: {0}")]
    Context(String),
    #[error("the image build failed{}:\n{output}", step.as_ref().map(|s| format!(" at {s}")).unwrap_or_default())]
    Failed { step: Option<String>, output: String },
    #[error("the builder could not push {image}:\n{output}")]
    Push { image: String, output: String },
    #[error("namespace {namespace} enforces Pod Security `{level}`, which refuses the privileged pod the in-cluster build runs in")]
    PodSecurity { namespace: String, level: String },
    #[error("you may not {denied} in namespace {namespace}, which the in-cluster build needs")]
    NotAllowed { namespace: String, denied: String },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl BuildError {
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            BuildError::NoStaticAgent { .. } => "install devloop with `scripts/install` from its checkout (it puts devloop-agent.static beside the CLI), or build it there (`rustup target add x86_64-unknown-linux-musl && cargo build -p devloop-agent --profile agent --target x86_64-unknown-linux-musl`) and point DEVLOOP_STATIC_AGENT at it".into(),
            BuildError::NoNode(_) => "name it in devloop.yaml (`builder: {node: NAME}`), label one node devloop.dev/builder=true, or push to a registry any node pulls from (`registry: HOST[:PORT]` in devloop.yaml, or one the cluster publishes in ConfigMap kube-public/local-registry-hosting)".into(),
            BuildError::NotContainerd { .. } => "name a containerd node to build on (`builder: {node: NAME}`) and push to a registry every node pulls from (`registry:`), or name a dev image built elsewhere (`image: REPO:TAG`)".into(),
            BuildError::Builder { namespace, .. } => format!("`kubectl describe pod {BUILDER} -n {namespace}` and `kubectl logs {BUILDER} -n {namespace}` say more; the builder needs a privileged pod and the node's containerd socket (`builder.containerd`)"),
            BuildError::Context(_) => return None,
            BuildError::Failed { .. } => "fix the Dockerfile step above; the running pod keeps serving meanwhile".into(),
            BuildError::Push { image, .. } => {
                let host = image.split('/').next().unwrap_or(image);
                format!("check that the registry {host} answers from the cluster's pods and accepts pushes (the KEP-1755 hostFromClusterNetwork, or `registry: {{push: …}}` in devloop.yaml); `registry: none` builds into the node instead")
            }
            BuildError::PodSecurity { namespace, .. } => format!(
                "label the namespace for it (`kubectl label namespace {namespace} pod-security.kubernetes.io/enforce=privileged`), use a namespace that allows it, or name a dev image built elsewhere in devloop.yaml (`image: REPO:TAG`)"
            ),
            BuildError::NotAllowed { .. } => "ask a cluster admin for a Role with those verbs in this namespace, or name a dev image built elsewhere in devloop.yaml (`image: REPO:TAG`)".into(),
            BuildError::Cluster(e) => return e.hint(),
            BuildError::Io(_) => return None,
        })
    }
}

/// The CLI's own agent, built static (it runs in any image).
pub struct StaticAgent {
    pub bytes: Vec<u8>,
    pub digest: String,
}

impl StaticAgent {
    /// `$DEVLOOP_STATIC_AGENT`, else the musl build next to this executable's target folder
    /// (`target/x86_64-unknown-linux-musl/agent/devloop-agent` beside `target/release/devloop`),
    /// else `devloop-agent.static` next to the executable.
    pub fn find() -> Result<StaticAgent, BuildError> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(path) = std::env::var_os("DEVLOOP_STATIC_AGENT") {
            candidates.push(path.into());
        }
        if let Ok(exe) = std::env::current_exe() {
            if let Some(dir) = exe.parent() {
                candidates.push(dir.join("devloop-agent.static"));
                if let Some(target) = dir.parent() {
                    candidates.push(target.join("x86_64-unknown-linux-musl/agent/devloop-agent"));
                }
            }
        }
        for path in &candidates {
            if let Ok(bytes) = std::fs::read(path) {
                let digest = blake3::hash(&bytes).to_hex()[..16].to_string();
                return Ok(StaticAgent { bytes, digest });
            }
        }
        let looked = candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        Err(BuildError::NoStaticAgent { looked })
    }
}

/// Work to finish before the process exits after an interruption (a build's `buildctl` to
/// stop), queued by what was dropped.
type Job = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
static CLEANUP: std::sync::Mutex<Vec<Job>> = std::sync::Mutex::new(Vec::new());

/// Runs what interrupted builds left to clean up, for at most `limit`.
pub async fn cleanup(limit: Duration) {
    let jobs: Vec<Job> = std::mem::take(&mut *CLEANUP.lock().expect("cleanup"));
    let _ = tokio::time::timeout(limit, futures_util::future::join_all(jobs)).await;
}

/// A running `buildctl` in the builder: stopped (SIGTERM) if the build is dropped before it
/// ends (Ctrl+C during a build), so no build goes on for nobody.
struct KillOnDrop {
    client: kube::Client,
    namespace: String,
    pid: u32,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let (client, namespace, pid) = (self.client.clone(), self.namespace.clone(), self.pid);
        let job: Job = Box::pin(async move {
            let pods_api: Api<Pod> = Api::namespaced(client, &namespace);
            let params = AttachParams::default().container("buildkitd").stdout(true).stderr(false).stdin(false);
            let command = vec!["kill".to_string(), pid.to_string()];
            if let Ok(attached) = pods_api.exec(BUILDER, command, &params).await {
                let _ = attached.join().await;
            }
        });
        CLEANUP.lock().expect("cleanup").push(job);
    }
}

/// The builder pod's annotation prefix of a build in progress (`devloop.dev/building-NAME`: the
/// time it began). A mark older than [`BUILDING_STALE`] is from a devloop that died.
const BUILDING: &str = "devloop.dev/building-";
const BUILDING_STALE: Duration = Duration::from_secs(15 * 60);

/// A build in progress, marked on the builder; cleared when the build ends (queued for the
/// cleanup when it is dropped: Ctrl+C).
struct BuildingMark {
    builder: Option<Builder>,
    name: String,
}

impl BuildingMark {
    async fn clear(mut self) {
        if let Some(builder) = self.builder.take() {
            let _ = builder.annotate(&format!("{BUILDING}{}", self.name), None).await;
        }
    }
}

impl Drop for BuildingMark {
    fn drop(&mut self) {
        let Some(builder) = self.builder.take() else { return };
        let key = format!("{BUILDING}{}", self.name);
        let job: Job = Box::pin(async move {
            let _ = builder.annotate(&key, None).await;
        });
        CLEANUP.lock().expect("cleanup").push(job);
    }
}

/// Services building on `pod` now (marks younger than [`BUILDING_STALE`]).
fn building(pod: &Pod) -> Vec<String> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    pod.metadata
        .annotations
        .iter()
        .flatten()
        .filter_map(|(key, since)| {
            let name = key.strip_prefix(BUILDING)?;
            let since: u64 = since.parse().ok()?;
            (now.saturating_sub(since) < BUILDING_STALE.as_secs()).then(|| name.to_string())
        })
        .collect()
}

/// A ready builder pod on its node.
pub struct Builder {
    client: kube::Client,
    namespace: String,
    pub node: String,
}

/// Creates the builder on first use (or when it runs another agent), and waits until it is ready.
/// `pinned`: its images stay on its node, so the node is chosen with care; otherwise (a
/// registry) any Ready containerd node will do, unless devloop.yaml names one.
pub async fn ensure(
    client: &kube::Client,
    namespace: &str,
    config: &BuilderConfig,
    agent: &StaticAgent,
    pinned: bool,
) -> Result<Builder, BuildError> {
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let exists = match pods_api.get_opt(BUILDER).await {
        Ok(found) => found.is_some(),
        // Not even allowed to look: the preflight says what is missing.
        Err(kube::Error::Api(status)) if status.code == 403 => false,
        Err(e) => return Err(explain(e, namespace).into()),
    };
    if !exists {
        preflight(client, namespace).await?;
    }
    let node = choose_node(client, config, pinned).await?;
    let containerd = match &config.containerd {
        Some(socket) => socket.clone(),
        None => containerd_socket(client, &node).await?,
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut secret_names = Vec::new();
    for (i, chunk) in agent.bytes.chunks(CHUNK).enumerate() {
        let name = format!("devloop-agent-{}-{i}", agent.digest);
        if secrets.get_opt(&name).await.map_err(|e| explain(e, namespace))?.is_none() {
            let secret: Secret = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "labels": {"devloop.dev/part": "agent"}},
            }))
            .expect("a valid secret");
            let data = BTreeMap::from([(format!("agent.{i:02}"), ByteString(chunk.to_vec()))]);
            let secret = Secret { data: Some(data), ..secret };
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(_) => {}
                // Another `up` of this namespace made it at the same moment: the same bytes.
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(e) => return Err(explain(e, namespace).into()),
            }
        }
        secret_names.push(name);
    }
    let pod = builder_pod(config, &containerd, namespace, &node, &secret_names, &agent.digest);
    if let Some(existing) = pods_api.get_opt(BUILDER).await.map_err(|e| explain(e, namespace))? {
        let annotation = |pod: &Pod, key: &str| pod.metadata.annotations.as_ref().and_then(|a| a.get(key)).cloned();
        let same_agent = annotation(&existing, "devloop.dev/agent") == Some(agent.digest.clone())
            && annotation(&existing, SPEC_ANNOTATION) == annotation(&pod, SPEC_ANNOTATION);
        let same_node = existing.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str());
        let alive = existing.metadata.deletion_timestamp.is_none()
            && !matches!(existing.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Failed" | "Succeeded"));
        if same_agent && same_node && alive {
            return ready_builder(client, &pods_api, namespace).await;
        }
        // Another service of the namespace may be building on it right now: a live builder
        // running this agent is kept even when this service's `builder:` settings differ
        // (one builder per namespace, one configuration); only a dead one or another agent
        // version replaces it.
        if same_agent && alive {
            return ready_builder(client, &pods_api, namespace).await;
        }
        pods_api.delete(BUILDER, &DeleteParams::default().grace_period(0)).await.map_err(|e| explain(e, namespace))?;
        let gone = await_condition(pods_api.clone(), BUILDER, kube::runtime::conditions::is_deleted(""));
        let _ = tokio::time::timeout(Duration::from_secs(60), gone).await;
    }
    match pods_api.create(&PostParams::default(), &pod).await {
        Ok(_) => {}
        // Two `up`s started together: the other one created it; both use it.
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(e) => return Err(explain(e, namespace).into()),
    }
    ready_builder(client, &pods_api, namespace).await
}

/// The builder once it is ready, on the node it runs on.
async fn ready_builder(client: &kube::Client, pods_api: &Api<Pod>, namespace: &str) -> Result<Builder, BuildError> {
    wait_ready(pods_api, namespace).await?;
    let pod = pods_api.get(BUILDER).await.map_err(|e| explain(e, namespace))?;
    let node = pod.spec.and_then(|s| s.node_name).unwrap_or_default();
    Ok(Builder { client: client.clone(), namespace: namespace.into(), node })
}

/// Before the first privileged builder of a namespace is made (and before any Secret): does the
/// namespace's Pod Security admit a privileged pod, and may this user create pods, exec into
/// them and create Secrets here? Refused → an error that says which, and nothing is left behind.
async fn preflight(client: &kube::Client, namespace: &str) -> Result<(), BuildError> {
    use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
    use k8s_openapi::api::core::v1::Namespace;
    const ENFORCE: &str = "pod-security.kubernetes.io/enforce";
    // Reading the namespace may be forbidden to a developer: then only the create tells.
    if let Ok(found) = Api::<Namespace>::all(client.clone()).get(namespace).await {
        let level = found.metadata.labels.as_ref().and_then(|l| l.get(ENFORCE)).cloned();
        if let Some(level) = level.filter(|l| l == "baseline" || l == "restricted") {
            return Err(BuildError::PodSecurity { namespace: namespace.into(), level });
        }
    }
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut denied = Vec::new();
    for (verb, resource, subresource) in [("create", "pods", ""), ("create", "pods", "exec"), ("create", "secrets", "")]
    {
        let review: SelfSubjectAccessReview = serde_json::from_value(serde_json::json!({
            "spec": {"resourceAttributes": {
                "namespace": namespace, "verb": verb, "resource": resource, "subresource": subresource
            }}
        }))
        .expect("a valid review");
        let answer = reviews.create(&PostParams::default(), &review).await.map_err(|e| explain(e, namespace))?;
        if !answer.status.is_some_and(|s| s.allowed) {
            let what = if subresource.is_empty() { resource.to_string() } else { format!("{resource}/{subresource}") };
            denied.push(format!("{verb} {what}"));
        }
    }
    if denied.is_empty() {
        return Ok(());
    }
    Err(BuildError::NotAllowed { namespace: namespace.into(), denied: denied.join(", ") })
}

async fn wait_ready(pods_api: &Api<Pod>, namespace: &str) -> Result<(), BuildError> {
    let ready = await_condition(pods_api.clone(), BUILDER, |pod: Option<&Pod>| pod.is_some_and(pods::is_ready));
    match tokio::time::timeout(Duration::from_secs(120), ready).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(BuildError::Builder { namespace: namespace.into(), message: e.to_string() }),
        Err(_) => {
            let pod = pods_api.get(BUILDER).await.map_err(|e| explain(e, namespace))?;
            Err(BuildError::Builder { namespace: namespace.into(), message: pods::not_ready_reason(&pod) })
        }
    }
}

/// The node named in the config, else the only node, else the one labelled devloop.dev/builder;
/// for a registry (`pinned` false) any Ready node that runs containerd will do.
async fn choose_node(client: &kube::Client, config: &BuilderConfig, pinned: bool) -> Result<String, BuildError> {
    if let Some(node) = &config.node {
        return Ok(node.clone());
    }
    let nodes: Api<Node> = Api::all(client.clone());
    let list = nodes.list(&Default::default()).await.map_err(|e| explain(e, ""))?;
    let labelled: Vec<&Node> = list
        .items
        .iter()
        .filter(|n| n.metadata.labels.as_ref().and_then(|l| l.get("devloop.dev/builder")).is_some_and(|v| v == "true"))
        .collect();
    let usable: Vec<&Node> =
        list.items.iter().filter(|n| runtime_of(n).starts_with("containerd://") && node_ready(n)).collect();
    let pick = match (list.items.as_slice(), labelled.as_slice(), usable.first()) {
        ([only], _, _) => only,
        (_, [only], _) => *only,
        (_, _, Some(first)) if !pinned => *first,
        (all, _, _) => return Err(BuildError::NoNode(format!("the cluster has {} nodes", all.len()))),
    };
    Ok(pick.metadata.name.clone().unwrap_or_default())
}

fn runtime_of(node: &Node) -> &str {
    node.status.as_ref().and_then(|s| s.node_info.as_ref()).map(|i| i.container_runtime_version.as_str()).unwrap_or("")
}

fn node_ready(node: &Node) -> bool {
    let conditions = node.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.into_iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Where `node`'s containerd listens: what its kubelet is configured with (`configz`, through the
/// API server's node proxy, where this user may read it), else the path of the runtime's
/// distribution (k3s keeps its own), else the standard one. A node whose runtime is not
/// containerd cannot host the builder.
async fn containerd_socket(client: &kube::Client, node: &str) -> Result<String, BuildError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let found = nodes.get(node).await.map_err(|e| explain(e, ""))?;
    let runtime = runtime_of(&found).to_string();
    if !runtime.starts_with("containerd://") {
        return Err(BuildError::NotContainerd { node: node.into(), runtime });
    }
    let request = http::Request::get(format!("/api/v1/nodes/{node}/proxy/configz")).body(Vec::new());
    let mut configz = None;
    if let Ok(request) = request {
        let answer = tokio::time::timeout(Duration::from_secs(5), client.request_text(request)).await;
        configz = answer.ok().and_then(Result::ok);
    }
    Ok(socket_of(&runtime, configz.as_deref()))
}

/// The containerd socket of a node running `runtime` (`containerd://VERSION`), from its kubelet's
/// `configz` when it could be read.
fn socket_of(runtime: &str, configz: Option<&str>) -> String {
    let configured = configz.and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok()).and_then(|v| {
        v["kubeletconfig"]["containerRuntimeEndpoint"].as_str().map(|e| e.trim_start_matches("unix://").to_string())
    });
    match configured.filter(|s| s.starts_with('/')) {
        Some(socket) => socket,
        None if runtime.contains("k3s") => "/run/k3s/containerd/containerd.sock".into(),
        None => "/run/containerd/containerd.sock".into(),
    }
}

/// BuildKit's state of one namespace's builder on the node: builders of two namespaces on one
/// node must not share a root (buildkitd locks it).
fn builder_root(config: &BuilderConfig, namespace: &str) -> String {
    format!("{}/{namespace}", config.root.trim_end_matches('/'))
}

/// The builder pod: buildkitd on the node's containerd (namespace k8s.io, its socket at
/// `containerd`), privileged, on `node`, with the mounts it needs there; an init container
/// assembles the CLI's agent from the Secrets.
fn builder_pod(
    config: &BuilderConfig,
    containerd: &str,
    namespace: &str,
    node: &str,
    secrets: &[String],
    agent_digest: &str,
) -> Pod {
    let root = builder_root(config, namespace);
    let socket_dir = Path::new(containerd).parent().map(|p| p.display().to_string()).unwrap_or_default();
    let sources: Vec<serde_json::Value> = secrets.iter().map(|s| serde_json::json!({"secret": {"name": s}})).collect();
    let mut spec = serde_json::json!({
        "metadata": {
            "name": BUILDER,
            "labels": {"app.kubernetes.io/name": BUILDER, "devloop.dev/part": "builder"},
            "annotations": {"devloop.dev/agent": agent_digest}
        },
        "spec": {
            // On the node whose containerd socket it mounts, whatever the scheduler would pick.
            "nodeName": node,
            "tolerations": [{"operator": "Exists"}],
            "terminationGracePeriodSeconds": 5,
            "initContainers": [{
                "name": "agent",
                "image": config.image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", format!("cat /chunks/agent.* > {TOOLS}/devloop-agent && chmod 755 {TOOLS}/devloop-agent")],
                "volumeMounts": [{"name": "chunks", "mountPath": "/chunks"}, {"name": "tools", "mountPath": TOOLS}]
            }],
            "containers": [{
                "name": "buildkitd",
                "image": config.image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["buildkitd", "--oci-worker=false", "--containerd-worker=true",
                            "--containerd-worker-addr", containerd, "--containerd-worker-namespace", "k8s.io",
                            "--root", root, "--addr", BUILDKIT_SOCKET,
                            // RUN steps run in containers of the node's containerd, which mounts
                            // this socket by its path on the node: under the shared root it is
                            // the same path in the pod and on the node.
                            "--otel-socket-path", format!("{root}/otel-grpc.sock")],
                "securityContext": {"privileged": true},
                "readinessProbe": {"exec": {"command": ["buildctl", "--addr", BUILDKIT_SOCKET, "debug", "workers"]},
                                   "periodSeconds": 1, "initialDelaySeconds": 0},
                "volumeMounts": [
                    {"name": "tools", "mountPath": TOOLS},
                    {"name": "contexts", "mountPath": CONTEXTS},
                    {"name": "containerd", "mountPath": socket_dir},
                    {"name": "fifo", "mountPath": "/run/containerd/fifo"},
                    {"name": "root", "mountPath": root, "mountPropagation": "Bidirectional"}
                ]
            }],
            "volumes": [
                {"name": "chunks", "projected": {"sources": sources}},
                {"name": "tools", "emptyDir": {}},
                {"name": "contexts", "emptyDir": {}},
                {"name": "containerd", "hostPath": {"path": socket_dir}},
                {"name": "fifo", "hostPath": {"path": "/run/containerd/fifo", "type": "DirectoryOrCreate"}},
                {"name": "root", "hostPath": {"path": root, "type": "DirectoryOrCreate"}}
            ]
        }
    });
    let digest = blake3::hash(spec["spec"].to_string().as_bytes()).to_hex()[..16].to_string();
    spec["metadata"]["annotations"][SPEC_ANNOTATION] = serde_json::Value::String(digest);
    serde_json::from_value(spec).expect("a valid pod")
}

/// The image tag of a set of build inputs: a digest of the context's manifest (paths, contents,
/// exec bits, links), the Dockerfile's name, the build args and `built_for` (the agent's digest
/// and the namespace).
pub fn tag(
    context: &devloop_agent::manifest::Manifest,
    dockerfile: &str,
    args: &BTreeMap<String, String>,
    built_for: &str,
) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(dockerfile.as_bytes());
    for (key, value) in args {
        hasher.update(format!("\0{key}={value}").as_bytes());
    }
    hasher.update(b"\0");
    hasher.update(built_for.as_bytes());
    for (path, entry) in context {
        hasher.update(b"\0");
        hasher.update(path.as_bytes());
        hasher.update(serde_json::to_string(entry).expect("entries serialize").as_bytes());
    }
    hasher.finalize().to_hex()[..20].to_string()
}

impl Builder {
    /// Brings `/contexts/NAME` in the builder up to date with the service folder (what the build
    /// context holds: the sync's own filter), then puts the agent beside it. Returns the manifest
    /// that was synced (for the tag).
    pub async fn sync_context(
        &self,
        config: &Config,
        root: &Path,
        agent: &StaticAgent,
        reporter: &Reporter,
    ) -> Result<devloop_agent::manifest::Manifest, BuildError> {
        let context = format!("{CONTEXTS}/{}", config.name);
        let command = vec![format!("{TOOLS}/devloop-agent"), "serve".into(), "--root".into(), context.clone()];
        let transport = KubeTransport::pod(self.client.clone(), &self.namespace, BUILDER, command);
        // What `docker build` would send: `.dockerignore` shapes it, the Dockerfile is always in.
        let excludes = context_excludes(config);
        let session = SessionConfig {
            root: root.to_path_buf(),
            excludes: excludes.clone(),
            docker_context: Some(DOCKERFILE.into()),
            rules: Rules { rebuild: Globs::new(&[]), no_restart: Globs::new(&[]) },
            window: Window::default(),
            connect_timeout: Duration::from_secs(60),
        };
        // The context sync reports only its sum; its own events would read as the app's.
        let quiet = Reporter::silent();
        let totals = Arc::new(std::sync::Mutex::new((0u64, 0u64)));
        {
            let totals = Arc::clone(&totals);
            quiet.observe(move |event| {
                if let Event::Applied { files, bytes, .. } = event {
                    let mut t = totals.lock().expect("totals");
                    t.0 += files;
                    t.1 += bytes;
                }
            });
        }
        let started = Instant::now();
        let session =
            Session::new(session, Box::new(transport), quiet).map_err(|e| BuildError::Context(e.to_string()))?;
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        session.run(true, shutdown).await.map_err(|e| BuildError::Context(e.to_string()))?;
        let (files, bytes) = *totals.lock().expect("totals");
        reporter.emit(Event::ContextSynced { files, bytes, millis: started.elapsed().as_millis() as u64 });
        self.exec_ok(vec!["cp".into(), format!("{TOOLS}/devloop-agent"), format!("{context}/devloop-agent")]).await?;
        let filter = Arc::new(
            devloop_agent::filter::Filter::with(root, &excludes, Some(DOCKERFILE))
                .map_err(|e| BuildError::Context(e.to_string()))?,
        );
        let scanned =
            tokio::task::spawn_blocking(move || devloop_agent::walk::scan(&filter, &devloop_agent::walk::Tree::new()))
                .await
                .expect("scan task");
        let mut manifest = devloop_agent::walk::manifest_of(&scanned.tree);
        manifest.insert(
            "devloop-agent".into(),
            devloop_agent::manifest::Entry::File {
                hash: devloop_agent::manifest::Digest(*blake3::hash(&agent.bytes).as_bytes()),
                size: agent.bytes.len() as u64,
                exec: true,
            },
        );
        Ok(manifest)
    }

    /// The image the pod runs, when `output` was built for service `name` already: recorded on
    /// the builder (`KEY` or, for a push, `KEY REFERENCE@DIGEST`), or in the node's image store
    /// as the kubelet reports it.
    async fn built(&self, name: &str, output: &Output) -> Result<Option<String>, BuildError> {
        let pods_api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let pod = pods_api.get(BUILDER).await.map_err(|e| explain(e, &self.namespace))?;
        let recorded = pod.metadata.annotations.as_ref().and_then(|a| a.get(&format!("devloop.dev/built-{name}")));
        let mut words = recorded.map(|r| r.split(' ')).into_iter().flatten();
        if words.next() == Some(output.key()) {
            let digest = words.next().and_then(|reference| reference.rsplit_once('@')).map(|(_, d)| d);
            if let Ok(image) = output.reference(digest) {
                return Ok(Some(image));
            }
        }
        let Output::Node { image } = output else { return Ok(None) };
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node = nodes.get(&self.node).await.map_err(|e| explain(e, ""))?;
        let images = node.status.and_then(|s| s.images).unwrap_or_default();
        let present = images
            .iter()
            .flat_map(|i| i.names.iter().flatten())
            .any(|n| n == image || n.ends_with(&format!("/{image}")));
        Ok(present.then(|| image.clone()))
    }

    /// Records that `output` is built for service `name`, run as `image` (an annotation of the
    /// builder pod).
    async fn record(&self, name: &str, output: &Output, image: &str) -> Result<(), BuildError> {
        use kube::api::{Patch, PatchParams};
        let pods_api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let value = match output {
            Output::Node { image } => image.clone(),
            Output::Registry { push, .. } => format!("{push} {image}"),
        };
        let patch = serde_json::json!({"metadata": {"annotations": {format!("devloop.dev/built-{name}"): value}}});
        pods_api
            .patch(BUILDER, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| explain(e, &self.namespace))?;
        Ok(())
    }

    /// Marks the builder as building for service `name` (an annotation with the time), until
    /// the returned mark is cleared or dropped.
    async fn mark_building(&self, name: &str) -> Result<BuildingMark, BuildError> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.annotate(&format!("{BUILDING}{name}"), Some(&now.to_string())).await?;
        Ok(BuildingMark {
            builder: Some(Builder {
                client: self.client.clone(),
                namespace: self.namespace.clone(),
                node: self.node.clone(),
            }),
            name: name.into(),
        })
    }

    async fn annotate(&self, key: &str, value: Option<&str>) -> Result<(), BuildError> {
        use kube::api::{Patch, PatchParams};
        let pods_api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let patch = serde_json::json!({"metadata": {"annotations": {key: value}}});
        pods_api
            .patch(BUILDER, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| explain(e, &self.namespace))?;
        Ok(())
    }

    /// Tolerations for the node's taints.
    async fn tolerations(&self) -> Result<Vec<serde_json::Value>, BuildError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node = nodes.get(&self.node).await.map_err(|e| explain(e, ""))?;
        let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
        Ok(taints.iter().map(|t| serde_json::json!({"key": t.key, "operator": "Exists", "effect": t.effect})).collect())
    }

    /// Builds `dockerfile` of the context of service `name` to `output` (the node's image store,
    /// or a push), streaming BuildKit's steps as events. Returns the image the pod runs.
    async fn build(
        &self,
        name: &str,
        dockerfile: &str,
        args: &BTreeMap<String, String>,
        output: &Output,
        reporter: &Reporter,
    ) -> Result<String, BuildError> {
        let context = format!("{CONTEXTS}/{name}");
        let command: Vec<String> = [
            "buildctl",
            "--addr",
            BUILDKIT_SOCKET,
            "build",
            "--frontend",
            "dockerfile.v0",
            "--local",
            &format!("context={context}"),
            "--local",
            &format!("dockerfile={context}"),
            "--opt",
            &format!("filename={dockerfile}"),
            "--opt",
            "image-resolve-mode=local",
            "--output",
            &output.buildkit(),
            "--progress",
            "plain",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Build args travel on the exec's stdin, never in its command line (the API server's
        // audit log records that): a count, then one `KEY=VALUE` line each, read by the shell
        // that runs buildctl (saying its pid first, so an interrupted build is killed) and then
        // prints its metadata file: the image's digest, which a pod pulls by (buildctl writes
        // that file by rename, so never straight to /dev/stdout).
        if let Some((key, _)) = args.iter().find(|(k, v)| k.contains(['\n', '=']) || v.contains('\n')) {
            return Err(BuildError::Failed {
                step: None,
                output: format!("build arg `{key}` holds a line break or `=` in its name"),
            });
        }
        let mut stdin = format!("{}\n", args.len());
        for (key, value) in args {
            stdin.push_str(&format!("{key}={value}\n"));
        }
        let script = "read -r n; i=0; while [ \"$i\" -lt \"$n\" ]; do IFS= read -r a; set -- \"$@\" --opt \"build-arg:$a\"; i=$((i+1)); done; \
                      meta=$(mktemp); \"$@\" --metadata-file \"$meta\" & pid=$!; echo \"devloop-build-pid $pid\" >&2; \
                      wait $pid; status=$?; [ $status -eq 0 ] && cat \"$meta\"; rm -f \"$meta\"; exit $status";
        let command: Vec<String> =
            ["sh".to_string(), "-c".into(), script.into(), "sh".into()].into_iter().chain(command).collect();
        let started = Instant::now();
        let pods_api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let params = AttachParams::default().container("buildkitd").stdout(true).stderr(true).stdin(true);
        let mut attached = pods_api.exec(BUILDER, command, &params).await.map_err(|e| explain(e, &self.namespace))?;
        let mut exec_in = attached.stdin().expect("stdin");
        {
            use tokio::io::AsyncWriteExt;
            exec_in
                .write_all(stdin.as_bytes())
                .await
                .map_err(|e| BuildError::Failed { step: None, output: e.to_string() })?;
            exec_in.flush().await.map_err(|e| BuildError::Failed { step: None, output: e.to_string() })?;
        }
        let stderr = attached.stderr().expect("stderr");
        let metadata = {
            let mut stdout = attached.stdout().expect("stdout");
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut text = String::new();
                let _ = (&mut stdout).take(1 << 20).read_to_string(&mut text).await;
                text
            })
        };
        let status = attached.take_status().expect("status");
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut progress = Progress::default();
        let mut guard = None;
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(pid) = line.strip_prefix("devloop-build-pid ").and_then(|p| p.trim().parse::<u32>().ok()) {
                guard = Some(KillOnDrop { client: self.client.clone(), namespace: self.namespace.clone(), pid });
                continue;
            }
            if let Some(event) = progress.line(&line) {
                reporter.emit(event);
            }
        }
        let status = status.await;
        drop(exec_in);
        let _ = attached.join().await;
        // buildctl has ended: nothing to kill.
        std::mem::forget(guard);
        let ok = status.as_ref().is_some_and(|s| s.status.as_deref() == Some("Success"));
        if !ok {
            let step = progress.failing_step();
            // The image was built; the registry refused it or did not answer.
            if let (Output::Registry { push, .. }, Some("exporting to image")) = (output, step.as_deref()) {
                return Err(BuildError::Push { image: push.clone(), output: progress.failing_output() });
            }
            return Err(BuildError::Failed { step, output: progress.failing_output() });
        }
        let metadata = metadata.await.unwrap_or_default();
        let digest = serde_json::from_str::<serde_json::Value>(&metadata)
            .ok()
            .and_then(|m| m["containerimage.digest"].as_str().map(str::to_string));
        let image = output.reference(digest.as_deref())?;
        reporter.emit(Event::Built { image: image.clone(), millis: started.elapsed().as_millis() as u64 });
        Ok(image)
    }

    async fn exec_ok(&self, command: Vec<String>) -> Result<(), BuildError> {
        let pods_api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let params = AttachParams::default().container("buildkitd").stdout(true).stderr(true).stdin(false);
        let shown = command.join(" ");
        let mut attached = pods_api.exec(BUILDER, command, &params).await.map_err(|e| explain(e, &self.namespace))?;
        let status = attached.take_status().expect("status");
        let mut out = String::new();
        if let Some(stderr) = attached.stderr() {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                out.push_str(&line);
                out.push('\n');
            }
        }
        let status = status.await;
        if status.as_ref().is_some_and(|s| s.status.as_deref() == Some("Success")) {
            Ok(())
        } else {
            Err(BuildError::Context(format!("`{shown}` failed in the builder: {}", out.trim())))
        }
    }
}

/// BuildKit's plain progress (`#5 [2/3] RUN make`, `#5 0.312 output`, `#5 DONE 0.4s`,
/// `#5 CACHED`, `#5 ERROR: ...`) turned into step events, with each step's output kept for the
/// error of a failed build.
#[derive(Default)]
struct Progress {
    names: BTreeMap<String, String>,
    output: BTreeMap<String, Vec<String>>,
    failed: Option<String>,
    tail: Vec<String>,
}

impl Progress {
    fn line(&mut self, line: &str) -> Option<Event> {
        self.tail.push(line.to_string());
        if self.tail.len() > 60 {
            self.tail.remove(0);
        }
        let rest = line.strip_prefix('#')?;
        let (id, text) = rest.split_once(' ')?;
        let id = id.to_string();
        let is_status = matches!(text.split_whitespace().next(), Some("DONE" | "CACHED" | "ERROR:" | "ERROR"));
        let is_output = text.starts_with(|c: char| c.is_ascii_digit());
        let names_a_step = text.starts_with('[') || (!self.names.contains_key(&id) && !is_output);
        if names_a_step && !is_status {
            self.names.insert(id.clone(), text.to_string());
            return Some(Event::BuildStep { step: text.to_string(), status: "running".into(), secs: None });
        }
        let step = self.names.get(&id).cloned().unwrap_or_else(|| format!("#{id}"));
        let mut words = text.split_whitespace();
        match words.next() {
            Some("DONE") => {
                let secs = words.next().and_then(|s| s.trim_end_matches('s').parse().ok());
                Some(Event::BuildStep { step, status: "done".into(), secs })
            }
            Some("CACHED") => Some(Event::BuildStep { step, status: "cached".into(), secs: None }),
            Some(w) if w.starts_with("ERROR") => {
                self.failed.get_or_insert(id);
                Some(Event::BuildStep { step, status: "error".into(), secs: None })
            }
            _ => {
                self.output.entry(id).or_default().push(text.to_string());
                None
            }
        }
    }

    fn failing_step(&self) -> Option<String> {
        self.failed.as_ref().and_then(|id| self.names.get(id).cloned())
    }

    fn failing_output(&self) -> String {
        match self.failed.as_ref().and_then(|id| self.output.get(id)) {
            Some(lines) if !lines.is_empty() => {
                lines.iter().rev().take(40).rev().cloned().collect::<Vec<_>>().join("\n")
            }
            _ => self.tail.join("\n"),
        }
    }
}

/// Removes the builder pod and the agent's Secrets when no service devloop manages in the
/// namespace is left (after `down`). Says whether it did.
pub async fn remove_if_unused(client: &kube::Client, namespace: &str) -> Result<bool, BuildError> {
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::api::ListParams;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let managed = deployments
        .list(&ListParams::default().labels(super::list::MANAGED))
        .await
        .map_err(|e| explain(e, namespace))?;
    if !managed.items.is_empty() {
        return Ok(false);
    }
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    // Another service's first `up` may be building (its release does not exist yet).
    if let Some(pod) = pods_api.get_opt(BUILDER).await.map_err(|e| explain(e, namespace))? {
        if !building(&pod).is_empty() {
            return Ok(false);
        }
    }
    let removed = match pods_api.delete(BUILDER, &DeleteParams::default().grace_period(0)).await {
        Ok(_) => true,
        Err(kube::Error::Api(status)) if status.code == 404 => false,
        Err(e) => return Err(explain(e, namespace).into()),
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    secrets
        .delete_collection(&DeleteParams::default(), &ListParams::default().labels("devloop.dev/part=agent"))
        .await
        .map_err(|e| explain(e, namespace))?;
    Ok(removed)
}

/// The Dockerfile of the dev image.
pub const DOCKERFILE: &str = "Dockerfile.develop";

/// The dev image a release runs.
#[derive(Clone, Debug)]
pub struct DevImage {
    /// `REPOSITORY:TAG`, or `REPOSITORY:TAG@DIGEST` when pulled from a registry.
    pub image: String,
    pub placement: Placement,
}

#[derive(Clone, Debug)]
pub enum Placement {
    /// Built into `node`'s image store, never pulled: the pod runs there. The node's taints are
    /// tolerated (the builder's node may be reserved for such pods).
    Pinned { node: String, tolerations: Vec<serde_json::Value> },
    /// Pushed to a registry: any node pulls it.
    Pulled,
}

/// What the build context leaves out besides `.dockerignore`: the values files (secrets never
/// reach the builder) and the agent the builder puts there itself. devloop.yaml's sync
/// excludes shape the sync, not the image (docker does not know them).
fn context_excludes(config: &Config) -> Vec<String> {
    let values = config.values_files().into_iter().map(|v| format!("/{}", v.trim_start_matches("./")));
    values.chain(std::iter::once("/devloop-agent".to_string())).collect()
}

/// The build inputs of a service: of its build context (docker's), the files its `rebuild:` rules name, without what only
/// deploys (the chart, the values files) or reconfigures (devloop.yaml).
pub fn build_inputs(config: &Config, root: &Path) -> Result<devloop_agent::manifest::Manifest, BuildError> {
    let filter = devloop_agent::filter::Filter::with(root, &context_excludes(config), Some(DOCKERFILE))
        .map_err(|e| BuildError::Context(e.to_string()))?;
    let scanned = devloop_agent::walk::scan(&Arc::new(filter), &devloop_agent::walk::Tree::new());
    let rules = Globs::new(&config.rebuild);
    let chart = config.chart.as_deref().map(|c| format!("{}/", c.trim_end_matches('/')));
    Ok(devloop_agent::walk::manifest_of(&scanned.tree)
        .into_iter()
        .filter(|(path, entry)| !entry.is_dir() && rules.first_match(path).is_some())
        .filter(|(path, _)| path != crate::config::FILE_NAME)
        .filter(|(path, _)| !chart.as_ref().is_some_and(|c| path.starts_with(c.as_str())))
        .collect())
}

/// Makes sure the dev image of the service's current build inputs is where its pod gets it
/// (the builder's node's store, or a registry): builds it (context synced first) unless that tag
/// was built already.
pub async fn dev_image(
    client: &kube::Client,
    namespace: &str,
    config: &Config,
    root: &Path,
    reporter: &Reporter,
) -> Result<DevImage, BuildError> {
    let agent = StaticAgent::find()?;
    let destination = registry::destination(client, &config.registry).await?;
    let inputs = {
        let (config, root) = (config.clone(), root.to_path_buf());
        tokio::task::spawn_blocking(move || build_inputs(&config, &root)).await.expect("scan task")?
    };
    // The namespace is part of the tag: an image another namespace built is never taken for
    // this one's, whatever the node's store holds.
    let built_for = format!("{}@{namespace}", agent.digest);
    let tag = tag(&inputs, DOCKERFILE, &config.build_args, &built_for);
    let output = match destination.target.repositories(namespace, &config.name) {
        None => Output::Node { image: image_ref(&config.name, &tag) },
        Some((push, pull)) => {
            let insecure = matches!(destination.target, registry::Target::Registry { insecure: true, .. });
            Output::Registry { push: format!("{push}:{tag}"), pull: format!("{pull}:{tag}"), insecure }
        }
    };
    reporter.emit(Event::ImageDestination { destination: output.shown(), why: destination.why.clone() });
    let pinned = matches!(output, Output::Node { .. });
    let builder = ensure(client, namespace, &config.builder, &agent, pinned).await?;
    let image = match builder.built(&config.name, &output).await? {
        Some(image) => {
            reporter.emit(Event::BuildSkipped { image: image.clone(), pushed: !pinned });
            image
        }
        None => {
            // While this service builds, `down` of another service leaves the builder alone.
            let mark = builder.mark_building(&config.name).await?;
            let built = async {
                builder.sync_context(config, root, &agent, reporter).await?;
                let image = builder.build(&config.name, DOCKERFILE, &config.build_args, &output, reporter).await?;
                builder.record(&config.name, &output, &image).await?;
                Ok::<_, BuildError>(image)
            }
            .await;
            mark.clear().await;
            built?
        }
    };
    let placement = match output {
        Output::Node { .. } => {
            Placement::Pinned { node: builder.node.clone(), tolerations: builder.tolerations().await? }
        }
        Output::Registry { .. } => Placement::Pulled,
    };
    Ok(DevImage { image, placement })
}

/// Where a build's image goes.
#[derive(Clone, Debug)]
enum Output {
    /// Into the builder node's store as `image`.
    Node { image: String },
    /// Pushed as `push` (`REPO:TAG` where the builder reaches the registry); the pod pulls
    /// `pull@DIGEST`.
    Registry { push: String, pull: String, insecure: bool },
}

impl Output {
    /// The image as the user reads it.
    fn shown(&self) -> String {
        match self {
            Output::Node { .. } => "the builder's node, no registry".into(),
            Output::Registry { push, .. } => push.rsplit_once(':').map(|(r, _)| r).unwrap_or(push).to_string(),
        }
    }

    /// BuildKit's `--output`.
    fn buildkit(&self) -> String {
        match self {
            Output::Node { image } => format!("type=image,name={image},unpack=true"),
            Output::Registry { push, insecure, .. } => {
                let mut out = format!("type=image,name={push},push=true,store=false");
                if *insecure {
                    out.push_str(",registry.insecure=true");
                }
                out
            }
        }
    }

    /// The reference the pod runs, given the digest BuildKit reported.
    fn reference(&self, digest: Option<&str>) -> Result<String, BuildError> {
        match (self, digest) {
            (Output::Node { image }, _) => Ok(image.clone()),
            (Output::Registry { pull, .. }, Some(digest)) => Ok(format!("{pull}@{digest}")),
            (Output::Registry { push, .. }, None) => {
                Err(BuildError::Failed { step: None, output: format!("BuildKit pushed {push} but reported no digest") })
            }
        }
    }

    /// What records this output on the builder (`devloop.dev/built-NAME`).
    fn key(&self) -> &str {
        match self {
            Output::Node { image } => image,
            Output::Registry { push, .. } => push,
        }
    }
}

/// The image reference a service's build gets.
pub fn image_ref(name: &str, tag: &str) -> String {
    format!("{REPOSITORY_PREFIX}/{name}:{tag}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_containerd_socket_is_the_kubelets_else_the_distributions_path() {
        let configz = r#"{"kubeletconfig":{"containerRuntimeEndpoint":"unix:///var/state/containerd.sock"}}"#;
        assert_eq!(socket_of("containerd://1.6.20", Some(configz)), "/var/state/containerd.sock");
        assert_eq!(socket_of("containerd://1.7.27-k3s1", None), "/run/k3s/containerd/containerd.sock");
        assert_eq!(socket_of("containerd://1.7.27", None), "/run/containerd/containerd.sock");
        // Not readable (no nodes/proxy right: a 403 body), or an endpoint that is not a path.
        assert_eq!(socket_of("containerd://1.7.27", Some("forbidden")), "/run/containerd/containerd.sock");
        let tcp = r#"{"kubeletconfig":{"containerRuntimeEndpoint":"tcp://10.0.0.1:1234"}}"#;
        assert_eq!(socket_of("containerd://2.0.0", Some(tcp)), "/run/containerd/containerd.sock");
    }

    #[test]
    fn progress_lines_become_steps_and_a_failure_keeps_its_output() {
        let mut p = Progress::default();
        let lines = [
            "#1 [internal] load build definition from Dockerfile.develop",
            "#1 DONE 0.0s",
            "#5 [2/3] COPY . /app",
            "#5 CACHED",
            "#6 [3/3] RUN false",
            "#6 0.120 something went wrong",
            "#6 ERROR: process \"/bin/sh -c false\" did not complete successfully: exit code: 1",
        ];
        let events: Vec<Event> = lines.iter().filter_map(|l| p.line(l)).collect();
        let statuses: Vec<String> = events
            .iter()
            .map(|e| match e {
                Event::BuildStep { status, .. } => status.clone(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(statuses, ["running", "done", "running", "cached", "running", "error"]);
        assert_eq!(p.failing_step().as_deref(), Some("[3/3] RUN false"));
        assert!(p.failing_output().contains("something went wrong"), "{}", p.failing_output());
    }

    #[test]
    fn the_build_inputs_are_the_rebuild_files_of_dockers_context() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let write = |rel: &str, body: &str| {
            let path = root.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, body).unwrap();
        };
        write("devloop.yaml", "name: web\nchart: charts/web\n");
        write("Dockerfile.develop", "FROM x\n");
        write("app.py", "print(1)\n");
        write("charts/web/Chart.yaml", "name: web\n");
        write("values.dev.yaml", "secrets: {a: b}\n");
        // Visual Studio's .dockerignore: the Dockerfile is an input all the same, as docker
        // sends it; .gitignore does not shape the context.
        write(".dockerignore", "**/Dockerfile*\n**/charts\n");
        write(".gitignore", "Dockerfile.develop\n");
        let config = Config::parse(&root.join("devloop.yaml"), "name: web\nchart: charts/web\n").unwrap();
        let inputs = build_inputs(&config, root).unwrap();
        assert_eq!(inputs.keys().collect::<Vec<_>>(), ["Dockerfile.develop"]);
        let before = tag(&inputs, DOCKERFILE, &BTreeMap::new(), "agent1");
        write("app.py", "print(2)\n");
        write("charts/web/Chart.yaml", "name: web2\n");
        assert_eq!(tag(&build_inputs(&config, root).unwrap(), DOCKERFILE, &BTreeMap::new(), "agent1"), before);
        write("Dockerfile.develop", "FROM y\n");
        assert_ne!(tag(&build_inputs(&config, root).unwrap(), DOCKERFILE, &BTreeMap::new(), "agent1"), before);
    }

    #[test]
    fn tags_follow_their_inputs_the_build_args_and_the_agent() {
        use devloop_agent::manifest::{Digest, Entry, Manifest};
        let file =
            |b: &[u8]| Entry::File { hash: Digest(*blake3::hash(b).as_bytes()), size: b.len() as u64, exec: false };
        let a: Manifest =
            [("Dockerfile.develop".to_string(), file(b"FROM x")), ("app.py".to_string(), file(b"1"))].into();
        let mut b = a.clone();
        assert_eq!(
            tag(&a, "Dockerfile.develop", &BTreeMap::new(), "agent1"),
            tag(&b, "Dockerfile.develop", &BTreeMap::new(), "agent1")
        );
        b.insert("app.py".into(), file(b"2"));
        assert_ne!(
            tag(&a, "Dockerfile.develop", &BTreeMap::new(), "agent1"),
            tag(&b, "Dockerfile.develop", &BTreeMap::new(), "agent1")
        );
        assert_ne!(
            tag(&a, "Dockerfile.develop", &BTreeMap::new(), "agent1@team-a"),
            tag(&a, "Dockerfile.develop", &BTreeMap::new(), "agent2@team-a")
        );
        assert_ne!(
            tag(&a, "Dockerfile.develop", &BTreeMap::new(), "agent1@team-a"),
            tag(&a, "Dockerfile.develop", &BTreeMap::new(), "agent1@team-b"),
            "another namespace's image is never this one's"
        );
        let args = BTreeMap::from([("BASE".to_string(), "python:3.11".to_string())]);
        assert_ne!(
            tag(&a, "Dockerfile.develop", &BTreeMap::new(), "agent1"),
            tag(&a, "Dockerfile.develop", &args, "agent1")
        );
        assert_eq!(tag(&a, "Dockerfile.develop", &BTreeMap::new(), "agent1").len(), 20);
    }
}
