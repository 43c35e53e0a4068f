//! How a protocol session reaches the supervisor.
//!
//! In a container, `devloop-agent run` is the main process and each `devloop-agent serve` (one per
//! exec) is another process: they talk over a unix socket at `ROOT/.devloop/agent.sock`, one JSON
//! request a connection (`restart`, `ready`, `subscribe`, `index_summary`, `index_records`),
//! answered by one JSON line (a [`RestartReport`], an index [`Summary`]) or by a stream of lines
//! (app events; chunks of the index's records, then their end). For a local target one process
//! does both and the session holds the [`Supervisor`] handle directly.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::debug;

use crate::index::{FilterKey, Index, Summary};
use crate::manifest::Record;
use crate::protocol::{FromAgent, RestartReport};
use crate::supervise::{AppEvent, Supervisor};
use crate::RESERVED_DIR;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ControlRequest {
    Restart,
    Ready,
    Subscribe,
    IndexSummary { key: FilterKey },
    IndexRecords { key: FilterKey },
}

/// One line of the answer to `index_records`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RecordsLine {
    Chunk(Vec<Record>),
    End,
    Failed(String),
}

/// Records per line of an `index_records` answer.
const RECORDS_CHUNK: usize = 4096;

pub fn socket_path(root: &Path) -> PathBuf {
    root.join(RESERVED_DIR).join("agent.sock")
}

/// Serves the control socket for `supervisor` (and the live index, when there is one) until the
/// task is dropped.
pub fn listen(root: &Path, supervisor: Supervisor, index: Option<Index>) -> io::Result<tokio::task::JoinHandle<()>> {
    let path = socket_path(root);
    std::fs::create_dir_all(path.parent().expect("socket has a parent"))?;
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    Ok(tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (supervisor, index) = (supervisor.clone(), index.clone());
            tokio::spawn(async move {
                if let Err(e) = answer(stream, supervisor, index).await {
                    debug!(error = %e, "control connection");
                }
            });
        }
    }))
}

async fn answer(stream: UnixStream, supervisor: Supervisor, index: Option<Index>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let request: ControlRequest = serde_json::from_str(&line).map_err(io::Error::other)?;
    match request {
        ControlRequest::Restart => reply(&mut write, &supervisor.restart().await).await,
        ControlRequest::Ready => reply(&mut write, &supervisor.ready().await).await,
        // No index: the connection closes unanswered and the session walks its tree itself.
        ControlRequest::IndexSummary { key } => match index {
            Some(index) => reply(&mut write, &index.summary(key).await).await,
            None => Ok(()),
        },
        ControlRequest::IndexRecords { key } => {
            let Some(index) = index else { return Ok(()) };
            match index.records(key).await {
                Ok(records) => {
                    for chunk in records.chunks(RECORDS_CHUNK) {
                        reply(&mut write, &RecordsLine::Chunk(chunk.to_vec())).await?;
                    }
                    reply(&mut write, &RecordsLine::End).await
                }
                Err(message) => reply(&mut write, &RecordsLine::Failed(message)).await,
            }
        }
        ControlRequest::Subscribe => {
            let mut events = supervisor.subscribe();
            loop {
                let event = match events.recv().await {
                    Ok(event) => event,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return Ok(()),
                };
                reply(&mut write, &to_message(event)).await?;
            }
        }
    }
}

async fn reply<T: Serialize>(write: &mut tokio::net::unix::OwnedWriteHalf, value: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await
}

fn to_message(event: AppEvent) -> FromAgent {
    match event {
        AppEvent::Output { stream, line } => FromAgent::Output { stream, line },
        AppEvent::Exited { pid, code } => FromAgent::Exited { pid, code },
    }
}

/// A session's way to the supervisor.
#[derive(Clone)]
pub enum Link {
    /// Same process (`devloop-agent run --stdio`).
    InProcess(Supervisor),
    /// Over the control socket of a `devloop-agent run` in the same container.
    Socket(PathBuf),
}

impl Link {
    pub async fn restart(&self) -> RestartReport {
        match self {
            Link::InProcess(supervisor) => supervisor.restart().await,
            Link::Socket(path) => ask(path, ControlRequest::Restart).await,
        }
    }

    /// The app waits for the session's first restart to start (a local target's agent, `run
    /// --stdio --wait`). The `run` of a pod starts its app at once: never waiting.
    pub fn app_waiting(&self) -> bool {
        match self {
            Link::InProcess(supervisor) => supervisor.waiting(),
            Link::Socket(_) => false,
        }
    }

    pub async fn ready(&self) -> RestartReport {
        match self {
            Link::InProcess(supervisor) => supervisor.ready().await,
            Link::Socket(path) => ask(path, ControlRequest::Ready).await,
        }
    }

    /// The app's events as protocol messages, or `None` when no supervisor runs.
    pub async fn subscribe(&self) -> Option<mpsc::Receiver<FromAgent>> {
        let (tx, rx) = mpsc::channel(1024);
        match self {
            Link::InProcess(supervisor) => {
                let mut events = supervisor.subscribe();
                tokio::spawn(async move {
                    loop {
                        match events.recv().await {
                            Ok(event) => {
                                if tx.send(to_message(event)).await.is_err() {
                                    return;
                                }
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                            Err(_) => return,
                        }
                    }
                });
            }
            Link::Socket(path) => {
                let stream = UnixStream::connect(path).await.ok()?;
                let (read, mut write) = stream.into_split();
                reply(&mut write, &ControlRequest::Subscribe).await.ok()?;
                tokio::spawn(async move {
                    let _keep = write;
                    let mut lines = BufReader::new(read).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let Ok(message) = serde_json::from_str::<FromAgent>(&line) else { continue };
                        if tx.send(message).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
        Some(rx)
    }
}

/// The live index of the `devloop-agent run` beside this session: `None` when there is none
/// (no `run`, or one without an index), and the session walks its tree itself.
impl Link {
    pub async fn index_summary(&self, key: &FilterKey) -> Option<Result<Summary, String>> {
        let Link::Socket(path) = self else { return None };
        let mut lines = request_lines(path, ControlRequest::IndexSummary { key: key.clone() }).await?;
        let line = lines.next_line().await.ok()??;
        Some(serde_json::from_str(&line).unwrap_or_else(|e| Err(format!("bad answer from the agent's index: {e}"))))
    }

    pub async fn index_records(&self, key: &FilterKey) -> Option<Result<Vec<Record>, String>> {
        let Link::Socket(path) = self else { return None };
        let mut lines = request_lines(path, ControlRequest::IndexRecords { key: key.clone() }).await?;
        let mut records = Vec::new();
        loop {
            let line = match lines.next_line().await {
                Ok(Some(line)) => line,
                Ok(None) => return Some(Err("the agent's index closed the connection".into())),
                Err(e) => return Some(Err(format!("cannot read the agent's index: {e}"))),
            };
            match serde_json::from_str(&line) {
                Ok(RecordsLine::Chunk(chunk)) => records.extend(chunk),
                Ok(RecordsLine::End) => return Some(Ok(records)),
                Ok(RecordsLine::Failed(message)) => return Some(Err(message)),
                Err(e) => return Some(Err(format!("bad answer from the agent's index: {e}"))),
            }
        }
    }
}

/// Sends one request; the answer's lines, or `None` when no agent listens.
async fn request_lines(
    path: &Path,
    request: ControlRequest,
) -> Option<tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>> {
    let stream = UnixStream::connect(path).await.ok()?;
    let (read, mut write) = stream.into_split();
    reply(&mut write, &request).await.ok()?;
    Some(BufReader::new(read).lines())
}

async fn ask(path: &Path, request: ControlRequest) -> RestartReport {
    let stream = match UnixStream::connect(path).await {
        Ok(stream) => stream,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
            return RestartReport::Unsupervised
        }
        Err(e) => return RestartReport::Failed { message: format!("cannot reach the supervisor: {e}") },
    };
    let (read, mut write) = stream.into_split();
    if let Err(e) = reply(&mut write, &request).await {
        return RestartReport::Failed { message: format!("cannot reach the supervisor: {e}") };
    }
    let mut line = String::new();
    match BufReader::new(read).read_line(&mut line).await {
        Ok(n) if n > 0 => serde_json::from_str(&line)
            .unwrap_or_else(|e| RestartReport::Failed { message: format!("bad answer from the supervisor: {e}") }),
        Ok(_) => RestartReport::Failed { message: "the supervisor closed the connection".into() },
        Err(e) => RestartReport::Failed { message: format!("cannot reach the supervisor: {e}") },
    }
}
