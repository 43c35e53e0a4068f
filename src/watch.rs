//! File-system events as hints. A hint only says "look here"; the rescan and the diff decide what
//! changed. Events are coalesced adaptively: the first one opens a window that closes after
//! [`Window::quiet`] without events, or at [`Window::cap`] while events keep coming.
//!
//! inotify watches are set per synced folder (ignored folders such as `node_modules/` cost none).
//! When the kernel's watch limit is reached the watcher says which sysctl to raise and falls back
//! to polling. A queue overflow turns into a full rescan.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devloop_agent::walk::Tree;
use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{ErrorKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use crate::report::{Event, Reporter};

/// The coalescing window.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub quiet: Duration,
    pub cap: Duration,
}

impl Default for Window {
    fn default() -> Self {
        // 3 ms of quiet closes a window (a save's events come within microseconds of each other);
        // a burst that pauses longer still costs one restart, which waits until no hint is left.
        Window { quiet: Duration::from_millis(3), cap: Duration::from_millis(100) }
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
    Paths(Vec<PathBuf>),
    Rescan,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch {path}: {source}")]
    Start { path: PathBuf, source: notify::Error },
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
}

enum Backend {
    /// One non-recursive inotify watch per synced folder, with the inode it was set on: a folder
    /// deleted and created again under the same name (or replaced by a renamed one) is a new
    /// inode, and the old watch went with the old one.
    Native { watcher: notify::RecommendedWatcher, folders: HashMap<String, u64> },
    /// No inotify: a timer asks for a full rescan (stat-cached, ignored folders skipped) at
    /// every tick. notify's PollWatcher compares mtimes in whole seconds and misses a file
    /// replaced twice within one; the scan compares size, mtime in nanoseconds and inode.
    Poll { ticker: tokio::task::JoinHandle<()> },
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Backend::Poll { ticker } = &self.backend {
            ticker.abort();
        }
    }
}

/// How often the polling fallback rescans.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

impl Watcher {
    /// Starts watching every folder of `tree` (and the root).
    pub fn start(root: &Path, tree: &Tree, reporter: Reporter) -> Result<Watcher, WatchError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let handler = handler(tx.clone());
        let watcher =
            notify::recommended_watcher(handler).map_err(|source| WatchError::Start { path: root.into(), source })?;
        let mut me = Watcher {
            root: root.to_path_buf(),
            backend: Backend::Native { watcher, folders: HashMap::new() },
            rx,
            tx,
            reporter,
            gathered: Hints::default(),
            opened: None,
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
    /// every folder under it are checked against the inode their watch was set on, since a folder
    /// replaced under the same name is no change to the tree but a dead watch.
    ///
    /// Returns the folders newly watched: what was created in them before their watch existed
    /// raised no event, so the caller rescans them once more.
    pub fn update(&mut self, tree: &Tree, changed: &[String], hinted: &[String]) -> Result<Vec<String>, WatchError> {
        let Backend::Native { watcher, folders } = &mut self.backend else { return Ok(Vec::new()) };
        // Watches go before new ones are set: a folder renamed within the tree keeps its inode,
        // and inotify hands out one watch per inode, so removing the old name's watch after the
        // new name was watched would remove both.
        for path in changed {
            let is_dir = tree.get(path).is_some_and(|s| s.entry.is_dir());
            if !is_dir && folders.remove(path).is_some() {
                let _ = watcher.unwatch(&self.root.join(path));
            }
        }
        let mut candidates: BTreeSet<&str> =
            changed.iter().filter(|p| tree.get(*p).is_some_and(|s| s.entry.is_dir())).map(String::as_str).collect();
        for path in hinted {
            if !tree.get(path).is_some_and(|s| s.entry.is_dir()) {
                continue;
            }
            candidates.insert(path);
            let prefix = format!("{path}/");
            let below = tree.range(prefix.clone()..).take_while(|(k, _)| k.starts_with(&prefix));
            candidates.extend(below.filter(|(_, s)| s.entry.is_dir()).map(|(k, _)| k.as_str()));
        }
        let mut added = Vec::new();
        for path in candidates {
            let Backend::Native { watcher, folders } = &mut self.backend else { break };
            match (folders.get(path), inode(&self.root.join(path))) {
                (Some(watched), Some(now)) if *watched == now => continue,
                (Some(_), _) => {
                    folders.remove(path);
                    let _ = watcher.unwatch(&self.root.join(path));
                }
                (None, _) => {}
            }
            if self.add_folder(path)? {
                added.push(path.to_owned());
            }
        }
        Ok(added)
    }

    /// Re-reads the watch set from a whole tree (after a full rescan).
    pub fn reset(&mut self, tree: &Tree) -> Result<(), WatchError> {
        let Backend::Native { folders, .. } = &self.backend else { return Ok(()) };
        let wanted: HashSet<&str> = tree.iter().filter(|(_, s)| s.entry.is_dir()).map(|(p, _)| p.as_str()).collect();
        // Gone, or no longer the inode the watch was set on.
        let stale: Vec<String> = folders
            .iter()
            .filter(|(f, ino)| {
                (!f.is_empty() && !wanted.contains(f.as_str())) || inode(&self.root.join(f.as_str())) != Some(**ino)
            })
            .map(|(f, _)| f.clone())
            .collect();
        if let Backend::Native { watcher, folders } = &mut self.backend {
            for folder in &stale {
                folders.remove(folder);
                let _ = watcher.unwatch(&self.root.join(folder));
            }
        }
        let missing: Vec<String> = match &self.backend {
            Backend::Native { folders, .. } => {
                let mut missing: Vec<String> =
                    wanted.iter().filter(|f| !folders.contains_key(**f)).map(|f| f.to_string()).collect();
                if !folders.contains_key("") {
                    missing.push(String::new());
                }
                missing
            }
            Backend::Poll { .. } => Vec::new(),
        };
        for folder in missing {
            self.add_folder(&folder)?;
        }
        Ok(())
    }

    /// Watches one folder; `false` when it is gone already (the rescan its own event triggers
    /// will see that) or the watcher fell back to polling.
    fn add_folder(&mut self, rel: &str) -> Result<bool, WatchError> {
        let Backend::Native { watcher, folders } = &mut self.backend else { return Ok(false) };
        let path = if rel.is_empty() { self.root.clone() } else { self.root.join(rel) };
        // The inode is read before the watch is set: if the folder is replaced in between, the
        // recorded inode is the old one and the next check sets the watch again (the other
        // order could record the new inode for a watch on the old one, and never notice).
        let Some(ino) = inode(&path) else { return Ok(false) };
        match watcher.watch(&path, RecursiveMode::NonRecursive) {
            Ok(()) => {
                folders.insert(rel.to_owned(), ino);
                Ok(true)
            }
            Err(e) if matches!(e.kind, ErrorKind::MaxFilesWatch) => self.fall_back_to_polling().map(|()| false),
            Err(e) if is_not_found(&e) => Ok(false),
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
        self.backend = Backend::Poll { ticker };
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
            match tokio::time::timeout(window.quiet.min(left), self.rx.recv()).await {
                Ok(Some(raw)) => self.absorb(raw),
                Ok(None) | Err(_) => break,
            }
        }
        self.opened = None;
        Some(std::mem::take(&mut self.gathered))
    }

    /// Whether hints are waiting: a window is open or events are queued.
    pub fn pending(&self) -> bool {
        self.opened.is_some() || !self.rx.is_empty()
    }

    fn absorb(&mut self, raw: Raw) {
        match raw {
            Raw::Rescan => self.gathered.rescan = true,
            Raw::Paths(paths) => {
                for path in paths {
                    if let Some(rel) = relative(&self.root, &path) {
                        self.gathered.paths.insert(rel);
                    }
                }
            }
        }
    }
}

fn handler(tx: mpsc::UnboundedSender<Raw>) -> impl Fn(notify::Result<notify::Event>) + Send + 'static {
    move |result| {
        let raw = match result {
            Ok(event) if event.need_rescan() => Raw::Rescan,
            Ok(event) => match event.kind {
                // Reads and opens change nothing.
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => Raw::Paths(event.paths),
                EventKind::Access(_) => return,
                _ => Raw::Paths(event.paths),
            },
            // An error inside the watcher: trust nothing, rescan.
            Err(_) => Raw::Rescan,
        };
        let _ = tx.send(raw);
    }
}

/// The inode of a folder (not following a symlink), `None` when it is not a folder.
fn inode(path: &Path) -> Option<u64> {
    std::fs::symlink_metadata(path).ok().filter(|m| m.is_dir()).map(|m| m.ino())
}

/// The path relative to the root, or `None` for paths devloop never syncs (`.git/`, `.devloop/`).
fn relative(root: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?.to_str()?;
    let first = rel.split('/').next().unwrap_or("");
    if first == ".git" || first == devloop_agent::RESERVED_DIR || rel.contains("/.git/") || rel.ends_with("/.git") {
        return None;
    }
    Some(rel.to_owned())
}

fn is_not_found(e: &notify::Error) -> bool {
    match &e.kind {
        ErrorKind::PathNotFound => true,
        ErrorKind::Io(io) => io.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_skip_git_and_reserved() {
        let root = Path::new("/src");
        assert_eq!(relative(root, Path::new("/src/a/b.rs")).as_deref(), Some("a/b.rs"));
        assert_eq!(relative(root, Path::new("/src")).as_deref(), Some(""));
        assert_eq!(relative(root, Path::new("/src/.git/index.lock")), None);
        assert_eq!(relative(root, Path::new("/src/sub/.git/HEAD")), None);
        assert_eq!(relative(root, Path::new("/src/.devloop/x")), None);
        assert_eq!(relative(root, Path::new("/elsewhere/x")), None);
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
