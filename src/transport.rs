//! A byte stream to an agent. The session sees only `AsyncRead + AsyncWrite`; what is at the other
//! end (a child process, a command such as `podman exec -i`, later a Kubernetes exec) is this
//! module's business alone.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::process::{Child, Command};

use crate::config::Config;

pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// One open stream to an agent. Dropping it ends the session (and kills a child process).
pub struct Connection {
    pub reader: Reader,
    pub writer: Writer,
    pub child: Option<Child>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot start `{program}`: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("no pod labelled {selector} in namespace {namespace}")]
    NoPod { namespace: String, selector: String },
    #[error("pod {pod} is not Ready: {why}")]
    PodNotReady { pod: String, why: String },
    #[error(transparent)]
    Cluster(crate::cluster::ClusterError),
}

impl TransportError {
    /// Retrying cannot help (401/403, no such namespace, no such program): a reconnect loop
    /// says so and stops instead of trying forever.
    pub fn is_permanent(&self) -> bool {
        match self {
            TransportError::Spawn { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            TransportError::Cluster(e) => e.is_permanent(),
            TransportError::NoPod { .. } | TransportError::PodNotReady { .. } => false,
        }
    }

    pub fn hint(&self) -> Option<String> {
        match self {
            TransportError::Spawn { program, source } if source.kind() == std::io::ErrorKind::NotFound => {
                Some(format!(
                "`{program}` is not on PATH; install it, or set DEVLOOP_AGENT to the agent binary for local targets"
            ))
            }
            TransportError::Spawn { .. } => None,
            TransportError::NoPod { namespace, .. } => {
                Some(format!("deploy the service first, or pick its namespace with -n (now `{namespace}`)"))
            }
            TransportError::PodNotReady { pod, .. } => Some(format!("`kubectl describe pod {pod}` says more")),
            TransportError::Cluster(e) => e.hint(),
        }
    }
}

pub type ConnectFuture<'a> = Pin<Box<dyn Future<Output = Result<Connection, TransportError>> + Send + 'a>>;

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn connect(&self) -> ConnectFuture<'_> {
        (**self).connect()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

pub trait Transport: Send + Sync {
    /// Opens a new stream to an agent that is about to speak the protocol.
    fn connect(&self) -> ConnectFuture<'_>;
    /// For messages: where the stream goes.
    fn describe(&self) -> String;
}

/// Any command whose stdin/stdout reach `devloop-agent serve`.
#[derive(Clone, Debug)]
pub struct CommandTransport {
    argv: Vec<String>,
    label: String,
}

impl CommandTransport {
    pub fn new(argv: Vec<String>) -> CommandTransport {
        let label = shell_words::join(&argv);
        CommandTransport { argv, label }
    }

    /// The agent as a child process serving a local folder. With a `run` command in the config
    /// the same process also supervises the app (`devloop-agent run --stdio`), starting it after
    /// the first sync; without one it only syncs (`devloop-agent serve`).
    pub fn local(agent: &Path, root: &Path, config: &Config) -> CommandTransport {
        let mut argv = vec![agent.display().to_string()];
        if config.run.is_empty() {
            argv.extend(["serve".into(), "--root".into(), root.display().to_string()]);
        } else {
            argv.extend(["run".into(), "--stdio".into(), "--wait".into(), "--root".into(), root.display().to_string()]);
            argv.extend(["--grace".into(), config.grace.clone()]);
            if !config.build.is_empty() {
                argv.extend(["--build".into(), shell_words::join(&config.build)]);
            }
            if let Some(ready) = &config.ready {
                argv.extend(["--ready".into(), ready.probe(), "--ready-timeout".into(), ready.timeout.clone()]);
            }
            argv.push("--".into());
            argv.extend(config.run.iter().cloned());
        }
        CommandTransport { argv, label: format!("local:{}", root.display()) }
    }
}

impl Transport for CommandTransport {
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(async move {
            let mut child = Command::new(&self.argv[0])
                .args(&self.argv[1..])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .map_err(|source| TransportError::Spawn { program: self.argv[0].clone(), source })?;
            let writer = child.stdin.take().expect("piped stdin");
            let reader = child.stdout.take().expect("piped stdout");
            Ok(Connection { reader: Box::new(reader), writer: Box::new(writer), child: Some(child) })
        })
    }

    fn describe(&self) -> String {
        self.label.clone()
    }
}

/// Where the agent binary for local targets is: `$DEVLOOP_AGENT`, next to this executable, or PATH.
pub fn find_agent() -> PathBuf {
    if let Some(path) = std::env::var_os("DEVLOOP_AGENT") {
        return PathBuf::from(path);
    }
    if let Ok(exe) = std::env::current_exe() {
        let sibling = exe.with_file_name("devloop-agent");
        if sibling.is_file() {
            return sibling;
        }
    }
    PathBuf::from("devloop-agent")
}

/// The folder the code lives in inside the dev container (where `Dockerfile.develop` puts it).
pub const CONTAINER_ROOT: &str = "/app";

/// An exec session into the Ready pod of a service, running `devloop-agent serve`.
///
/// One exec per connection. The pod is watched while the session lasts: when it is deleted,
/// replaced or stops being Ready, the stream ends, and the session reconnects to the new pod and
/// resyncs by itself.
pub struct KubeTransport {
    pods: kube::Api<k8s_openapi::api::core::v1::Pod>,
    namespace: String,
    selector: String,
    root: String,
}

impl KubeTransport {
    /// The pods of service `name`: those labelled `app.kubernetes.io/name=NAME`.
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> KubeTransport {
        KubeTransport {
            pods: kube::Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            selector: format!("app.kubernetes.io/name={name}"),
            root: CONTAINER_ROOT.to_string(),
        }
    }

    async fn ready_pod(&self) -> Result<(String, String), TransportError> {
        use kube::api::ListParams;
        let list = self
            .pods
            .list(&ListParams::default().labels(&self.selector))
            .await
            .map_err(|e| TransportError::Cluster(crate::cluster::explain(e, &self.namespace)))?;
        let mut pods: Vec<_> = list.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
        pods.sort_by_key(|p| std::cmp::Reverse(p.metadata.creation_timestamp.clone()));
        if pods.is_empty() {
            return Err(TransportError::NoPod { namespace: self.namespace.clone(), selector: self.selector.clone() });
        }
        for pod in &pods {
            if pod_is_ready(pod) {
                let name = pod.metadata.name.clone().unwrap_or_default();
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                return Ok((name, uid));
            }
        }
        let pod = &pods[0];
        Err(TransportError::PodNotReady {
            pod: pod.metadata.name.clone().unwrap_or_default(),
            why: not_ready_reason(pod),
        })
    }
}

/// Whether the pod reports the Ready condition.
pub fn pod_is_ready(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Why a pod is not Ready, in the words `kubectl describe` would use.
pub fn not_ready_reason(pod: &k8s_openapi::api::core::v1::Pod) -> String {
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

impl Transport for KubeTransport {
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(async move {
            use kube::api::AttachParams;
            let (pod, uid) = self.ready_pod().await?;
            let params = AttachParams::default().stdin(true).stdout(true).stderr(false);
            let command = ["devloop-agent", "serve", "--root", self.root.as_str()];
            let mut attached = self
                .pods
                .exec(&pod, command, &params)
                .await
                .map_err(|e| TransportError::Cluster(crate::cluster::explain(e, &self.namespace)))?;
            let (mut exec_out, mut exec_in) = (attached.stdout().expect("stdout"), attached.stdin().expect("stdin"));
            // The session talks to one end of a pipe; a task joins the other end to the exec and
            // closes it when the pod goes away.
            let (ours, theirs) = tokio::io::duplex(DUPLEX_BUFFER);
            let (mut from_session, mut to_session) = tokio::io::split(theirs);
            let pods = self.pods.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::io::copy(&mut exec_out, &mut to_session) => {}
                    _ = tokio::io::copy(&mut from_session, &mut exec_in) => {}
                    _ = pod_gone(pods, &pod, &uid) => {}
                }
                attached.abort();
            });
            let (reader, writer) = tokio::io::split(ours);
            Ok(Connection { reader: Box::new(reader), writer: Box::new(writer), child: None })
        })
    }

    fn describe(&self) -> String {
        format!("pod {} in {}", self.selector, self.namespace)
    }
}

const DUPLEX_BUFFER: usize = 1 << 20;

/// Resolves when the pod is deleted, replaced (another uid) or no longer Ready.
async fn pod_gone(pods: kube::Api<k8s_openapi::api::core::v1::Pod>, name: &str, uid: &str) {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        match pods.get_opt(name).await {
            Ok(Some(pod))
                if pod.metadata.uid.as_deref() == Some(uid)
                    && pod.metadata.deletion_timestamp.is_none()
                    && pod_is_ready(&pod) => {}
            Ok(_) => return,
            // The API server is unreachable: the exec itself will tell.
            Err(_) => {}
        }
    }
}
