//! File-system events as hints. A hint only says "look here"; the rescan and the diff decide what
//! changed. Events are coalesced adaptively: the first one opens a window that closes after
//! [`Window::quiet`] without events, or at [`Window::cap`] while events keep coming.
//!
//! inotify watches are set per synced folder ([`devloop_agent::watch::FolderWatches`], shared with
//! the agent's live index), the map of descriptors kept true by the task that reads the events, in
//! event order. When the kernel's watch limit is
//! reached the watcher says which sysctl to raise and falls back to polling. A queue overflow
//! turns into a full rescan.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devloop_agent::walk::Tree;
use devloop_agent::watch::{FolderWatches, Raw, WatchLimit, Write, WATCH_LIMIT_HINT};
use futures_util::StreamExt;
use inotify::Inotify;
use tokio::sync::mpsc;

use crate::report::{Event, Reporter};

/// The coalescing window.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// Quiet that closes a window while a file of it is being written (written to, and not
    /// closed yet).
    pub quiet: Duration,
    /// Quiet that closes a window whose writes all ended (each written file closed again).
    pub settled: Duration,
    pub cap: Duration,
}

impl Default for Window {
    fn default() -> Self {
        // A save's events come within microseconds of each other: 1 ms of quiet after the last
        // written file was closed, 3 ms while one is still open for writing. A burst that pauses
        // longer still costs one restart, which waits until no hint is left.
        Window { quiet: Duration::from_millis(3), settled: Duration::from_millis(1), cap: Duration::from_millis(100) }
    }
}

/// What one window of events points at.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Hints {
    /// Relative paths, sorted.
    pub paths: BTreeSet<String>,
    /// The event stream lost track (overflow, poll error): rescan everything.
    pub rescan: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch {path}: {source}")]
    Start { path: PathBuf, source: std::io::Error },
}

pub struct Watcher {
    root: PathBuf,
    backend: Backend,
    rx: mpsc::UnboundedReceiver<Raw>,
    tx: mpsc::UnboundedSender<Raw>,
    reporter: Reporter,
    /// The window being gathered, kept across cancelled calls of [`Watcher::next`].
    gathered: Hints,
    opened: Option<Instant>,
    /// Files of the open window written to and not closed yet.
    writing: HashSet<String>,
}

enum Backend {
    /// One non-recursive inotify watch per synced folder.
    Native { folders: Arc<Mutex<FolderWatches>>, reader: tokio::task::JoinHandle<()> },
    /// No inotify: a timer asks for a full rescan (stat-cached, ignored folders skipped) at
    /// every tick. The scan compares size, mtime and ctime in nanoseconds and inode, so a path
    /// replaced twice within a second is still seen.
    Poll { ticker: tokio::task::JoinHandle<()> },
}

impl Drop for Watcher {
    fn drop(&mut self) {
        match &self.backend {
            Backend::Native { reader, .. } => reader.abort(),
            Backend::Poll { ticker } => ticker.abort(),
        }
    }
}

/// See [`Watcher::ahead`].
#[derive(Clone)]
pub struct Ahead {
    folders: Arc<Mutex<FolderWatches>>,
    /// The first refusal: an error, or the watch limit. No watch is set after it.
    failed: Arc<Mutex<Option<Result<std::io::Error, WatchLimit>>>>,
}

impl Ahead {
    /// Watches the folder `rel` (best effort: a folder gone already is for the walk to find).
    pub fn watch(&self, rel: &str) {
        let mut failed = self.failed.lock().expect("watch outcome poisoned");
        if failed.is_some() {
            return;
        }
        let added = self.folders.lock().expect("watches poisoned").add(rel);
        match added {
            Ok(Ok(_)) => {}
            Ok(Err(limit)) => *failed = Some(Err(limit)),
            Err(e) => *failed = Some(Ok(e)),
        }
    }
}

/// How often the polling fallback rescans.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

impl Watcher {
    /// Starts watching every folder of `tree` (and the root). Needs a tokio runtime.
    pub fn start(root: &Path, tree: &Tree, reporter: Reporter) -> Result<Watcher, WatchError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let err = |source| WatchError::Start { path: root.into(), source };
        let inotify = Inotify::init().map_err(err)?;
        let folders = Arc::new(Mutex::new(FolderWatches::new(root, inotify.watches())));
        let stream = inotify.into_event_stream(vec![0u8; 64 << 10]).map_err(err)?;
        let reader = tokio::spawn(read_events(stream, Arc::clone(&folders), tx.clone()));
        let mut me = Watcher {
            root: root.to_path_buf(),
            backend: Backend::Native { folders, reader },
            rx,
            tx,
            reporter,
            gathered: Hints::default(),
            opened: None,
            writing: HashSet::new(),
        };
        let started = me.native(|folders| folders.start(tree))?;
        me.settle(started.map(|_| ()))?;
        Ok(me)
    }

    /// What watches each folder from the walker's thread right before the walk reads it
    /// ([`scan::first`](super::scan::first)'s `before_read`), so that the first scan needs no
    /// list of folders beforehand; [`Watcher::settle_ahead`] takes its outcome back. `None`
    /// while polling.
    pub fn ahead(&self) -> Option<Ahead> {
        let Backend::Native { folders, .. } = &self.backend else { return None };
        Some(Ahead { folders: Arc::clone(folders), failed: Arc::default() })
    }

    /// Takes back what watching ahead met: the watch limit turns to polling, another refusal
    /// is an error.
    pub fn settle_ahead(&mut self, ahead: Ahead) -> Result<(), WatchError> {
        match ahead.failed.lock().expect("watch outcome poisoned").take() {
            None => Ok(()),
            Some(Err(WatchLimit)) => self.settle(Err::<(), _>(WatchLimit)),
            Some(Ok(source)) => Err(WatchError::Start { path: self.root.clone(), source }),
        }
    }

    pub fn mode(&self) -> &'static str {
        match self.backend {
            Backend::Native { .. } => "inotify",
            Backend::Poll { .. } => "polling",
        }
    }

    /// Keeps the watch set equal to the tree's folders after a targeted rescan (see
    /// [`FolderWatches::update`]). Returns the folders newly watched: what was created in them
    /// before their watch existed raised no event, so the caller rescans them once more.
    pub fn update(&mut self, tree: &Tree, changed: &[String], hinted: &[String]) -> Result<Vec<String>, WatchError> {
        let added = self.native(|folders| folders.update(tree, changed, hinted))?;
        self.settle(added)
    }

    /// Re-reads the watch set from a whole tree (after a full rescan). Returns the folders
    /// newly watched (see [`Watcher::update`]).
    pub fn reset(&mut self, tree: &Tree) -> Result<Vec<String>, WatchError> {
        let added = self.native(|folders| folders.reset(tree))?;
        self.settle(added)
    }

    /// Runs `f` on the native watches; polling has none (an empty list).
    ///
    /// The watches are locked across `f`: the reader cannot see an event of a new descriptor
    /// before it knows which folder the descriptor stands for.
    fn native<T: Default>(
        &mut self,
        f: impl FnOnce(&mut FolderWatches) -> std::io::Result<Result<T, WatchLimit>>,
    ) -> Result<Result<T, WatchLimit>, WatchError> {
        let Backend::Native { folders, .. } = &self.backend else { return Ok(Ok(T::default())) };
        let mut folders = folders.lock().expect("watches poisoned");
        f(&mut folders).map_err(|source| WatchError::Start { path: self.root.clone(), source })
    }

    /// The watch limit reached: poll from now on.
    fn settle<T: Default>(&mut self, outcome: Result<T, WatchLimit>) -> Result<T, WatchError> {
        match outcome {
            Ok(value) => Ok(value),
            Err(WatchLimit) => {
                self.fall_back_to_polling();
                Ok(T::default())
            }
        }
    }

    fn fall_back_to_polling(&mut self) {
        self.reporter.emit(Event::Warning {
            message: "the inotify watch limit is reached; falling back to a rescan every 500 ms (slower, more CPU)"
                .into(),
            hint: Some(WATCH_LIMIT_HINT.into()),
        });
        let tx = self.tx.clone();
        let ticker = tokio::spawn(async move {
            loop {
                // Events may have been missed while switching: the first tick is immediate.
                if tx.send(Raw::Rescan).is_err() {
                    return;
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        });
        // The inotify watches set so far go with the native watcher.
        if let Backend::Native { reader, .. } = std::mem::replace(&mut self.backend, Backend::Poll { ticker }) {
            reader.abort();
        }
    }

    /// Waits for the next window of hints. `None` when the watcher is gone.
    ///
    /// Cancellation-safe: hints gathered by a call that is dropped (a `select!` took another
    /// branch) are kept and returned by the next call.
    pub async fn next(&mut self, window: Window) -> Option<Hints> {
        if self.opened.is_none() {
            let first = self.rx.recv().await?;
            self.absorb(first);
            self.opened = Some(Instant::now());
        }
        let opened = self.opened.expect("window is open");
        loop {
            let left = window.cap.saturating_sub(opened.elapsed());
            if left.is_zero() {
                break;
            }
            let quiet = if self.writing.is_empty() { window.settled } else { window.quiet };
            match tokio::time::timeout(quiet.min(left), self.rx.recv()).await {
                Ok(Some(raw)) => self.absorb(raw),
                Ok(None) | Err(_) => break,
            }
        }
        self.opened = None;
        self.writing.clear();
        Some(std::mem::take(&mut self.gathered))
    }

    /// Whether hints are waiting: a window is open or events are queued.
    pub fn pending(&self) -> bool {
        self.opened.is_some() || !self.rx.is_empty()
    }

    fn absorb(&mut self, raw: Raw) {
        match raw {
            Raw::Rescan => self.gathered.rescan = true,
            Raw::Path(path, write) => {
                match write {
                    Write::Begun => {
                        self.writing.insert(path.clone());
                    }
                    Write::Ended => {
                        self.writing.remove(&path);
                    }
                    Write::Other => {}
                }
                self.gathered.paths.insert(path);
            }
        }
    }
}

/// Reads inotify events in order and turns them into hints, keeping the watch map true: a
/// dropped or moved watch leaves the map before any later event is handed on.
async fn read_events(
    mut stream: inotify::EventStream<Vec<u8>>,
    folders: Arc<Mutex<FolderWatches>>,
    tx: mpsc::UnboundedSender<Raw>,
) {
    while let Some(event) = stream.next().await {
        let raw = match event {
            // An error inside the watcher: trust nothing, rescan.
            Err(_) => Raw::Rescan,
            Ok(event) => {
                let mut folders = folders.lock().expect("watches poisoned");
                match folders.interpret(&event.wd, event.mask, event.name.as_deref()) {
                    Some(raw) => raw,
                    None => continue,
                }
            }
        };
        if tx.send(raw).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_burst_of_writes_is_one_window() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        let mut tree = Tree::new();
        tree.insert(
            "sub".into(),
            devloop_agent::walk::Scanned { entry: devloop_agent::manifest::Entry::Dir, stat: None },
        );
        let mut watcher = Watcher::start(&root, &tree, Reporter::new(true, false)).unwrap();
        for i in 0..30 {
            std::fs::write(root.join(format!("sub/f{i}")), "x").unwrap();
        }
        let hints = watcher.next(Window::default()).await.unwrap();
        assert_eq!(hints.paths.len(), 30, "{hints:?}");
        assert!(hints.paths.contains("sub/f29"));
    }
}
