//! Localhost tunnels to the service's pod (kube-rs port-forward), and the record of running `up`
//! sessions that `list-uris` reads.
//!
//! Each accepted connection is forwarded to the Ready pod of that moment, so a tunnel survives
//! the pod being replaced.

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
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Opens a tunnel on `preferred` when it is free, else on any free port.
/// Listens on `127.0.0.1:preferred` (or any free port when taken) and forwards each connection to
/// port `remote` of service `name`'s Ready pod of that moment.
pub async fn open(
    pods: Api<Pod>,
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
    let task = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (pods, namespace, name) = (pods.clone(), namespace.clone(), name.clone());
            tokio::spawn(async move {
                if let Err(e) = forward(&pods, &namespace, &name, remote, &mut conn).await {
                    debug!(error = %e, "tunnel connection");
                }
            });
        }
    });
    Ok(Tunnel { local, remote, task })
}

async fn forward(
    pods: &Api<Pod>,
    namespace: &str,
    name: &str,
    remote: u16,
    conn: &mut tokio::net::TcpStream,
) -> anyhow::Result<()> {
    let pod = super::pods::ready(pods, namespace, name).await?;
    let pod = pod.metadata.name.unwrap_or_default();
    let mut forwarder = pods.portforward(&pod, &[remote]).await?;
    let mut stream = forwarder.take_stream(remote).ok_or_else(|| anyhow::anyhow!("no stream for port {remote}"))?;
    tokio::io::copy_bidirectional(conn, &mut stream).await?;
    drop(stream);
    forwarder.abort();
    Ok(())
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
