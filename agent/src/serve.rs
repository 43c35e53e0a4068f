//! One protocol session: handshake, the agent's manifest, then batches until `Bye`.
//!
//! Generic over the byte stream, so the same code serves stdin/stdout in a container, a child
//! process of the CLI, and an in-memory duplex in tests.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, Instrument};

use crate::apply::{Applier, TreeUpdate};
use crate::filter::Filter;
use crate::manifest::{Digest, Entry, Record};
use crate::protocol::{self, Frame, FrameReader, FrameWriter, FromAgent, ProtocolError, ToAgent};
use crate::walk::{self, Scanned, StatKey, Tree};
use crate::RESERVED_DIR;

/// Records per manifest message.
const MANIFEST_CHUNK: usize = 4096;

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub root: PathBuf,
    pub max_file_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("cannot prepare the root {root}: {source}")]
    Root { root: PathBuf, source: io::Error },
    #[error("the client's exclude patterns are invalid: {0}")]
    Excludes(#[from] crate::filter::FilterError),
}

/// Serves one session. Returns when the client says `Bye` or the stream closes.
pub async fn serve<R, W>(reader: R, writer: W, options: ServeOptions) -> Result<(), ServeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut reader = reader;
    let mut writer = tokio::io::BufWriter::new(writer);
    protocol::handshake(&mut reader, &mut writer).await?;
    let mut frames = FrameReader::new(reader);
    let mut out = FrameWriter::new(writer);

    let excludes = match frames.message::<ToAgent>().await? {
        ToAgent::Hello { client, excludes } => {
            info!(%client, root = %options.root.display(), "session");
            excludes
        }
        other => return Err(unexpected("hello", &other).into()),
    };
    let result = session(&mut frames, &mut out, &options, &excludes).await;
    if let Err(err) = &result {
        if !matches!(err, ServeError::Protocol(e) if e.is_disconnect()) {
            let _ = out.message(&FromAgent::Fatal { message: err.to_string() }).await;
            let _ = out.flush().await;
        }
    }
    result
}

async fn session<R, W>(
    frames: &mut FrameReader<R>,
    out: &mut FrameWriter<W>,
    options: &ServeOptions,
    excludes: &[String],
) -> Result<(), ServeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let root = options.root.clone();
    let root_err = |source| ServeError::Root { root: root.clone(), source };
    fs::create_dir_all(&root).map_err(root_err)?;
    let mut applier = Applier::new(&root, options.max_file_size).map_err(root_err)?;
    let filter = Arc::new(Filter::new(&root, excludes)?);

    out.message(&FromAgent::Welcome { agent: env!("CARGO_PKG_VERSION").into(), root: root.display().to_string() })
        .await?;
    let cache_path = root.join(RESERVED_DIR).join("manifest.cache");
    let scanned = {
        let filter = Arc::clone(&filter);
        let cache_path = cache_path.clone();
        tokio::task::spawn_blocking(move || {
            let previous = load_cache(&cache_path);
            let outcome = walk::scan(&filter, &previous);
            save_cache(&cache_path, &outcome.tree);
            outcome
        })
        .instrument(info_span!("scan"))
        .await
        .expect("scan task panicked")
    };
    debug!(entries = scanned.tree.len(), hashed = scanned.stats.hashed_files, "manifest");
    let mut tree = scanned.tree;
    let records: Vec<Record> =
        tree.iter().map(|(path, s)| Record { path: path.clone(), entry: s.entry.clone() }).collect();
    for chunk in records.chunks(MANIFEST_CHUNK) {
        out.message(&FromAgent::Manifest { records: chunk.to_vec() }).await?;
    }
    drop(records);
    out.message(&FromAgent::ManifestEnd { entries: tree.len() as u64, problems: scanned.problems }).await?;
    out.flush().await?;

    loop {
        let Some(frame) = frames.next().await? else {
            debug!("client closed the stream");
            break;
        };
        match frame.decode::<ToAgent>()? {
            ToAgent::Batch { id, deletes, chmods, restart: _ } => {
                let (applied, incomplete, applier_back) =
                    receive_batch(frames, applier, id, deletes, chmods).instrument(info_span!("apply", id)).await?;
                applier = applier_back;
                for update in applied.1 {
                    match update {
                        TreeUpdate::Put(path, scanned) => {
                            walk::remove_subtree(&mut tree, &path);
                            tree.insert(path, scanned);
                        }
                        TreeUpdate::Remove(path) => {
                            walk::remove_subtree(&mut tree, &path);
                        }
                    }
                }
                let report = applied.0;
                info!(
                    id,
                    written = report.written,
                    deleted = report.deleted,
                    refused = report.refused.len(),
                    micros = report.micros,
                    "applied"
                );
                out.message(&FromAgent::Applied(report)).await?;
                out.flush().await?;
                if let Some(message) = incomplete {
                    return Err(ServeError::Protocol(ProtocolError::Unexpected {
                        expected: "a whole tar stream",
                        got: message,
                    }));
                }
            }
            ToAgent::Bye => break,
            other @ ToAgent::Hello { .. } => return Err(unexpected("a batch or bye", &other).into()),
        }
    }
    let cache_path = cache_path.clone();
    let _ = tokio::task::spawn_blocking(move || save_cache(&cache_path, &tree)).await;
    Ok(())
}

type BatchResult = ((crate::protocol::Applied, Vec<TreeUpdate>), Option<String>, Applier);

/// Streams the batch's data frames into a blocking apply task, bounded to a few chunks in flight.
async fn receive_batch<R: AsyncRead + Unpin>(
    frames: &mut FrameReader<R>,
    mut applier: Applier,
    id: u64,
    deletes: Vec<String>,
    chmods: Vec<crate::protocol::Chmod>,
) -> Result<BatchResult, ServeError> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
    let task = tokio::task::spawn_blocking(move || {
        let reader = ChannelReader { rx, current: Vec::new(), pos: 0 };
        let (applied, incomplete, updates) = applier.apply(id, &deletes, &chmods, reader);
        ((applied, updates), incomplete, applier)
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
    let done = task.await.expect("apply task panicked");
    streamed.map(|()| done)
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

/// The stat cache on disk: files only, compact.
#[derive(Serialize, Deserialize)]
struct CachedFile {
    path: String,
    size: u64,
    mtime_ns: i64,
    ino: u64,
    exec: bool,
    hash: [u8; 32],
}

fn load_cache(path: &Path) -> Tree {
    let Ok(bytes) = fs::read(path) else {
        return Tree::new();
    };
    let Ok(files) = postcard::from_bytes::<Vec<CachedFile>>(&bytes) else {
        return Tree::new();
    };
    files
        .into_iter()
        .map(|f| {
            let entry = Entry::File { hash: Digest(f.hash), size: f.size, exec: f.exec };
            let stat = StatKey { size: f.size, mtime_ns: f.mtime_ns, ino: f.ino };
            (f.path, Scanned { entry, stat: Some(stat) })
        })
        .collect()
}

fn save_cache(path: &Path, tree: &Tree) {
    let files: Vec<CachedFile> = tree
        .iter()
        .filter_map(|(p, s)| match (&s.entry, s.stat) {
            (Entry::File { hash, size, exec }, Some(stat)) => Some(CachedFile {
                path: p.clone(),
                size: *size,
                mtime_ns: stat.mtime_ns,
                ino: stat.ino,
                exec: *exec,
                hash: hash.0,
            }),
            _ => None,
        })
        .collect();
    let Ok(bytes) = postcard::to_allocvec(&files) else {
        return;
    };
    let tmp = path.with_extension("tmp");
    if fs::write(&tmp, bytes).is_ok() {
        let _ = fs::rename(&tmp, path);
    }
}
