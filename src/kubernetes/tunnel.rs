//! Localhost tunnels to the service's pod (kube-rs port-forward), and the record of running `up`
//! sessions that `list-uris` reads.
//!
//! Each accepted connection is forwarded to a pod of the service's current ReplicaSet (a Ready
//! one when there is one), chosen when it is accepted, so a tunnel follows rollouts and
//! replaced pods. The port-forward's error channel is read, and a connection ends when its pod
//! goes away: no connection hangs on a pod that is gone.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tracing::debug;

/// A running tunnel: `http://localhost:LOCAL` → pod port `remote`.
pub struct Tunnel {
    pub local: u16,
    pub remote: u16,
    /// The service whose pods it reaches.
    pub name: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listens on `127.0.0.1:preferred` (or any free port when taken) and forwards each connection to
/// port `remote` of a current pod of service `name`.
pub async fn open(
    client: kube::Client,
    namespace: String,
    name: String,
    preferred: u16,
    remote: u16,
) -> std::io::Result<Tunnel> {
    let listener = match TcpListener::bind(("127.0.0.1", preferred)).await {
        Ok(listener) => listener,
        Err(_) => TcpListener::bind(("127.0.0.1", 0)).await?,
    };
    let local = listener.local_addr()?.port();
    let service = name.clone();
    let task = tokio::spawn(async move {
        loop {
            // A failed accept (too many open files, a connection reset before it was taken)
            // ends nothing: the next one is accepted.
            let mut conn = match listener.accept().await {
                Ok((conn, _)) => conn,
                Err(e) => {
                    debug!(error = %e, "tunnel accept");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = conn.set_nodelay(true);
            let (client, namespace, name) = (client.clone(), namespace.clone(), name.clone());
            tokio::spawn(async move {
                if let Err(e) = forward(&client, &namespace, &name, remote, &mut conn).await {
                    debug!(error = %e, "tunnel connection");
                }
            });
        }
    });
    Ok(Tunnel { local, remote, name: service, task })
}

/// Forwards one accepted connection. Its first bytes are read before a pod is dialled and kept:
/// when the port-forward fails before the pod said anything (the app restarting, a pod that went
/// away between the choice and the dial), the next pod of the moment is dialled with the same
/// bytes, for up to [`REDIAL_FOR`]. Once the pod has answered, the connection is the pod's.
async fn forward(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    remote: u16,
    conn: &mut tokio::net::TcpStream,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A client that waits for the server to speak first (a database) sends nothing: then the
    // pod is dialled at once and nothing is redialled.
    let mut first = vec![0u8; 64 << 10];
    match tokio::time::timeout(std::time::Duration::from_millis(300), conn.read(&mut first)).await {
        Ok(Ok(0)) => return Ok(()),
        Ok(Ok(n)) => first.truncate(n),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => first.clear(),
    }
    let deadline = tokio::time::Instant::now() + REDIAL_FOR;
    loop {
        match dial(client, namespace, name, remote, &first).await {
            Ok(Dialled { forwarder, mut stream, answer, error, pod, uid }) => {
                conn.write_all(&answer).await?;
                let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
                let gone = super::pods::gone(pods, &pod, &uid, name, super::pods::Until::Stopped);
                let result = tokio::select! {
                    copied = tokio::io::copy_bidirectional(conn, &mut stream) => copied.map(|_| ()).map_err(anyhow::Error::from),
                    // What the kubelet says of the port (nothing listens, the pod's network is gone).
                    Some(message) = error => Err(anyhow::anyhow!("port-forward to {pod}: {message}")),
                    () = gone => Err(anyhow::anyhow!("pod {pod} went away")),
                };
                drop(stream);
                forwarder.abort();
                return result;
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                debug!(error = %e, "tunnel: no answer yet, dialling again");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// How long a connection whose pod has not answered yet is dialled again.
const REDIAL_FOR: std::time::Duration = std::time::Duration::from_secs(3);

/// A port-forward whose pod has answered the connection's first bytes.
struct Dialled<E> {
    forwarder: kube::api::Portforwarder,
    stream: Box<dyn PortStream>,
    answer: Vec<u8>,
    error: E,
    pod: String,
    uid: String,
}

trait PortStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> PortStream for T {}

/// Dials the pod of the moment, sends `first`, and waits for the first bytes of its answer.
async fn dial(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    remote: u16,
    first: &[u8],
) -> anyhow::Result<Dialled<impl std::future::Future<Output = Option<String>>>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pod = super::pods::serving(client, namespace, name).await?;
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let pod = pod.metadata.name.unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut forwarder = pods.portforward(&pod, &[remote]).await?;
    let mut stream = forwarder.take_stream(remote).ok_or_else(|| anyhow::anyhow!("no stream for port {remote}"))?;
    let mut error =
        Box::pin(forwarder.take_error(remote).ok_or_else(|| anyhow::anyhow!("no error channel for port {remote}"))?);
    if first.is_empty() {
        return Ok(Dialled { forwarder, stream: Box::new(stream), answer: Vec::new(), error, pod, uid });
    }
    stream.write_all(first).await?;
    let mut answer = vec![0u8; 64 << 10];
    let n = tokio::select! {
        n = stream.read(&mut answer) => n?,
        Some(message) = &mut error => anyhow::bail!("port-forward to {pod}: {message}"),
        () = tokio::time::sleep(REDIAL_FOR) => anyhow::bail!("pod {pod} did not answer"),
    };
    if n == 0 {
        forwarder.abort();
        anyhow::bail!("pod {pod} closed the connection before answering");
    }
    answer.truncate(n);
    Ok(Dialled { forwarder, stream: Box::new(stream), answer, error, pod, uid })
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionRecord {
    pub name: String,
    pub namespace: String,
    pub pid: u32,
    pub urls: Vec<String>,
}

fn sessions_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("devloop").join("sessions"))
}

impl SessionRecord {
    fn path(&self) -> Option<PathBuf> {
        sessions_dir().map(|d| d.join(format!("{}.{}.json", self.namespace, self.name)))
    }

    /// Writes the record; it is removed when the returned guard drops.
    pub fn publish(self) -> Option<RecordGuard> {
        let path = self.path()?;
        std::fs::create_dir_all(path.parent()?).ok()?;
        std::fs::write(&path, serde_json::to_vec(&self).ok()?).ok()?;
        Some(RecordGuard(path))
    }

    /// The records of live `up` sessions in `namespace` (stale ones, whose process is gone, are
    /// removed).
    pub fn live(namespace: &str) -> Vec<SessionRecord> {
        let Some(dir) = sessions_dir() else { return Vec::new() };
        let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let Ok(bytes) = std::fs::read(entry.path()) else { continue };
            let Ok(record) = serde_json::from_slice::<SessionRecord>(&bytes) else { continue };
            // SAFETY: kill with signal 0 only checks that the process exists.
            let alive = unsafe { libc::kill(record.pid as i32, 0) } == 0;
            if !alive {
                let _ = std::fs::remove_file(entry.path());
            } else if record.namespace == namespace {
                records.push(record);
            }
        }
        records.sort_by(|a, b| a.name.cmp(&b.name));
        records
    }
}

pub struct RecordGuard(PathBuf);

impl Drop for RecordGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
