//! One protocol session: handshake, the agent's manifest, then batches until `Bye`.
//!
//! Generic over the byte stream, so the same code serves stdin/stdout in a container, a child
//! process of the CLI, and an in-memory duplex in tests. Everything the agent says goes through
//! one writer task, so app output can interleave with batch acknowledgements.

use std::fs;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, Instrument};

use crate::apply::{Applier, TreeUpdate};
use crate::control::Link;
use crate::filter::Filter;
use crate::index::{FilterKey, Summary};
use crate::lock::{SessionLock, LOCK_WAIT};
use crate::protocol::{
    self, Applied, Chmod, Frame, FrameReader, FrameWriter, FromAgent, ProtocolError, ToAgent, MAX_BATCH_ENTRIES,
};
use crate::walk::{self, Tree};
use crate::RESERVED_DIR;

/// Records per manifest message.
const MANIFEST_CHUNK: usize = 4096;

#[derive(Clone)]
pub struct ServeOptions {
    pub root: PathBuf,
    pub max_file_size: u64,
    /// The way to the supervisor that restarts the app after a batch.
    pub link: Link,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("cannot prepare the root {root}: {source}")]
    Root { root: PathBuf, source: io::Error },
    #[error("the client's exclude patterns are invalid: {0}")]
    Excludes(#[from] crate::filter::FilterError),
    #[error("the agent's live index failed: {0}")]
    Index(String),
    #[error("another devloop session (agent pid {holder}) serves {root} and did not end within {waited:?}; two sessions on one root would undo each other's work")]
    Busy { root: PathBuf, holder: crate::lock::Holder, waited: std::time::Duration },
}

/// Serves one session. Returns when the client says `Bye` or the stream closes.
pub async fn serve<R, W>(reader: R, writer: W, options: ServeOptions) -> Result<(), ServeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = reader;
    let mut writer = tokio::io::BufWriter::new(writer);
    protocol::handshake(&mut reader, &mut writer).await?;
    let mut frames = FrameReader::new(reader);

    let (out, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_all(FrameWriter::new(writer), rx));
    let result = async {
        let hello = match frames.message::<ToAgent>().await? {
            ToAgent::Hello { client, session, excludes, docker_context, ask } => {
                info!(%client, %session, root = %options.root.display(), "session");
                Hello { session, excludes, docker_context, ask }
            }
            other => return Err(unexpected("hello", &other).into()),
        };
        session(&mut frames, &out, &options, &hello).await
    }
    .await;
    if let Err(err) = &result {
        if !matches!(err, ServeError::Protocol(e) if e.is_disconnect()) {
            let _ = out.send(FromAgent::Fatal { message: err.to_string() });
        }
    }
    drop(out);
    let written = writer.await.expect("writer task panicked");
    result?;
    written.map_err(ServeError::from)
}

/// Writes messages as they come, flushing whenever the queue runs dry.
async fn write_all<W: AsyncWrite + Unpin>(
    mut out: FrameWriter<W>,
    mut rx: mpsc::UnboundedReceiver<FromAgent>,
) -> Result<(), ProtocolError> {
    while let Some(message) = rx.recv().await {
        out.message(&message).await?;
        while let Ok(more) = rx.try_recv() {
            out.message(&more).await?;
        }
        out.flush().await?;
    }
    Ok(())
}

type Out = mpsc::UnboundedSender<FromAgent>;

/// What the client's hello asked for.
struct Hello {
    session: String,
    excludes: Vec<String>,
    docker_context: Option<String>,
    ask: bool,
}

async fn session<R: AsyncRead + Unpin>(
    frames: &mut FrameReader<R>,
    out: &Out,
    options: &ServeOptions,
    hello: &Hello,
) -> Result<(), ServeError> {
    let Hello { session: session_id, excludes, docker_context, ask } = hello;
    let root = options.root.clone();
    let root_err = |source| ServeError::Root { root: root.clone(), source };
    fs::create_dir_all(&root).map_err(root_err)?;
    // One session per root at a time: a reconnect may race the exec of the session it replaces,
    // which ends as soon as its stream closes. Until then this one waits.
    let _lock = match SessionLock::acquire(&root, session_id, LOCK_WAIT).await.map_err(root_err)? {
        Ok(lock) => lock,
        Err(holder) => return Err(ServeError::Busy { root: root.clone(), holder, waited: LOCK_WAIT }),
    };
    let mut applier = Some(Applier::new(&root, options.max_file_size).map_err(root_err)?);
    let filter = Arc::new(Filter::with(&root, excludes, docker_context.as_deref())?);

    let _ = out.send(FromAgent::Welcome {
        agent: env!("CARGO_PKG_VERSION").into(),
        root: root.display().to_string(),
        max_file_size: options.max_file_size,
        app_waiting: options.link.app_waiting(),
    });
    // The tree held here: from the live index of the `run` beside this session, or walked now.
    let key = FilterKey { excludes: excludes.clone(), docker_context: docker_context.clone() };
    let mut held = match options.link.index_summary(&key).await {
        Some(Ok(summary)) => Held::Indexed(summary),
        Some(Err(message)) => return Err(ServeError::Index(message)),
        None => Held::Walked(walk_tree(&root, &filter).await),
    };
    let (digest, entries, from_memory) = match &held {
        Held::Indexed(summary) => (summary.digest, summary.entries, summary.from_memory),
        Held::Walked(walked) => (walk::digest(&walked.tree), walked.tree.len() as u64, false),
    };
    let wanted = match *ask {
        false => true,
        true => {
            let _ = out.send(FromAgent::ManifestDigest { digest, entries, from_memory });
            match frames.message::<ToAgent>().await? {
                ToAgent::Manifest { wanted } => wanted,
                other => return Err(unexpected("the manifest question's answer", &other).into()),
            }
        }
    };
    let (records, problems) = match &mut held {
        Held::Indexed(summary) if wanted => {
            let records = options
                .link
                .index_records(&key)
                .await
                .ok_or_else(|| ServeError::Index("the agent's index went away during the session".into()))?;
            (Some(records.map_err(ServeError::Index)?), std::mem::take(&mut summary.problems))
        }
        Held::Indexed(summary) => (None, std::mem::take(&mut summary.problems)),
        Held::Walked(walked) => (wanted.then(|| walk::records_of(&walked.tree)), std::mem::take(&mut walked.problems)),
    };
    // The records sent are the entries (the index's may have moved on since its digest).
    let entries = records.as_ref().map_or(entries, |records| records.len() as u64);
    for chunk in records.iter().flat_map(|records| records.chunks(MANIFEST_CHUNK)) {
        let _ = out.send(FromAgent::Manifest { records: chunk.to_vec() });
    }
    let _ = out.send(FromAgent::ManifestEnd { entries, problems });

    // The app's output and exits reach the client for as long as the session lasts.
    let forwarder = options.link.subscribe().await.map(|mut events| {
        let out = out.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if out.send(event).is_err() {
                    break;
                }
            }
        })
    });
    let mut changed = false;
    let mut tree = match &mut held {
        Held::Walked(walked) => Some(&mut walked.tree),
        Held::Indexed(_) => None,
    };
    let result = batches(frames, out, options, &mut applier, &mut tree, &mut changed).await;
    if let Some(forwarder) = forwarder {
        forwarder.abort();
    }
    if let (true, Held::Walked(walked)) = (changed, held) {
        let cache_path = walked.cache_path;
        let tree = walked.tree;
        let _ = tokio::task::spawn_blocking(move || walk::save_stat_cache(&cache_path, &tree)).await;
    }
    result
}

/// What a session knows of the tree it serves.
enum Held {
    /// The live index of the `run` beside it keeps the tree; it learns of applied files by itself.
    Indexed(Summary),
    /// Walked for this session, kept current by what it applies.
    Walked(Walked),
}

struct Walked {
    tree: Tree,
    problems: Vec<crate::protocol::Problem>,
    cache_path: PathBuf,
}

/// Walks the tree, stat-cached by the cache saved in the root.
async fn walk_tree(root: &std::path::Path, filter: &Arc<Filter>) -> Walked {
    let cache_path = root.join(RESERVED_DIR).join("manifest.cache");
    let filter = Arc::clone(filter);
    let path = cache_path.clone();
    let outcome = tokio::task::spawn_blocking(move || walk::scan_cached(&filter, &path))
        .instrument(info_span!("scan"))
        .await
        .expect("scan task panicked");
    debug!(entries = outcome.tree.len(), hashed = outcome.stats.hashed_files, "manifest");
    Walked { tree: outcome.tree, problems: outcome.problems, cache_path }
}

async fn batches<R: AsyncRead + Unpin>(
    frames: &mut FrameReader<R>,
    out: &Out,
    options: &ServeOptions,
    applier: &mut Option<Applier>,
    tree: &mut Option<&mut Tree>,
    changed: &mut bool,
) -> Result<(), ServeError> {
    loop {
        let Some(frame) = frames.next().await? else {
            debug!("client closed the stream");
            return Ok(());
        };
        match frame.decode::<ToAgent>()? {
            ToAgent::Batch { id, deletes, chmods } => {
                if deletes.len() + chmods.len() > MAX_BATCH_ENTRIES {
                    let got = format!("{} deletions and exec-bit changes", deletes.len() + chmods.len());
                    return Err(ProtocolError::Unexpected { expected: "a batch of at most 16,384 entries", got }.into());
                }
                let (report, incomplete, updates) =
                    receive_batch(frames, applier, id, deletes, chmods).instrument(info_span!("apply", id)).await?;
                *changed |= !updates.is_empty();
                // A tree held by the live index learns of these files from their own events.
                if let Some(tree) = tree.as_deref_mut() {
                    for update in updates {
                        match update {
                            TreeUpdate::Put(path, scanned) => {
                                walk::remove_subtree(tree, &path);
                                tree.insert(path, scanned);
                            }
                            TreeUpdate::Remove(path) => {
                                walk::remove_subtree(tree, &path);
                            }
                        }
                    }
                }
                info!(
                    id,
                    written = report.written,
                    deleted = report.deleted,
                    refused = report.refused_count(),
                    micros = report.micros,
                    "applied"
                );
                let _ = out.send(FromAgent::Applied(report));
                if let Some(message) = incomplete {
                    return Err(ProtocolError::Unexpected { expected: "a whole tar stream", got: message }.into());
                }
            }
            ToAgent::Restart => {
                let report = options.link.restart().instrument(info_span!("restart")).await;
                info!(?report, "restart");
                let _ = out.send(FromAgent::Restart(report));
            }
            ToAgent::Ready => {
                let report = options.link.ready().await;
                let _ = out.send(FromAgent::Restart(report));
            }
            ToAgent::Ping { id } => {
                let _ = out.send(FromAgent::Pong { id });
            }
            ToAgent::Bye => return Ok(()),
            other @ (ToAgent::Hello { .. } | ToAgent::Manifest { .. }) => {
                return Err(unexpected("a batch or bye", &other).into())
            }
        }
    }
}

/// Streams the batch's data frames into a blocking apply task, bounded to a few chunks in flight.
async fn receive_batch<R: AsyncRead + Unpin>(
    frames: &mut FrameReader<R>,
    applier: &mut Option<Applier>,
    id: u64,
    deletes: Vec<String>,
    chmods: Vec<Chmod>,
) -> Result<(Applied, Option<String>, Vec<TreeUpdate>), ServeError> {
    // At most this many data frames wait for the apply task (each at most MAX_DATA_FRAME).
    let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
    // The applier moves into the blocking task and comes back with the result.
    let mut moved = applier.take().expect("the applier is back after every batch");
    let task = tokio::task::spawn_blocking(move || {
        let reader = ChannelReader { rx, current: Vec::new(), pos: 0 };
        let result = moved.apply(id, &deletes, &chmods, reader);
        (result, moved)
    });
    let streamed: Result<(), ServeError> = loop {
        match frames.next().await {
            Ok(Some(Frame::Data(bytes))) => {
                // A closed channel means the apply task stopped early; keep draining to the end.
                let _ = tx.send(bytes).await;
            }
            Ok(Some(Frame::DataEnd)) => break Ok(()),
            Ok(Some(Frame::Message(_))) => {
                break Err(ProtocolError::Unexpected { expected: "batch data", got: "a message".into() }.into())
            }
            Ok(None) => break Err(ProtocolError::Truncated.into()),
            Err(e) => break Err(e.into()),
        }
    };
    // Let the apply task finish what arrived whole before the session reports anything.
    drop(tx);
    let (result, moved) = task.await.expect("apply task panicked");
    *applier = Some(moved);
    streamed.map(|()| result)
}

struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            match self.rx.blocking_recv() {
                Some(next) => {
                    self.current = next;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn unexpected(expected: &'static str, got: &ToAgent) -> ProtocolError {
    let got = serde_json::to_string(got).unwrap_or_default();
    ProtocolError::Unexpected { expected, got: got.chars().take(200).collect() }
}
