//! File-system events as hints. A hint only says "look here"; the rescan and the diff decide what
//! changed. Events are coalesced adaptively: the first one opens a window that closes after
//! [`Window::quiet`] without events, or at [`Window::cap`] while events keep coming.
//!
//! inotify watches are set per synced folder (ignored folders such as `node_modules/` cost none).
//! The watcher keeps its own map of watch descriptors to folders, updated in event order by the
//! task that reads the events: a watch the kernel dropped (its folder deleted: `IN_IGNORED`) or
//! whose folder moved (`IN_MOVE_SELF`, which takes the watches below it along) leaves the map
//! before any later event is handed on, so a folder created again under the same name (even on the
//! same inode number) is seen as unwatched and watched again. When the kernel's watch limit is
//! reached the watcher says which sysctl to raise and falls back to polling. A queue overflow
//! turns into a full rescan.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devloop_agent::walk::Tree;
use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
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

enum Raw {
    /// A path an event was about, and what the event says of a write to it.
    Path(String, Write),
    Rescan,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Write {
    /// Written to, or created as a file (a close follows).
    Begun,
    /// Closed after writing.
    Ended,
    Other,
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
    Native { watches: Watches, map: Arc<Mutex<WatchMap>>, reader: tokio::task::JoinHandle<()> },
    /// No inotify: a timer asks for a full rescan (stat-cached, ignored folders skipped) at
    /// every tick. The scan compares size, mtime and ctime in nanoseconds and inode, so a path
    /// replaced twice within a second is still seen.
    Poll { ticker: tokio::task::JoinHandle<()> },
}

/// Which folder each watch stands for, and back. A folder counts as watched only when both
/// directions agree: inotify hands out one descriptor per inode, so a folder renamed within the
/// tree and watched under its new name takes the descriptor over from its old name.
#[derive(Default)]
struct WatchMap {
    by_wd: HashMap<WatchDescriptor, String>,
    by_path: HashMap<String, WatchDescriptor>,
}

impl WatchMap {
    fn watched(&self, path: &str) -> bool {
        self.by_path.get(path).is_some_and(|wd| self.by_wd.get(wd).is_some_and(|p| p == path))
    }

    /// Forgets `path`; returns its descriptor when no other folder shares it (to remove it).
    fn forget(&mut self, path: &str) -> Option<WatchDescriptor> {
        let wd = self.by_path.remove(path)?;
        if self.by_wd.get(&wd).is_some_and(|p| p == path) {
            self.by_wd.remove(&wd);
            return Some(wd);
        }
        None
    }

    /// Forgets `path` and every folder below it; returns the descriptors to remove.
    fn forget_subtree(&mut self, path: &str) -> Vec<WatchDescriptor> {
        let prefix = format!("{path}/");
        let below: Vec<String> = self.by_path.keys().filter(|p| p.starts_with(&prefix)).cloned().collect();
        std::iter::once(path.to_owned()).chain(below).filter_map(|p| self.forget(&p)).collect()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        match &self.backend {
            Backend::Native { reader, .. } => reader.abort(),
            Backend::Poll { ticker } => ticker.abort(),
        }
    }
}

/// What the watches listen for. Not opens and reads; `ONLYDIR` and `DONT_FOLLOW` so that a path
/// that is no longer a real folder is not watched at all.
fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
        | WatchMask::DONT_FOLLOW
}

/// How often the polling fallback rescans.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

impl Watcher {
    /// Starts watching every folder of `tree` (and the root). Needs a tokio runtime.
    pub fn start(root: &Path, tree: &Tree, reporter: Reporter) -> Result<Watcher, WatchError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let err = |source| WatchError::Start { path: root.into(), source };
        let inotify = Inotify::init().map_err(err)?;
        let watches = inotify.watches();
        let stream = inotify.into_event_stream(vec![0u8; 64 << 10]).map_err(err)?;
        let map = Arc::new(Mutex::new(WatchMap::default()));
        let reader = tokio::spawn(read_events(stream, watches.clone(), Arc::clone(&map), tx.clone()));
        let mut me = Watcher {
            root: root.to_path_buf(),
            backend: Backend::Native { watches, map, reader },
            rx,
            tx,
            reporter,
            gathered: Hints::default(),
            opened: None,
            writing: HashSet::new(),
        };
        me.add_folder("")?;
        let folders: Vec<&String> = tree.iter().filter(|(_, s)| s.entry.is_dir()).map(|(p, _)| p).collect();
        for folder in folders {
            me.add_folder(folder)?;
        }
        Ok(me)
    }

    pub fn mode(&self) -> &'static str {
        match self.backend {
            Backend::Native { .. } => "inotify",
            Backend::Poll { .. } => "polling",
        }
    }

    /// Keeps the watch set equal to the tree's folders after a targeted rescan. `changed` is what
    /// the rescan found changed; `hinted` the paths it was asked to look at: a hinted folder and
    /// every folder under it are watched again if their watch is gone (the folder was replaced or
    /// moved, which changes nothing in the tree when the new folder looks like the old one).
    ///
    /// Returns the folders newly watched: what was created in them before their watch existed
    /// raised no event, so the caller rescans them once more.
    pub fn update(&mut self, tree: &Tree, changed: &[String], hinted: &[String]) -> Result<Vec<String>, WatchError> {
        let is_dir = |path: &str| tree.get(path).is_some_and(|s| s.entry.is_dir());
        // Old watches go before new ones are set (see `WatchMap`).
        for path in changed.iter().filter(|p| !is_dir(p)) {
            self.remove_folder(path);
        }
        let mut candidates: BTreeSet<&str> = changed.iter().map(String::as_str).filter(|p| is_dir(p)).collect();
        for path in hinted.iter().filter(|p| is_dir(p)) {
            candidates.insert(path);
            let prefix = format!("{path}/");
            let below = tree.range(prefix.clone()..).take_while(|(k, _)| k.starts_with(&prefix));
            candidates.extend(below.filter(|(_, s)| s.entry.is_dir()).map(|(k, _)| k.as_str()));
        }
        let mut added = Vec::new();
        for path in candidates {
            if !self.is_watched(path) && self.add_folder(path)? {
                added.push(path.to_owned());
            }
        }
        Ok(added)
    }

    /// Re-reads the watch set from a whole tree (after a full rescan). Returns the folders
    /// newly watched (see [`Watcher::update`]).
    pub fn reset(&mut self, tree: &Tree) -> Result<Vec<String>, WatchError> {
        let Backend::Native { map, .. } = &self.backend else { return Ok(Vec::new()) };
        let wanted: HashSet<&str> = tree.iter().filter(|(_, s)| s.entry.is_dir()).map(|(p, _)| p.as_str()).collect();
        let stale: Vec<String> = {
            let map = map.lock().expect("watch map poisoned");
            map.by_path.keys().filter(|f| !f.is_empty() && !wanted.contains(f.as_str())).cloned().collect()
        };
        for folder in &stale {
            self.remove_folder(folder);
        }
        let mut added = Vec::new();
        for folder in std::iter::once("").chain(wanted) {
            if !self.is_watched(folder) && self.add_folder(folder)? {
                added.push(folder.to_owned());
            }
        }
        Ok(added)
    }

    fn is_watched(&self, rel: &str) -> bool {
        match &self.backend {
            Backend::Native { map, .. } => map.lock().expect("watch map poisoned").watched(rel),
            Backend::Poll { .. } => true,
        }
    }

    fn remove_folder(&mut self, rel: &str) {
        let Backend::Native { watches, map, .. } = &mut self.backend else { return };
        let wd = map.lock().expect("watch map poisoned").forget(rel);
        if let Some(wd) = wd {
            // Already gone when the folder was deleted; the kernel says so with IN_IGNORED.
            let _ = watches.remove(wd);
        }
    }

    /// Watches one folder; `false` when it is gone already (the rescan its own event triggers
    /// will see that) or the watcher fell back to polling.
    fn add_folder(&mut self, rel: &str) -> Result<bool, WatchError> {
        let Backend::Native { watches, map, .. } = &mut self.backend else { return Ok(false) };
        let path = if rel.is_empty() { self.root.clone() } else { self.root.join(rel) };
        // The map is locked across the add: the reader cannot see an event of the new descriptor
        // before it knows which folder the descriptor stands for.
        let mut map = map.lock().expect("watch map poisoned");
        match watches.add(&path, mask()) {
            Ok(wd) => {
                if let Some(old) = map.by_path.insert(rel.to_owned(), wd.clone()) {
                    if old != wd && map.by_wd.get(&old).is_some_and(|p| p == rel) {
                        map.by_wd.remove(&old);
                    }
                }
                map.by_wd.insert(wd, rel.to_owned());
                Ok(true)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                drop(map);
                self.fall_back_to_polling().map(|()| false)
            }
            // Gone, or no longer a folder: the rescan its own event triggers will see that.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)) => Ok(false),
            Err(source) => Err(WatchError::Start { path, source }),
        }
    }

    fn fall_back_to_polling(&mut self) -> Result<(), WatchError> {
        self.reporter.emit(Event::Warning {
            message: "the inotify watch limit is reached; falling back to a rescan every 500 ms (slower, more CPU)"
                .into(),
            hint: Some(
                "raise it: sudo sysctl fs.inotify.max_user_watches=524288 (persist it in /etc/sysctl.d/)".into(),
            ),
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
        Ok(())
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
    mut watches: Watches,
    map: Arc<Mutex<WatchMap>>,
    tx: mpsc::UnboundedSender<Raw>,
) {
    while let Some(event) = stream.next().await {
        let raw = match event {
            // An error inside the watcher: trust nothing, rescan.
            Err(_) => Raw::Rescan,
            Ok(event) if event.mask.contains(EventMask::Q_OVERFLOW) => Raw::Rescan,
            Ok(event) => {
                let mut map = map.lock().expect("watch map poisoned");
                let Some(folder) = map.by_wd.get(&event.wd).cloned() else { continue };
                if event.mask.contains(EventMask::IGNORED) {
                    map.forget(&folder);
                } else if event.mask.contains(EventMask::MOVE_SELF) {
                    // The folder lives elsewhere now, with the watches below it: their events
                    // would carry the old paths. Drop them all; the rescan watches what is there.
                    for wd in map.forget_subtree(&folder) {
                        let _ = watches.remove(wd);
                    }
                }
                drop(map);
                let write = if event.mask.contains(EventMask::CLOSE_WRITE) {
                    Write::Ended
                } else if event.mask.contains(EventMask::MODIFY)
                    || (event.mask.contains(EventMask::CREATE) && !event.mask.contains(EventMask::ISDIR))
                {
                    Write::Begun
                } else {
                    Write::Other
                };
                match hinted_path(&folder, event.name) {
                    Some(path) => Raw::Path(path, write),
                    None => continue,
                }
            }
        };
        if tx.send(raw).is_err() {
            return;
        }
    }
}

/// The relative path an event is about, or `None` for paths devloop never syncs (`.git/`,
/// `.devloop/`) and for the root itself.
fn hinted_path(folder: &str, name: Option<OsString>) -> Option<String> {
    let path = match name {
        Some(name) => {
            let name = name.into_string().ok()?;
            if folder.is_empty() {
                name
            } else {
                format!("{folder}/{name}")
            }
        }
        None => folder.to_owned(),
    };
    synced(&path).then_some(path)
}

/// Whether a relative path can be part of the tree at all.
fn synced(rel: &str) -> bool {
    let first = rel.split('/').next().unwrap_or("");
    !rel.is_empty()
        && first != ".git"
        && first != devloop_agent::RESERVED_DIR
        && !rel.contains("/.git/")
        && !rel.ends_with("/.git")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hinted_paths_skip_git_and_reserved() {
        let name = |n: &str| Some(OsString::from(n));
        assert_eq!(hinted_path("a", name("b.rs")).as_deref(), Some("a/b.rs"));
        assert_eq!(hinted_path("", name("top")).as_deref(), Some("top"));
        assert_eq!(hinted_path("a", None).as_deref(), Some("a"));
        assert_eq!(hinted_path("", None), None);
        assert_eq!(hinted_path(".git", name("index.lock")), None);
        assert_eq!(hinted_path("", name(".git")), None);
        assert_eq!(hinted_path("sub/.git", name("HEAD")), None);
        assert_eq!(hinted_path("", name(".devloop")), None);
    }

    #[test]
    fn a_descriptor_taken_over_by_a_new_name_leaves_the_old_name_unwatched() {
        let mut map = WatchMap::default();
        // Descriptors come only from the kernel: two real ones.
        let inotify = Inotify::init().unwrap();
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let w1 = inotify.watches().add(a.path(), mask()).unwrap();
        let w2 = inotify.watches().add(b.path(), mask()).unwrap();
        map.by_path.insert("d".into(), w1.clone());
        map.by_wd.insert(w1.clone(), "d".into());
        assert!(map.watched("d"));
        // `mv d e`, then `e` watched: the kernel hands back d's descriptor.
        map.by_path.insert("e".into(), w1.clone());
        map.by_wd.insert(w1.clone(), "e".into());
        assert!(map.watched("e") && !map.watched("d"));
        assert_eq!(map.forget("d"), None, "e's watch stays");
        assert!(map.watched("e"));
        map.by_path.insert("e/x".into(), w2.clone());
        map.by_wd.insert(w2, "e/x".into());
        assert_eq!(map.forget_subtree("e").len(), 2);
        assert!(map.by_path.is_empty() && map.by_wd.is_empty());
    }

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
