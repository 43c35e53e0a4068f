//! The Kubernetes transport: one kube-rs exec of `devloop-agent serve` into the newest running
//! pod of a service's current ReplicaSet (Ready or not: a crashed app must still get its fix),
//! per connection, into the app's container (never a sidecar).

use k8s_openapi::api::core::v1::Pod;
use kube::api::AttachParams;

use super::access::{explain, ClusterError};
use super::pods::{self, PodError, Until};
use crate::sync::transport::{ConnectFuture, Connection, Transport, TransportError};

/// The folder the code lives in inside the dev container (where `Dockerfile.develop` puts it).
pub const CONTAINER_ROOT: &str = "/app";

/// An exec session into a service's pod, running `devloop-agent serve`.
///
/// One exec per connection. The pod is watched while the session lasts: when it is deleted,
/// replaced or its container stops, the stream ends, and the session reconnects to the pod of
/// the moment and resyncs by itself. A pod whose app is not Ready keeps its session.
pub struct KubeTransport {
    client: kube::Client,
    pods: kube::Api<Pod>,
    namespace: String,
    target: Target,
    command: Vec<String>,
}

enum Target {
    /// The newest running pod of a service's current ReplicaSet.
    Service(String),
    /// One pod by name (the builder).
    Pod(String),
}

impl KubeTransport {
    /// The pods of service `name` (see [`pods::selector`]), the agent serving the app's folder.
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> KubeTransport {
        let command = ["devloop-agent", "serve", "--root", CONTAINER_ROOT].map(String::from).to_vec();
        KubeTransport {
            pods: kube::Api::namespaced(client.clone(), namespace),
            client,
            namespace: namespace.into(),
            target: Target::Service(name.into()),
            command,
        }
    }

    /// Pod `pod`, running `command` (an agent serving some folder of it).
    pub fn pod(client: kube::Client, namespace: &str, pod: &str, command: Vec<String>) -> KubeTransport {
        KubeTransport {
            pods: kube::Api::namespaced(client.clone(), namespace),
            client,
            namespace: namespace.into(),
            target: Target::Pod(pod.into()),
            command,
        }
    }

    /// The pod to attach to, its container (for a service), and what ends the session on it.
    async fn choose(&self) -> Result<(Pod, Option<String>, Until), PodError> {
        match &self.target {
            Target::Service(name) => {
                let pod = pods::attachable(&self.client, &self.namespace, name).await?;
                let container = pods::dev_container(&pod, name);
                Ok((pod, container, Until::Stopped))
            }
            Target::Pod(name) => {
                let pod = self.pods.get(name).await.map_err(|e| PodError::Cluster(explain(e, &self.namespace)))?;
                if pods::is_ready(&pod) {
                    Ok((pod, None, Until::NotReady))
                } else {
                    let why = pods::not_ready_reason(&pod);
                    Err(PodError::NotReady { namespace: self.namespace.clone(), pod: name.clone(), why })
                }
            }
        }
    }
}

impl From<PodError> for TransportError {
    fn from(e: PodError) -> TransportError {
        let permanent = matches!(&e, PodError::Cluster(c) if c.is_permanent());
        TransportError::Unavailable { message: e.to_string(), hint: e.hint(), permanent }
    }
}

impl Transport for KubeTransport {
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(async move {
            // An API server that went silent (dropped packets, a stopped process) is reported
            // in seconds; the session's reconnect loop tries again.
            let (pod, container, until) =
                tokio::time::timeout(CONNECT_LIMIT, self.choose()).await.map_err(|_| {
                    PodError::Cluster(ClusterError::Unreachable(format!("no answer within {CONNECT_LIMIT:?}")))
                })??;
            let name = pod.metadata.name.clone().unwrap_or_default();
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            let mut params = AttachParams::default().stdin(true).stdout(true).stderr(false);
            if let Some(container) = &container {
                params = params.container(container.as_str());
            }
            let mut attached =
                tokio::time::timeout(CONNECT_LIMIT, self.pods.exec(&name, self.command.clone(), &params))
                    .await
                    .map_err(|_| {
                        PodError::Cluster(ClusterError::Unreachable(format!("no answer within {CONNECT_LIMIT:?}")))
                    })?
                    .map_err(|e| PodError::Cluster(explain(e, &self.namespace)))?;
            let (mut exec_out, mut exec_in) = (attached.stdout().expect("stdout"), attached.stdin().expect("stdin"));
            // The session talks to one end of a pipe; a task joins the other end to the exec and
            // closes it when the pod goes away.
            let (ours, theirs) = tokio::io::duplex(DUPLEX_BUFFER);
            let (mut from_session, mut to_session) = tokio::io::split(theirs);
            let watched = self.pods.clone();
            let service = match &self.target {
                Target::Service(service) => service.clone(),
                Target::Pod(_) => String::new(),
            };
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::io::copy(&mut exec_out, &mut to_session) => {}
                    _ = tokio::io::copy(&mut from_session, &mut exec_in) => {}
                    _ = pods::gone(watched, &name, &uid, &service, until) => {}
                }
                attached.abort();
            });
            let (reader, writer) = tokio::io::split(ours);
            Ok(Connection { reader: Box::new(reader), writer: Box::new(writer), child: None })
        })
    }

    fn describe(&self) -> String {
        match &self.target {
            Target::Service(name) => format!("pod {} in {}", pods::selector(name), self.namespace),
            Target::Pod(name) => format!("pod {name} in {}", self.namespace),
        }
    }
}

const DUPLEX_BUFFER: usize = 1 << 20;
/// Longest wait for the API server while connecting (choosing the pod, opening the exec).
const CONNECT_LIMIT: std::time::Duration = std::time::Duration::from_secs(6);
