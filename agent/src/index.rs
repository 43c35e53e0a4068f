//! The agent's live index: the tree the container holds, kept current between sessions.
//!
//! `devloop-agent run` lives as long as the pod. Once a session has asked for its tree, it keeps
//! that tree in memory and an inotify watch on each of its folders; events only mark paths dirty,
//! and a request first reads every event the kernel has queued (a write that finished before the
//! request is in the queue), then re-reads the dirty paths (stat-cached), then answers. So the
//! next session's `Hello` is answered without walking the tree.
//!
//! It never answers from memory when it may be wrong: a queue overflow (`IN_Q_OVERFLOW`), a read
//! error or the root's own watch gone makes the next answer a full (stat-cached) walk; the
//! kernel's watch limit turns the index off (every answer walks, and says why); a session with
//! other ignore rules walks the tree under its own filter.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use inotify::Inotify;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::filter::Filter;
use crate::manifest::{Digest, Record};
use crate::protocol::Problem;
use crate::walk::{self, Tree};
use crate::watch::{FolderWatches, Raw, WatchLimit, WATCH_LIMIT_HINT};
use crate::RESERVED_DIR;

/// What decides which paths a tree holds: a session's ignore rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterKey {
    pub excludes: Vec<String>,
    pub docker_context: Option<String>,
}

/// The answer to a session's first question: the digest of the tree and its size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub digest: Digest,
    pub entries: u64,
    pub problems: Vec<Problem>,
    /// Known without walking the tree for this request.
    pub from_memory: bool,
}

/// How long the dirty paths wait for quiet before they are read (a request reads them at once).
const QUIET: Duration = Duration::from_millis(200);

/// A handle on the index task.
#[derive(Clone)]
pub struct Index {
    tx: mpsc::UnboundedSender<Request>,
}

enum Request {
    Summary { key: FilterKey, reply: oneshot::Sender<Result<Summary, String>> },
    Records { key: FilterKey, reply: oneshot::Sender<Result<Vec<Record>, String>> },
}

impl Index {
    /// Starts the index of `root`; it reads the tree on the first request. Needs a tokio runtime.
    pub fn start(root: PathBuf) -> Index {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(keep(root, rx));
        Index { tx }
    }

    /// The tree's digest and size under `key`'s rules, current as of this call.
    pub async fn summary(&self, key: FilterKey) -> Result<Summary, String> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Request::Summary { key, reply }).map_err(|_| "the index is gone".to_string())?;
        answer.await.map_err(|_| "the index is gone".to_string())?
    }

    /// Every record of the tree under `key`'s rules, current as of this call.
    pub async fn records(&self, key: FilterKey) -> Result<Vec<Record>, String> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Request::Records { key, reply }).map_err(|_| "the index is gone".to_string())?;
        answer.await.map_err(|_| "the index is gone".to_string())?
    }
}

/// The tree under one filter, and how it is kept current.
struct Live {
    key: FilterKey,
    filter: Arc<Filter>,
    tree: Tree,
    /// The tree's digest, kept until the tree changes (a session's answer from memory then
    /// hashes nothing).
    digest: Option<Digest>,
    problems: Vec<Problem>,
    events: Events,
    dirty: BTreeSet<String>,
    /// The events lost track: the next catch-up walks everything.
    rescan_all: bool,
}

enum Events {
    Inotify {
        fd: AsyncFd<Inotify>,
        folders: FolderWatches,
    },
    /// No events to trust (the watch limit, or inotify unavailable): every answer walks.
    Off {
        why: String,
    },
}

async fn keep(root: PathBuf, mut rx: mpsc::UnboundedReceiver<Request>) {
    let mut live: Option<Live> = None;
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        let wake = tokio::select! {
            request = rx.recv() => match request {
                Some(request) => Wake::Request(request),
                None => return,
            },
            () = readable(live.as_ref()) => Wake::Events,
            () = tokio::time::sleep(QUIET), if live.as_ref().is_some_and(|l| !l.dirty.is_empty() || l.rescan_all) => Wake::Quiet,
        };
        match wake {
            Wake::Events => {
                if let Some(l) = live.as_mut() {
                    l.drain(&mut buffer);
                }
            }
            Wake::Quiet => {
                if let Some(l) = live.take() {
                    live = Some(l.catch_up(&mut buffer).await.0);
                    crate::release_memory();
                }
            }
            Wake::Request(request) => {
                let key = match &request {
                    Request::Summary { key, .. } | Request::Records { key, .. } => key.clone(),
                };
                let (current, from_memory) = match live.take() {
                    Some(l) if l.key == key && !matches!(l.events, Events::Off { .. }) => {
                        let (l, walked) = l.catch_up(&mut buffer).await;
                        (Ok(l), !walked)
                    }
                    previous => (Live::read(&root, key, previous).await, false),
                };
                match current {
                    Ok(mut l) => {
                        answer(&mut l, request, from_memory);
                        live = Some(l);
                        // A walk's transient buffers are freed by now: the pod's memory holds
                        // the index alone.
                        if !from_memory {
                            crate::release_memory();
                        }
                    }
                    Err(message) => match request {
                        Request::Summary { reply, .. } => drop(reply.send(Err(message))),
                        Request::Records { reply, .. } => drop(reply.send(Err(message))),
                    },
                }
            }
        }
    }
}

enum Wake {
    Request(Request),
    Events,
    Quiet,
}

/// Resolves when the index's inotify descriptor has events to read (readiness cleared first, so
/// that events arriving during the read that follows wake it again); never without one.
async fn readable(live: Option<&Live>) {
    match live.map(|l| &l.events) {
        Some(Events::Inotify { fd, .. }) => {
            if let Ok(mut guard) = fd.readable().await {
                guard.clear_ready();
            }
        }
        _ => std::future::pending().await,
    }
}

fn answer(live: &mut Live, request: Request, from_memory: bool) {
    match request {
        Request::Summary { reply, .. } => {
            let mut problems = live.problems.clone();
            if let Events::Off { why } = &live.events {
                problems.push(Problem { path: ".".into(), message: why.clone() });
            }
            let digest = *live.digest.get_or_insert_with(|| walk::digest(&live.tree));
            let summary = Summary { digest, entries: live.tree.len() as u64, problems, from_memory };
            let _ = reply.send(Ok(summary));
        }
        Request::Records { reply, .. } => {
            let _ = reply.send(Ok(walk::records_of(&live.tree)));
        }
    }
}

impl Live {
    /// Reads the tree under `key`'s rules (stat-cached by the previous tree, or by the saved
    /// cache on the first read) and watches its folders.
    async fn read(root: &Path, key: FilterKey, previous: Option<Live>) -> Result<Live, String> {
        let filter = Filter::with(root, &key.excludes, key.docker_context.as_deref()).map_err(|e| e.to_string())?;
        let filter = Arc::new(filter);
        if previous.as_ref().is_some_and(|p| p.key != key) {
            info!(root = %root.display(), "a session with other ignore rules: the index reads the tree again");
        }
        let (previous, events) = match previous {
            Some(Live { tree, events: events @ Events::Inotify { .. }, .. }) => (Some(tree), events),
            Some(Live { tree, .. }) => (Some(tree), watching(root)),
            None => (None, watching(root)),
        };
        let cache_path = root.join(RESERVED_DIR).join("manifest.cache");
        let cache = match &previous {
            Some(_) => walk::StatCache::default(),
            None => {
                let cache_path = cache_path.clone();
                tokio::task::spawn_blocking(move || walk::load_stat_cache(&cache_path)).await.unwrap_or_default()
            }
        };
        let mut live = Live {
            key,
            filter: Arc::clone(&filter),
            tree: previous.unwrap_or_else(|| walk::folders_of(&cache)),
            digest: None,
            problems: Vec::new(),
            events,
            dirty: BTreeSet::new(),
            rescan_all: false,
        };
        // Watches first, on the folders known before the walk: what changes during the walk
        // raises events the next answer reads.
        live.watch_all();
        live.dirty.clear();
        let previous = std::mem::take(&mut live.tree);
        let outcome = tokio::task::spawn_blocking(move || {
            let outcome = match walk::StatSource::files(&cache) {
                0 => walk::scan(&filter, &previous),
                _ => walk::scan(&filter, &cache),
            };
            if walk::cache_changed(&cache, &outcome) {
                walk::save_stat_cache(&cache_path, &outcome.tree);
            }
            outcome
        })
        .await
        .map_err(|e| format!("the walk of the tree failed: {e}"))?;
        debug!(entries = outcome.tree.len(), hashed = outcome.stats.hashed_files, "index read");
        live.tree = outcome.tree;
        live.problems = outcome.problems;
        // Folders the walk found that were not watched before it: read once more.
        live.watch_all();
        Ok(live)
    }

    /// Reads what the kernel has queued, without waiting.
    fn drain(&mut self, buffer: &mut [u8]) {
        let Events::Inotify { fd, folders } = &mut self.events else { return };
        // A burst that dirties a good part of the tree (a `git checkout`) is read back by one
        // walk: cheaper than as many lookups, and it holds no path list.
        let most = (self.tree.len() / 8).max(4096);
        loop {
            match fd.get_mut().read_events(buffer) {
                Ok(events) => {
                    let mut any = false;
                    for event in events {
                        any = true;
                        match folders.interpret(&event.wd, event.mask, event.name) {
                            Some(Raw::Path(_, _)) if self.rescan_all => {}
                            Some(Raw::Path(path, _)) => {
                                self.dirty.insert(path);
                                if self.dirty.len() > most {
                                    self.dirty.clear();
                                    self.rescan_all = true;
                                }
                            }
                            Some(Raw::Rescan) => self.rescan_all = true,
                            None => {}
                        }
                    }
                    if !any {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!(error = %e, "reading inotify events failed; the next answer walks the tree");
                    self.rescan_all = true;
                    break;
                }
            }
        }
        if !folders.is_watched("") {
            // The root itself was deleted or moved: nothing below it reports any more.
            self.rescan_all = true;
        }
    }

    /// Brings the tree up to date: every queued event read, the dirty paths (or, when events
    /// lost track, the whole tree) read again, new folders watched and read once more. Says
    /// whether it walked the whole tree.
    async fn catch_up(mut self, buffer: &mut [u8]) -> (Live, bool) {
        self.drain(buffer);
        let mut walked = false;
        loop {
            // Without events to trust (the watch limit was met, now or just now), only a walk
            // of the whole tree knows it.
            if matches!(self.events, Events::Off { .. }) {
                if walked {
                    break;
                }
                self.rescan_all = true;
            }
            if !self.rescan_all && self.dirty.is_empty() {
                break;
            }
            // The tree is read again below: its digest is not known until asked again.
            self.digest = None;
            // Dirty paths many for the tree's size (the folders an initial sync created): one
            // walk reads them, and builds the tree whole rather than one insert at a time.
            if self.dirty.len() > 256 && self.dirty.len().saturating_mul(8) > self.tree.len() {
                self.rescan_all = true;
            }
            let (all, hinted) = (std::mem::take(&mut self.rescan_all), std::mem::take(&mut self.dirty));
            if all {
                info!("walking the whole tree: events lost track (queue overflow, root replaced) or a burst changed much of it");
                walked = true;
            }
            let (filter, tree) = (Arc::clone(&self.filter), std::mem::take(&mut self.tree));
            let hinted = crate::relpath::outermost(hinted);
            let (tree, changed, problems) = tokio::task::spawn_blocking(move || {
                if all {
                    let outcome = walk::scan(&filter, &tree);
                    (outcome.tree, None, Some(outcome.problems))
                } else {
                    let mut tree = tree;
                    let outcome = walk::rescan(&filter, &mut tree, &hinted);
                    (tree, Some((outcome.changed, hinted)), None)
                }
            })
            .await
            .expect("index walk panicked");
            self.tree = tree;
            if let Some(problems) = problems {
                self.problems = problems;
            }
            match changed {
                None => self.watch_all(),
                Some((changed, hinted)) => self.watch_new(&changed, &hinted),
            }
            // Events that came during the walk.
            self.drain(buffer);
        }
        (self, walked)
    }

    /// Watches every folder of the tree (after a full walk); folders newly watched are read once
    /// more (what was created in them before their watch raised no event).
    fn watch_all(&mut self) {
        let Events::Inotify { folders, .. } = &mut self.events else { return };
        let added = folders.reset(&self.tree);
        self.settle(added);
    }

    fn watch_new(&mut self, changed: &[String], hinted: &[String]) {
        let Events::Inotify { folders, .. } = &mut self.events else { return };
        let added = folders.update(&self.tree, changed, hinted);
        self.settle(added);
    }

    fn settle(&mut self, added: io::Result<Result<Vec<String>, WatchLimit>>) {
        match added {
            Ok(Ok(added)) => self.dirty.extend(added.into_iter().filter(|f| !f.is_empty())),
            Ok(Err(WatchLimit)) => {
                let why = format!(
                    "the agent's live index is off: the inotify watch limit is reached, so every session walks the tree (slower); {WATCH_LIMIT_HINT}"
                );
                warn!("{why}");
                self.events = Events::Off { why };
            }
            Err(e) => {
                let why = format!("the agent's live index is off ({e}): every session walks the tree");
                warn!("{why}");
                self.events = Events::Off { why };
            }
        }
    }
}

/// A new inotify instance for `root` (no watches yet), or why there is none.
fn watching(root: &Path) -> Events {
    let inotify = match Inotify::init() {
        Ok(inotify) => inotify,
        Err(e) => return Events::Off { why: format!("the agent's live index is off (no inotify: {e})") },
    };
    let folders = FolderWatches::new(root, inotify.watches());
    // SAFETY: an `Inotify` owns its descriptor and returns that one for as long as it lives.
    match unsafe { AsyncFd::register_with_interest(inotify, tokio::io::Interest::READABLE) } {
        Ok(fd) => Events::Inotify { fd, folders },
        Err(e) => Events::Off { why: format!("the agent's live index is off ({e})") },
    }
}
