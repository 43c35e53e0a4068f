//! inotify watches over the folders of a [`Tree`], shared by the CLI's watcher (edits on the
//! laptop) and the agent's live index (what the container holds between sessions).
//!
//! One non-recursive watch per synced folder (ignored folders such as `node_modules/` cost none).
//! [`FolderWatches`] keeps its own map of watch descriptors to folders, updated in event order by
//! whoever reads the events ([`FolderWatches::interpret`]): a watch the kernel dropped (its folder
//! deleted: `IN_IGNORED`) or whose folder moved (`IN_MOVE_SELF`, which takes the watches below it
//! along) leaves the map before any later event is handed on, so a folder created again under the
//! same name (even on the same inode number) is seen as unwatched and watched again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};

use inotify::{EventMask, WatchDescriptor, WatchMask, Watches};

use crate::walk::Tree;

/// What one event says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Raw {
    /// A path an event was about, and what the event says of a write to it.
    Path(String, Write),
    /// The event stream lost track (queue overflow, read error): rescan everything.
    Rescan,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// Written to, or created as a file (a close follows).
    Begun,
    /// Closed after writing.
    Ended,
    Other,
}

/// The kernel refused another watch (`fs.inotify.max_user_watches` reached): events cannot be
/// trusted to cover the tree any more.
#[derive(Debug)]
pub struct WatchLimit;

/// The sysctl to raise when [`WatchLimit`] is hit.
pub const WATCH_LIMIT_HINT: &str =
    "raise it: sudo sysctl fs.inotify.max_user_watches=524288 (persist it in /etc/sysctl.d/)";

/// Which folder each watch stands for, and back. A folder counts as watched only when both
/// directions agree: inotify hands out one descriptor per inode, so a folder renamed within the
/// tree and watched under its new name takes the descriptor over from its old name.
#[derive(Default)]
pub struct WatchMap {
    by_wd: HashMap<WatchDescriptor, String>,
    by_path: HashMap<String, WatchDescriptor>,
}

impl WatchMap {
    fn watched(&self, path: &str) -> bool {
        self.by_path.get(path).is_some_and(|wd| self.by_wd.get(wd).is_some_and(|p| p == path))
    }

    fn insert(&mut self, rel: &str, wd: WatchDescriptor) {
        if let Some(old) = self.by_path.insert(rel.to_owned(), wd.clone()) {
            if old != wd && self.by_wd.get(&old).is_some_and(|p| p == rel) {
                self.by_wd.remove(&old);
            }
        }
        self.by_wd.insert(wd, rel.to_owned());
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

    pub fn len(&self) -> usize {
        self.by_wd.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_wd.is_empty()
    }
}

/// What the watches listen for. Not opens and reads; `ONLYDIR` and `DONT_FOLLOW` so that a path
/// that is no longer a real folder is not watched at all.
pub fn mask() -> WatchMask {
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

/// The watches of one tree's folders.
pub struct FolderWatches {
    root: PathBuf,
    watches: Watches,
    map: WatchMap,
}

impl FolderWatches {
    pub fn new(root: &Path, watches: Watches) -> FolderWatches {
        FolderWatches { root: root.to_path_buf(), watches, map: WatchMap::default() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How many folders are watched.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Watches the root and every folder of `tree`.
    pub fn start(&mut self, tree: &Tree) -> io::Result<Result<(), WatchLimit>> {
        for folder in std::iter::once("").chain(folders(tree)) {
            if let Err(limit) = self.add(folder)? {
                return Ok(Err(limit));
            }
        }
        Ok(Ok(()))
    }

    pub fn is_watched(&self, rel: &str) -> bool {
        self.map.watched(rel)
    }

    /// Watches one folder: `Ok(true)` when watched, `Ok(false)` when it is gone or no longer a
    /// folder already (the rescan its own event triggers will see that).
    pub fn add(&mut self, rel: &str) -> io::Result<Result<bool, WatchLimit>> {
        let path = if rel.is_empty() { self.root.clone() } else { self.root.join(rel) };
        match self.watches.add(&path, mask()) {
            Ok(wd) => {
                self.map.insert(rel, wd);
                Ok(Ok(true))
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => Ok(Err(WatchLimit)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)) => Ok(Ok(false)),
            Err(e) => Err(io::Error::new(e.kind(), format!("cannot watch {}: {e}", path.display()))),
        }
    }

    pub fn remove(&mut self, rel: &str) {
        if let Some(wd) = self.map.forget(rel) {
            // Already gone when the folder was deleted; the kernel says so with IN_IGNORED.
            let _ = self.watches.remove(wd);
        }
    }

    /// Keeps the watch set equal to the tree's folders after a targeted rescan. `changed` is what
    /// the rescan found changed; `hinted` the paths it was asked to look at: a hinted folder and
    /// every folder under it are watched again if their watch is gone (the folder was replaced or
    /// moved, which changes nothing in the tree when the new folder looks like the old one).
    ///
    /// Returns the folders newly watched: what was created in them before their watch existed
    /// raised no event, so the caller rescans them once more.
    pub fn update(
        &mut self,
        tree: &Tree,
        changed: &[String],
        hinted: &[String],
    ) -> io::Result<Result<Vec<String>, WatchLimit>> {
        let is_dir = |path: &str| tree.get(path).is_some_and(|s| s.entry.is_dir());
        // Old watches go before new ones are set (see `WatchMap`).
        for path in changed.iter().filter(|p| !is_dir(p)) {
            self.remove(path);
        }
        let mut candidates: BTreeSet<&str> = changed.iter().map(String::as_str).filter(|p| is_dir(p)).collect();
        for path in hinted.iter().filter(|p| is_dir(p)) {
            candidates.insert(path);
            let prefix = format!("{path}/");
            candidates.extend(tree.prefixed(&prefix).filter(|(_, s)| s.entry.is_dir()).map(|(k, _)| k));
        }
        self.add_unwatched(candidates)
    }

    /// Re-reads the watch set from a whole tree (after a full rescan). Returns the folders
    /// newly watched (see [`FolderWatches::update`]).
    pub fn reset(&mut self, tree: &Tree) -> io::Result<Result<Vec<String>, WatchLimit>> {
        let wanted: HashSet<&str> = folders(tree).collect();
        let stale: Vec<String> =
            self.map.by_path.keys().filter(|f| !f.is_empty() && !wanted.contains(f.as_str())).cloned().collect();
        for folder in &stale {
            self.remove(folder);
        }
        self.add_unwatched(std::iter::once("").chain(wanted))
    }

    fn add_unwatched<'a>(
        &mut self,
        folders: impl IntoIterator<Item = &'a str>,
    ) -> io::Result<Result<Vec<String>, WatchLimit>> {
        let mut added = Vec::new();
        for folder in folders {
            if self.is_watched(folder) {
                continue;
            }
            match self.add(folder)? {
                Ok(true) => added.push(folder.to_owned()),
                Ok(false) => {}
                Err(limit) => return Ok(Err(limit)),
            }
        }
        Ok(Ok(added))
    }

    /// What one event says, keeping the map true: a dropped or moved watch leaves the map before
    /// the event is handed on. `None` for events about nothing the tree can hold.
    pub fn interpret(&mut self, wd: &WatchDescriptor, mask: EventMask, name: Option<&OsStr>) -> Option<Raw> {
        if mask.contains(EventMask::Q_OVERFLOW) {
            return Some(Raw::Rescan);
        }
        let folder = self.map.by_wd.get(wd).cloned()?;
        if mask.contains(EventMask::IGNORED) {
            self.map.forget(&folder);
        } else if mask.contains(EventMask::MOVE_SELF) {
            // The folder lives elsewhere now, with the watches below it: their events would
            // carry the old paths. Drop them all; the rescan watches what is there.
            for wd in self.map.forget_subtree(&folder) {
                let _ = self.watches.remove(wd);
            }
        }
        let write = if mask.contains(EventMask::CLOSE_WRITE) {
            Write::Ended
        } else if mask.contains(EventMask::MODIFY)
            || (mask.contains(EventMask::CREATE) && !mask.contains(EventMask::ISDIR))
        {
            Write::Begun
        } else {
            Write::Other
        };
        hinted_path(&folder, name).map(|path| Raw::Path(path, write))
    }
}

fn folders(tree: &Tree) -> impl Iterator<Item = &str> {
    tree.iter().filter(|(_, s)| s.entry.is_dir()).map(|(p, _)| p)
}

/// The relative path an event is about, or `None` for paths devloop never syncs (`.git/`,
/// `.devloop/`) and for the root itself.
fn hinted_path(folder: &str, name: Option<&OsStr>) -> Option<String> {
    let path = match name {
        Some(name) => {
            let name = name.to_str()?;
            if folder.is_empty() {
                name.to_owned()
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
        && first != crate::RESERVED_DIR
        && !rel.contains("/.git/")
        && !rel.ends_with("/.git")
}

#[cfg(test)]
mod tests {
    use super::*;
    use inotify::Inotify;

    #[test]
    fn hinted_paths_skip_git_and_reserved() {
        let name = |n: &'static str| Some(OsStr::new(n));
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
        map.insert("d", w1.clone());
        assert!(map.watched("d"));
        // `mv d e`, then `e` watched: the kernel hands back d's descriptor.
        map.insert("e", w1.clone());
        assert!(map.watched("e") && !map.watched("d"));
        assert_eq!(map.forget("d"), None, "e's watch stays");
        assert!(map.watched("e"));
        map.insert("e/x", w2);
        assert_eq!(map.forget_subtree("e").len(), 2);
        assert!(map.by_path.is_empty() && map.by_wd.is_empty());
    }
}
