//! Reading a tree into a [`Tree`]: a parallel walk of its folders, pruned by the [`Filter`], with a stat cache so that an unchanged file (same size, mtime and inode) is never
//! hashed twice. Change detection stays by content: a file whose stat changed is re-hashed, and only
//! a different digest makes a change.
//!
//! Everything here is blocking IO; callers run a whole scan inside one blocking task.

use std::fs::{self, Metadata};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::filter::Filter;
use crate::manifest::{Digest, Entry, Manifest};
use crate::protocol::Problem;

/// A file's stat as read: what [`StatKey`] is made of.
///
/// ctime is part of it: `touch -r`, `cp -p` or a same-size rewrite that restores the mtime
/// cannot restore the ctime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
}

/// What the stat cache compares, held compact (8 bytes, also inside an `Option`): a 64-bit
/// fingerprint of size, mtime, ctime and inode. A file whose key is unchanged keeps its digest; a
/// change of any of them (another file renamed over it included) changes the key but with a
/// chance of 2^-64.
///
/// The fingerprint is std's `DefaultHasher` with its fixed keys: stable within one build, and
/// a build whose hasher differs only finds every saved key changed (each file hashed once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatKey {
    pub fingerprint: std::num::NonZeroU64,
}

/// How long after its last change a file's stat is trusted to stand for its content. A file
/// rewritten within one timestamp tick of being hashed keeps its size, mtime and ctime, so a stat
/// read that close to the change is not cached: the next scan hashes the file again (git's "racy
/// clean" rule). Linux file systems stamp nanoseconds from a clock that ticks every few
/// milliseconds; timestamps in whole seconds (FAT, HFS+, some network file systems) get
/// [`RACY_WINDOW_COARSE`].
pub const RACY_WINDOW: Duration = Duration::from_millis(100);
pub const RACY_WINDOW_COARSE: Duration = Duration::from_secs(2);

impl Stat {
    pub fn of(meta: &Metadata) -> Stat {
        Stat {
            size: meta.len(),
            mtime_ns: meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec()),
            ctime_ns: meta.ctime().saturating_mul(1_000_000_000).saturating_add(meta.ctime_nsec()),
            ino: meta.ino(),
        }
    }

    pub fn key(&self) -> StatKey {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        (self.size, self.mtime_ns, self.ctime_ns, self.ino).hash(&mut hasher);
        let fingerprint = std::num::NonZeroU64::new(hasher.finish()).unwrap_or(std::num::NonZeroU64::MIN);
        StatKey { fingerprint }
    }

    /// The key to cache for content read at `read_at` (taken before the read began), or `None`
    /// while the file changed too recently for its stat to be trusted.
    pub fn settled(self, read_at: SystemTime) -> Option<StatKey> {
        let read_at = read_at.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
        let coarse = self.mtime_ns % 1_000_000_000 == 0 && self.ctime_ns % 1_000_000_000 == 0;
        let window = if coarse { RACY_WINDOW_COARSE } else { RACY_WINDOW };
        let changed = self.mtime_ns.max(self.ctime_ns);
        (changed.saturating_add(window.as_nanos() as i64) < read_at).then(|| self.key())
    }
}

/// One scanned path: its entry, and for regular files the stat it was hashed at (`None` while
/// the file is too fresh for its stat to be trusted, see [`RACY_WINDOW`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scanned {
    pub entry: Entry,
    pub stat: Option<StatKey>,
}

/// A scanned tree, sorted by path ([`crate::tree`]). It is also the stat cache of the next scan.
pub use crate::tree::Tree;

/// What a stat cache knows of a file: the stat it was hashed at, and the digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Known {
    pub stat: StatKey,
    pub hash: Digest,
    pub size: u64,
}

/// Where a scan looks up the stats it may trust: the previous tree, or a stat cache read from
/// disk (looked up in place, never turned into a tree).
pub trait StatSource: Sync {
    fn known(&self, rel: &str) -> Option<Known>;
    /// How many files it knows.
    fn files(&self) -> usize;
    /// Where the paths of folder `dir` lie, for [`StatSource::known_in`]: a walk looks up a
    /// whole folder's entries one after the other.
    fn scope(&self, _dir: &str) -> Scope {
        Scope::All
    }
    /// [`StatSource::known`] of a path of the folder `scope` was taken for.
    fn known_in(&self, _scope: Scope, rel: &str) -> Option<Known> {
        self.known(rel)
    }
    /// [`StatSource::known_in`] of the folder's paths asked for in increasing order: `cursor`
    /// (0 before the first) keeps where the last one was found, and the next is looked for from
    /// there, the record right after it first (a walk reads each folder's names in order).
    fn known_in_order(&self, scope: Scope, _cursor: &mut usize, rel: &str) -> Option<Known> {
        self.known_in(scope, rel)
    }
}

/// A part of a stat source: the records of one folder, or all.
#[derive(Clone, Copy, Debug)]
pub enum Scope {
    All,
    /// Records `low..high`, whose paths all begin with the folder's `dir/`, `prefix` bytes.
    Records {
        low: usize,
        high: usize,
        prefix: usize,
    },
}

impl StatSource for Tree {
    fn known(&self, rel: &str) -> Option<Known> {
        known_of(self.get(rel)?)
    }

    fn files(&self) -> usize {
        self.values().filter(|s| s.stat.is_some()).count()
    }

    fn known_in_order(&self, _scope: Scope, cursor: &mut usize, rel: &str) -> Option<Known> {
        known_of(self.get_in_order(cursor, rel)?)
    }
}

/// What a tree's entry says of a file's stat and digest, if it is a file hashed at a known stat.
fn known_of(scanned: &Scanned) -> Option<Known> {
    match scanned {
        Scanned { entry: Entry::File { hash, size, .. }, stat: Some(stat) } => {
            Some(Known { stat: *stat, hash: *hash, size: *size })
        }
        _ => None,
    }
}

/// Counters of one scan, for tracing and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    pub entries: u64,
    pub hashed_files: u64,
    pub hashed_bytes: u64,
}

pub struct ScanOutcome {
    pub tree: Tree,
    pub problems: Vec<Problem>,
    pub stats: ScanStats,
}

/// The folders the paths of a stat cache lie in (as folder entries): what the cache, which keeps
/// only files, says about the folders of the tree it was saved from.
pub fn folders_of(cache: &StatCache) -> Tree {
    let mut folders = Tree::new();
    for path in cache.paths() {
        for dir in crate::relpath::ancestors(path) {
            if !folders.contains_key(dir) {
                folders.insert(dir.to_owned(), Scanned { entry: Entry::Dir, stat: None });
            }
        }
    }
    folders
}

/// The manifest view of a tree.
pub fn manifest_of(tree: &Tree) -> Manifest {
    tree.iter().map(|(path, s)| (path.to_owned(), s.entry.clone())).collect()
}

/// The records of a tree, in path order (what the agent sends of its manifest).
pub fn records_of(tree: &Tree) -> Vec<crate::manifest::Record> {
    tree.iter().map(|(path, s)| crate::manifest::Record { path: path.to_owned(), entry: s.entry.clone() }).collect()
}

/// Walks the whole tree stat-cached by the cache saved at `cache_path`, and saves the cache
/// again when the walk changed it.
pub fn scan_cached(filter: &Arc<Filter>, cache_path: &Path) -> ScanOutcome {
    let previous = load_stat_cache(cache_path);
    let outcome = scan(filter, &previous);
    if cache_changed(&previous, &outcome) {
        save_stat_cache(cache_path, &outcome.tree);
    }
    outcome
}

/// The digest of a tree's manifest (see [`crate::manifest::digest_of`]).
pub fn digest(tree: &Tree) -> Digest {
    crate::manifest::digest_of(tree.iter().map(|(path, s)| (path, &s.entry)))
}

/// Whether a scan leaves the stat cache to save different from `previous` (the cache it read):
/// a file was hashed, or files came or went. Directories and symlinks are not cached.
pub fn cache_changed(previous: &dyn StatSource, outcome: &ScanOutcome) -> bool {
    cache_changed_from(previous.files(), outcome)
}

/// [`cache_changed`] of a stat source that knew `previous_files` files.
pub fn cache_changed_from(previous_files: usize, outcome: &ScanOutcome) -> bool {
    outcome.stats.hashed_files > 0 || previous_files != outcome.tree.files()
}

/// Walks the whole tree under `filter.root()`; `previous` serves as the stat cache.
pub fn scan(filter: &Arc<Filter>, previous: &dyn StatSource) -> ScanOutcome {
    walk_with(filter, previous, &|_| {}).into_outcome()
}

/// [`scan`] up to the tree, calling `before_read` with each folder (the root as "") right before
/// the walk lists it, from the walker thread: a watch set there sees whatever changes in the
/// folder after the walk read it. What it found becomes the tree by [`Found::into_outcome`], so
/// that the caller can let the stat source go first (the two would otherwise be held at once).
pub fn walk_with(filter: &Arc<Filter>, previous: &dyn StatSource, before_read: &BeforeRead<'_>) -> Found {
    walk_below(filter, "", previous, SCAN_THREADS, before_read)
}

/// What a walk found: each walker thread's finds, folder by folder.
pub struct Found {
    /// The folder the walk began at: its entries are the tree's first level.
    start: String,
    runs: Vec<Run>,
    problems: Vec<Problem>,
    stats: ScanStats,
}

/// One walker thread's finds: its paths one after the other (no allocation per path), a
/// folder's entries together and in name order.
#[derive(Default)]
struct Run {
    paths: String,
    ends: Vec<u32>,
    rows: Vec<Scanned>,
    /// The folders this thread read, each with the rows of its entries.
    folders: Vec<Folder>,
}

struct Folder {
    dir: String,
    rows: std::ops::Range<u32>,
}

impl Run {
    fn path(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.paths[start..self.ends[i] as usize]
    }
}

/// A folder's entries being put into the tree: the next of its rows, and its subfolders whose
/// own entries are still to come.
struct Level<'a> {
    run: usize,
    next: u32,
    end: u32,
    /// Subfolders already put in, in the order their entries go in (`sub/` among the names).
    below: std::collections::VecDeque<&'a str>,
}

impl Found {
    /// The tree, sized once: each folder's entries (in name order already) put in as they come,
    /// a subfolder's own entries where its path and a `/` sort among its siblings (after `a`,
    /// `a-b` and `a.txt` come `a/…`). Nothing is sorted here; paths are compared only with a
    /// subfolder's name waiting to go in.
    pub fn into_outcome(self) -> ScanOutcome {
        let Found { start, mut runs, problems, stats } = self;
        let bytes = runs.iter().map(|run| run.paths.len()).sum();
        let count = runs.iter().map(|run| run.rows.len()).sum();
        let mut tree = Tree::with_capacity(bytes, count);
        // The entries are moved out of the runs; their paths are read where they lie.
        let mut rows: Vec<Vec<Scanned>> = runs.iter_mut().map(|run| std::mem::take(&mut run.rows)).collect();
        let mut folders = std::collections::HashMap::new();
        for (k, run) in runs.iter().enumerate() {
            folders.extend(run.folders.iter().map(|folder| (folder.dir.as_str(), (k, folder.rows.clone()))));
        }
        let level = |dir: &str| {
            let (run, range) = folders.get(dir)?;
            Some(Level { run: *run, next: range.start, end: range.end, below: Default::default() })
        };
        let mut stack: Vec<Level> = level(&start).into_iter().collect();
        while let Some(at) = stack.last_mut() {
            let run = &runs[at.run];
            let next = (at.next < at.end).then(|| run.path(at.next as usize));
            if let Some(&sub) = at.below.front() {
                if next.is_none_or(|path| subtree_sorts_before(sub, path)) {
                    at.below.pop_front();
                    // A folder gone before it was read has no entries.
                    stack.extend(level(sub));
                    continue;
                }
            }
            let Some(path) = next else {
                stack.pop();
                continue;
            };
            let i = at.next as usize;
            at.next += 1;
            let scanned = std::mem::replace(&mut rows[at.run][i], Scanned { entry: Entry::Dir, stat: None });
            if scanned.entry.is_dir() {
                let place = at.below.partition_point(|waiting| subtree_cmp(waiting, path).is_lt());
                at.below.insert(place, path);
            }
            debug_assert!(tree.after_last(path), "a walk's entries go into the tree in order: {path}");
            tree.append(path, scanned);
        }
        drop(rows);
        drop(runs);
        tree.shrink_to_fit();
        let stats = ScanStats { entries: tree.len() as u64, ..stats };
        ScanOutcome { tree, problems, stats }
    }
}

/// Whether the entries below folder `dir` (`dir/…`) sort before `path`, a sibling's path.
fn subtree_sorts_before(dir: &str, path: &str) -> bool {
    dir.bytes().chain(std::iter::once(b'/')).lt(path.bytes())
}

/// The order of two folders' entries: of `a/` and `b/`.
fn subtree_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let slash = || std::iter::once(b'/');
    a.bytes().chain(slash()).cmp(b.bytes().chain(slash()))
}

/// See [`walk_with`].
pub type BeforeRead<'a> = dyn Fn(&str) + Sync + 'a;

/// Threads of a full scan.
const SCAN_THREADS: usize = 2;

/// The buffer a walker thread lists folders into: about 1,500 entries of short names per
/// `getdents` call.
const LISTING_BYTES: usize = 64 * 1024;

/// Everything below the folder `start` ("" for the root), not `start` itself: folders are read
/// by `threads` threads from a shared queue, each entry examined relative to its folder's
/// descriptor (`fstatat`, `openat`: no path walked from the root per file), folders excluded by
/// the filter never opened.
fn walk_below(
    filter: &Arc<Filter>,
    start: &str,
    previous: &dyn StatSource,
    threads: usize,
    before_read: &BeforeRead<'_>,
) -> Found {
    let queue = DirQueue { state: Mutex::new((vec![start.to_owned()], 0)), ready: Condvar::new() };
    let found: Mutex<Vec<Run>> = Mutex::new(Vec::new());
    let problems: Mutex<Vec<Problem>> = Mutex::new(Vec::new());
    let stats: Mutex<ScanStats> = Mutex::new(ScanStats::default());
    let root = match rustix::fs::open(filter.root(), OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
    {
        Ok(fd) => fd,
        Err(e) => {
            let problem = Problem { path: start.to_owned(), message: io::Error::from(e).to_string() };
            let stats = ScanStats::default();
            return Found { start: start.to_owned(), runs: Vec::new(), problems: vec![problem], stats };
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                let mut batch = Batch {
                    run: Run::default(),
                    rel: String::new(),
                    listing: vec![std::mem::MaybeUninit::uninit(); LISTING_BYTES],
                    names: Vec::new(),
                    name_text: String::new(),
                    problems: Vec::new(),
                    stats: ScanStats::default(),
                    sink: (&found, &problems, &stats),
                };
                while let Some(dir) = queue.pop() {
                    before_read(&dir);
                    let first = batch.run.rows.len();
                    let subdirs = batch.read_dir(filter, &root, &dir, previous);
                    let rows = row_number(first)..row_number(batch.run.rows.len());
                    batch.run.folders.push(Folder { dir, rows });
                    queue.finish(subdirs);
                }
            });
        }
    });
    let runs = found.into_inner().expect("scan results poisoned");
    let mut problems = problems.into_inner().expect("scan problems poisoned");
    problems.sort_by(|a, b| a.path.cmp(&b.path));
    let stats = stats.into_inner().expect("scan stats poisoned");
    Found { start: start.to_owned(), runs, problems, stats }
}

fn row_number(row: usize) -> u32 {
    u32::try_from(row).expect("a walk's rows fit in 4 G")
}

/// The folders waiting to be read, and how many are being read (the walk ends when both are
/// none).
struct DirQueue {
    state: Mutex<(Vec<String>, usize)>,
    ready: Condvar,
}

impl DirQueue {
    fn pop(&self) -> Option<String> {
        let mut state = self.state.lock().expect("scan queue poisoned");
        loop {
            if let Some(dir) = state.0.pop() {
                state.1 += 1;
                return Some(dir);
            }
            if state.1 == 0 {
                return None;
            }
            state = self.ready.wait(state).expect("scan queue poisoned");
        }
    }

    fn finish(&self, subdirs: Vec<String>) {
        let mut state = self.state.lock().expect("scan queue poisoned");
        state.0.extend(subdirs);
        state.1 -= 1;
        self.ready.notify_all();
    }
}

/// What a targeted rescan found.
#[derive(Debug, Default)]
pub struct RescanOutcome {
    /// Paths whose entry appeared, vanished or changed; sorted, distinct.
    pub changed: Vec<String>,
    pub problems: Vec<Problem>,
    pub stats: ScanStats,
}

/// Re-reads only the given paths (from watcher hints): a path that is gone leaves the tree with
/// everything under it; a folder is walked again; a file is re-hashed when its stat changed.
/// Every path is looked up beneath the root's descriptor, following no symlink: a path whose
/// folders are no longer folders is not part of the tree.
pub fn rescan(filter: &Arc<Filter>, tree: &mut Tree, paths: &[String]) -> RescanOutcome {
    let mut out = RescanOutcome::default();
    let mut changed = std::collections::BTreeSet::new();
    let root = match crate::beneath::open_root(filter.root()) {
        Ok(root) => root,
        Err(e) => {
            out.problems.push(problem("", &e));
            return out;
        }
    };
    for rel in paths {
        if rel.is_empty() {
            continue;
        }
        let (parent, name) = match rel.rfind('/') {
            Some(cut) => (&rel[..cut], &rel[cut + 1..]),
            None => ("", rel.as_str()),
        };
        let looked = crate::beneath::open_dir(&root, parent).and_then(|dir| {
            let c_name = std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            let st = rustix::fs::statat(&dir, &c_name, AtFlags::SYMLINK_NOFOLLOW)?;
            Ok((dir, c_name, st))
        });
        let (dir, c_name, st) = match looked {
            Ok(looked) => looked,
            // Gone, or reached through something that is no longer a folder.
            Err(e) if is_not_in_tree(&e) => {
                changed.extend(remove_subtree(tree, rel));
                continue;
            }
            Err(e) => {
                out.problems.push(problem(rel, &e));
                continue;
            }
        };
        let kind = FileType::from_raw_mode(st.st_mode);
        if filter.is_excluded(rel, kind == FileType::Directory) {
            changed.extend(remove_subtree(tree, rel));
            continue;
        }
        for dir in crate::relpath::ancestors(rel) {
            put(tree, &mut changed, dir, Scanned { entry: Entry::Dir, stat: None });
        }
        if kind == FileType::Directory {
            let scanned = scan_under(filter, rel, tree);
            out.problems.extend(scanned.problems);
            out.stats.hashed_files += scanned.stats.hashed_files;
            out.stats.hashed_bytes += scanned.stats.hashed_bytes;
            for key in subtree_keys(tree, rel) {
                if !scanned.tree.contains_key(&key) {
                    tree.remove(&key);
                    changed.insert(key);
                }
            }
            if matches!(tree.get(rel.as_str()), Some(s) if !s.entry.is_dir()) {
                changed.extend(remove_subtree(tree, rel));
            }
            put(tree, &mut changed, rel, Scanned { entry: Entry::Dir, stat: None });
            for (key, value) in scanned.tree {
                put(tree, &mut changed, &key, value);
            }
            continue;
        }
        let previous = || tree.known(rel);
        match read_at(&dir, &c_name, kind, Some(st), previous, &mut out.stats) {
            Ok(Some(scanned)) => {
                changed.extend(remove_subtree_below(tree, rel));
                put(tree, &mut changed, rel, scanned);
            }
            Ok(None) => {
                changed.extend(remove_subtree(tree, rel));
                out.problems.push(not_syncable(rel, kind));
            }
            // Changed type since the look: the watcher's event for that change brings it back.
            Err(e) if is_not_in_tree(&e) => changed.extend(remove_subtree(tree, rel)),
            Err(e) => out.problems.push(problem(rel, &e)),
        }
    }
    out.changed = changed.into_iter().collect();
    out
}

/// Errors that say a path is not part of the tree now: gone, or below something that is not a
/// folder (a symlink is never followed).
fn is_not_in_tree(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
        || matches!(e.raw_os_error(), Some(code) if code == rustix::io::Errno::NOTDIR.raw_os_error() || code == rustix::io::Errno::LOOP.raw_os_error())
}

/// The problem of a path the tree cannot hold (a FIFO, socket or device).
fn not_syncable(rel: &str, kind: FileType) -> Problem {
    Problem {
        path: rel.to_owned(),
        message: format!("{} is not a regular file, folder or symlink; skipped", crate::beneath::kind_name(kind)),
    }
}

fn put(tree: &mut Tree, changed: &mut std::collections::BTreeSet<String>, rel: &str, scanned: Scanned) {
    match tree.get_mut(rel) {
        Some(old) if old.entry == scanned.entry => *old = scanned,
        Some(old) => {
            *old = scanned;
            changed.insert(rel.to_owned());
        }
        None => {
            tree.insert(rel.to_owned(), scanned);
            changed.insert(rel.to_owned());
        }
    }
}

fn scan_under(filter: &Arc<Filter>, rel: &str, previous: &Tree) -> ScanOutcome {
    walk_below(filter, rel, previous, 1, &|_| {}).into_outcome()
}

type Sink<'a> = (&'a Mutex<Vec<Run>>, &'a Mutex<Vec<Problem>>, &'a Mutex<ScanStats>);

/// What one walker thread found; handed over to the shared results when the thread is done.
struct Batch<'a> {
    run: Run,
    /// The path of the entry being read (kept: its buffer serves every entry).
    rel: String,
    /// What `getdents` fills, reused for every folder.
    listing: Vec<std::mem::MaybeUninit<u8>>,
    /// The names of the folder being read, sorted before they are looked at; their text (each
    /// name followed by a NUL) in `name_text`. Both reused for every folder.
    names: Vec<Listed>,
    name_text: String,
    problems: Vec<Problem>,
    stats: ScanStats,
    sink: Sink<'a>,
}

impl Batch<'_> {
    /// Reads one folder: its entries into the batch; returns its subfolders to read.
    fn read_dir(&mut self, filter: &Filter, root: &OwnedFd, dir: &str, previous: &dyn StatSource) -> Vec<String> {
        // Resolved beneath the root, following no symlink on the way: a folder swapped for a
        // symlink since it was listed is never read through. The folder's descriptor serves the
        // listing and the lookups.
        let fd = match crate::beneath::open_dir(root, dir) {
            Ok(fd) => fd,
            // Gone since it was listed: not part of the tree now.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
            // Replaced by a file or a symlink since it was listed: not followed; the change's
            // own event (or the next scan) reads it again.
            Err(e) if is_not_in_tree(&e) => {
                let message = "changed while it was read (not a folder any more); not followed".into();
                self.problems.push(Problem { path: dir.to_owned(), message });
                return Vec::new();
            }
            Err(e) => {
                self.problems.push(problem(dir, &e));
                return Vec::new();
            }
        };
        self.list(&fd, dir);
        // Read in name order: the entries go into the tree in the order they come, and the stat
        // source is looked up forward from the last path found.
        let text = &self.name_text;
        self.names.sort_unstable_by(|a, b| a.name(text).cmp(b.name(text)));
        // A name moved within the folder while it was listed may come twice.
        self.names.dedup_by(|a, b| a.name(text) == b.name(text));
        let mut subdirs = Vec::new();
        let scope = previous.scope(dir);
        let mut cursor = 0;
        let rules = filter.in_folder(dir);
        for listed in &self.names {
            let name = listed.c_name(&self.name_text);
            self.rel.clear();
            if !dir.is_empty() {
                self.rel.push_str(dir);
                self.rel.push('/');
            }
            self.rel.push_str(listed.name(&self.name_text));
            let rel = self.rel.as_str();
            let mut kind = listed.kind;
            let mut stat = None;
            if kind == FileType::Unknown {
                match rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => {
                        kind = FileType::from_raw_mode(st.st_mode);
                        stat = Some(st);
                    }
                    Err(rustix::io::Errno::NOENT) => continue,
                    Err(e) => {
                        self.problems.push(problem(rel, &e.into()));
                        continue;
                    }
                }
            }
            if rules.excluded(rel, kind == FileType::Directory) {
                continue;
            }
            let known = || previous.known_in_order(scope, &mut cursor, rel);
            match read_at(&fd, name, kind, stat, known, &mut self.stats) {
                Ok(Some(scanned)) => {
                    if kind == FileType::Directory {
                        subdirs.push(rel.to_owned());
                    }
                    let run = &mut self.run;
                    run.paths.push_str(rel);
                    run.ends.push(u32::try_from(run.paths.len()).expect("a walk's paths fit in 4 GiB"));
                    run.rows.push(scanned);
                }
                Ok(None) => self.problems.push(not_syncable(rel, kind)),
                // Gone, or changed type, between the listing and the look.
                Err(e) if is_not_in_tree(&e) => {}
                Err(e) => self.problems.push(problem(rel, &e)),
            }
        }
        subdirs
    }

    /// Lists the folder open at `fd` into `names` and `name_text`, in the order the file system
    /// gives (`.` and `..` left out; a name that is not UTF-8 is a problem, and skipped).
    fn list(&mut self, fd: &OwnedFd, dir: &str) {
        self.names.clear();
        self.name_text.clear();
        // The entries are read in place from the batch's buffer: no allocation per name.
        let mut listing = rustix::fs::RawDir::new(fd, &mut self.listing);
        while let Some(entry) = listing.next() {
            let entry = match entry {
                Ok(entry) => entry,
                // The folder was removed while it was read: it is not part of the tree now.
                Err(rustix::io::Errno::NOENT) => break,
                Err(e) => {
                    self.problems.push(problem(dir, &e.into()));
                    break;
                }
            };
            let name = entry.file_name();
            let bytes = name.to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            let Ok(text) = std::str::from_utf8(bytes) else {
                let shown = String::from_utf8_lossy(bytes);
                let path = if dir.is_empty() { shown.into_owned() } else { format!("{dir}/{shown}") };
                self.problems.push(Problem { path, message: "file name is not UTF-8; skipped".into() });
                continue;
            };
            let start = self.name_text.len();
            self.name_text.push_str(text);
            self.name_text.push('\0');
            self.names.push(Listed { start, len: text.len(), kind: entry.file_type() });
        }
    }
}

/// A name listed in a folder: where it lies in the batch's `name_text` (a NUL after it), and
/// its type as `getdents` gave it.
#[derive(Clone, Copy)]
struct Listed {
    start: usize,
    len: usize,
    kind: FileType,
}

impl Listed {
    fn name<'t>(&self, text: &'t str) -> &'t str {
        &text[self.start..self.start + self.len]
    }

    fn c_name<'t>(&self, text: &'t str) -> &'t std::ffi::CStr {
        let bytes = &text.as_bytes()[self.start..=self.start + self.len];
        std::ffi::CStr::from_bytes_with_nul(bytes).expect("listed with its NUL")
    }
}

/// One entry of a folder, read relative to the folder's descriptor: a folder, a symlink's
/// target, or a regular file's digest (from `previous` when the stat is unchanged). `None` for
/// what a tree does not hold (FIFOs, sockets, devices); `NotFound` when the entry changed type
/// since it was listed.
fn read_at(
    dir: &OwnedFd,
    name: &std::ffi::CStr,
    kind: FileType,
    stat: Option<rustix::fs::Stat>,
    previous: impl FnOnce() -> Option<Known>,
    stats: &mut ScanStats,
) -> io::Result<Option<Scanned>> {
    match kind {
        FileType::Directory => return Ok(Some(Scanned { entry: Entry::Dir, stat: None })),
        FileType::Symlink => {
            let target = rustix::fs::readlinkat(dir, name, Vec::new())?;
            let target = target
                .into_string()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "symlink target is not UTF-8"))?;
            return Ok(Some(Scanned { entry: Entry::Symlink { target }, stat: None }));
        }
        FileType::RegularFile => {}
        _ => return Ok(None),
    }
    let st = match stat {
        Some(st) => st,
        None => rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?,
    };
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => {}
        // Replaced since it was listed.
        FileType::Directory | FileType::Symlink => return Err(io::ErrorKind::NotFound.into()),
        _ => return Ok(None),
    }
    let now = StatKey::of_stat(&st);
    if let Some(known) = previous().filter(|known| known.stat == now) {
        let entry = Entry::File { hash: known.hash, size: known.size, exec: st.st_mode & 0o111 != 0 };
        return Ok(Some(Scanned { entry, stat: Some(now) }));
    }
    let read_at = SystemTime::now();
    // Opened without blocking and checked again: what is hashed is the regular file whose stat
    // is recorded, whatever took the name's place since the look.
    let opened = match crate::beneath::open_file_at(dir, name) {
        Ok(opened) => opened,
        Err(crate::beneath::OpenError::NotRegular(_)) => return Err(io::ErrorKind::NotFound.into()),
        Err(crate::beneath::OpenError::Io(e)) => return Err(e),
    };
    let key = Stat::of_stat(&opened.stat);
    let exec = opened.stat.st_mode & 0o111 != 0;
    let (hash, size) = hash_reader(opened.file)?;
    stats.hashed_files += 1;
    stats.hashed_bytes += size;
    // The stat was read before the content: a change in between shows as a new stat next time.
    Ok(Some(Scanned { entry: Entry::File { hash, size, exec }, stat: key.settled(read_at) }))
}

impl StatKey {
    /// The key of a stat read by `fstat`/`fstatat`.
    pub fn of_stat(st: &rustix::fs::Stat) -> StatKey {
        Stat::of_stat(st).key()
    }
}

impl Stat {
    /// A stat read by `fstat`/`fstatat` (the field types differ between libcs).
    #[allow(clippy::unnecessary_cast)]
    pub fn of_stat(st: &rustix::fs::Stat) -> Stat {
        Stat {
            size: st.st_size as u64,
            mtime_ns: (st.st_mtime as i64).saturating_mul(1_000_000_000).saturating_add(st.st_mtime_nsec as i64),
            ctime_ns: (st.st_ctime as i64).saturating_mul(1_000_000_000).saturating_add(st.st_ctime_nsec as i64),
            ino: st.st_ino as u64,
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        let (found, problems, stats) = self.sink;
        // Handed over whole (not copied into one list while the stat source is still held).
        found.lock().expect("poisoned").push(std::mem::take(&mut self.run));
        problems.lock().expect("poisoned").append(&mut self.problems);
        let mut s = stats.lock().expect("poisoned");
        s.hashed_files += self.stats.hashed_files;
        s.hashed_bytes += self.stats.hashed_bytes;
    }
}

fn problem(rel: &str, err: &io::Error) -> Problem {
    Problem { path: rel.to_owned(), message: err.to_string() }
}

/// blake3 of what `file` reads to its end, and its length.
pub fn hash_reader(mut file: impl Read) -> io::Result<(Digest, u64)> {
    thread_local! {
        // One buffer per walker thread: a fresh 64 KiB per file is 64 KiB of zeroes written
        // per file (6.4 GB for 100,000 files), whatever the file's size.
        static BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 64 << 10]);
    }
    BUFFER.with_borrow_mut(|buf| hash_into(&mut file, buf))
}

fn hash_into(file: &mut impl Read, buf: &mut [u8]) -> io::Result<(Digest, u64)> {
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    loop {
        let n = match file.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((Digest(*hasher.finalize().as_bytes()), size))
}

fn subtree_keys(tree: &Tree, rel: &str) -> Vec<String> {
    let prefix = format!("{rel}/");
    tree.prefixed(&prefix).map(|(k, _)| k.to_owned()).collect()
}

/// Removes `rel` and everything under it; returns the paths removed.
pub fn remove_subtree(tree: &mut Tree, rel: &str) -> Vec<String> {
    let mut removed = remove_subtree_below(tree, rel);
    if tree.remove(rel).is_some() {
        removed.push(rel.to_owned());
    }
    removed
}

fn remove_subtree_below(tree: &mut Tree, rel: &str) -> Vec<String> {
    let keys = subtree_keys(tree, rel);
    for key in &keys {
        tree.remove(key);
    }
    keys
}

/// First bytes of a saved stat cache; a file without them (another version's) is not read.
///
/// After them: the number of files (u64), one record of [`RECORD`] bytes per file in path order
/// (path offset and length in the name table, u32 each; size and the [`StatKey`]'s fingerprint,
/// 8 bytes each; the digest), then the name table.
/// Little-endian. A scan looks files up in it by binary search: loading it allocates nothing per
/// file.
const CACHE_FORMAT: &[u8] = b"devloop-stat-cache-5\n";
const RECORD: usize = 56;

/// A stat cache as saved by [`save_stat_cache`], mapped and looked up in place.
#[derive(Default)]
pub struct StatCache {
    bytes: CacheBytes,
    count: usize,
}

/// The bytes of a saved stat cache: read whole, or the file mapped read-only (as git maps its
/// index). devloop only ever replaces a cache file by a rename ([`save_stat_cache`]), never
/// writes one in place, so a mapping keeps the file as it was when it was opened.
enum CacheBytes {
    Mapped { ptr: std::ptr::NonNull<u8>, len: usize },
    Read(Vec<u8>),
}

// The mapping is read-only and owned by the value: shared reads from any thread are sound.
unsafe impl Send for CacheBytes {}
unsafe impl Sync for CacheBytes {}

impl Default for CacheBytes {
    fn default() -> CacheBytes {
        CacheBytes::Read(Vec::new())
    }
}

impl CacheBytes {
    fn map(path: &Path) -> io::Result<CacheBytes> {
        let file = fs::File::open(path)?;
        let len = file.metadata()?.len() as usize;
        if len == 0 {
            return Ok(CacheBytes::default());
        }
        // SAFETY: a fresh private read-only mapping of a whole file, unmapped only by Drop.
        let mapped = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ,
                rustix::mm::MapFlags::PRIVATE,
                &file,
                0,
            )
        };
        match mapped.ok().and_then(|ptr| std::ptr::NonNull::new(ptr.cast::<u8>())) {
            Some(ptr) => Ok(CacheBytes::Mapped { ptr, len }),
            None => Ok(CacheBytes::Read(fs::read(path)?)),
        }
    }
}

impl std::ops::Deref for CacheBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            // SAFETY: `len` bytes mapped readable at `ptr` for as long as `self` lives.
            CacheBytes::Mapped { ptr, len } => unsafe { std::slice::from_raw_parts(ptr.as_ptr(), *len) },
            CacheBytes::Read(bytes) => bytes,
        }
    }
}

impl Drop for CacheBytes {
    fn drop(&mut self) {
        if let CacheBytes::Mapped { ptr, len } = *self {
            // SAFETY: the mapping made in `open`, not used after this.
            let _ = unsafe { rustix::mm::munmap(ptr.as_ptr().cast(), len) };
        }
    }
}

impl StatCache {
    fn record(&self, i: usize) -> Option<&[u8]> {
        let start = CACHE_FORMAT.len() + 8 + i * RECORD;
        self.bytes.get(start..start + RECORD)
    }

    fn path(&self, record: &[u8]) -> Option<&[u8]> {
        let table = CACHE_FORMAT.len() + 8 + self.count * RECORD;
        let offset = u32::from_le_bytes(record[0..4].try_into().ok()?) as usize;
        let len = u32::from_le_bytes(record[4..8].try_into().ok()?) as usize;
        self.bytes.get(table.checked_add(offset)?..table.checked_add(offset)?.checked_add(len)?)
    }

    /// Every file path the cache holds, in order (unreadable records left out).
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        (0..self.count).filter_map(|i| std::str::from_utf8(self.path(self.record(i)?)?).ok())
    }
}

fn u64_at(record: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(record[at..at + 8].try_into().expect("8 bytes"))
}

impl StatCache {
    /// The first record whose path is not below `bound`, searching `low..high`.
    fn lower_bound(&self, mut low: usize, mut high: usize, bound: &[u8]) -> usize {
        while low < high {
            let mid = low + (high - low) / 2;
            match self.record(mid).and_then(|r| self.path(r)) {
                Some(path) if path < bound => low = mid + 1,
                _ => high = mid,
            }
        }
        low
    }

    /// The record of the path that is `rest` after the `prefix` bytes that every path in
    /// `low..high` begins with; or where it would be. `None` for a damaged record on the way.
    fn position(&self, (mut low, mut high, prefix): (usize, usize, usize), rest: &str) -> Option<Result<usize, usize>> {
        while low < high {
            let mid = low + (high - low) / 2;
            match self.rest_of(mid, prefix)?.cmp(rest.as_bytes()) {
                std::cmp::Ordering::Less => low = mid + 1,
                std::cmp::Ordering::Greater => high = mid,
                std::cmp::Ordering::Equal => return Some(Ok(mid)),
            }
        }
        Some(Err(low))
    }

    /// The path of record `i` after its first `prefix` bytes.
    fn rest_of(&self, i: usize, prefix: usize) -> Option<&[u8]> {
        self.path(self.record(i)?)?.get(prefix..)
    }

    fn find(&self, range: (usize, usize, usize), rest: &str) -> Option<Known> {
        self.known_at(self.position(range, rest)?.ok()?)
    }

    /// What record `i` knows.
    fn known_at(&self, i: usize) -> Option<Known> {
        let record = self.record(i)?;
        let size = u64_at(record, 8);
        let fingerprint = std::num::NonZeroU64::new(u64_at(record, 16))?;
        let stat = StatKey { fingerprint };
        let hash = Digest(record[24..56].try_into().ok()?);
        Some(Known { stat, hash, size })
    }
}

impl StatSource for StatCache {
    fn known(&self, rel: &str) -> Option<Known> {
        self.find((0, self.count, 0), rel)
    }

    fn files(&self) -> usize {
        self.count
    }

    /// The records from `dir/` up to `dir0` (`0` follows `/`): the folder's paths and those below.
    fn scope(&self, dir: &str) -> Scope {
        if dir.is_empty() {
            return Scope::Records { low: 0, high: self.count, prefix: 0 };
        }
        let low = self.lower_bound(0, self.count, format!("{dir}/").as_bytes());
        let high = self.lower_bound(low, self.count, format!("{dir}0").as_bytes());
        Scope::Records { low, high, prefix: dir.len() + 1 }
    }

    fn known_in(&self, scope: Scope, rel: &str) -> Option<Known> {
        match scope {
            Scope::All => self.known(rel),
            // The paths of a folder's records share its prefix: only the rest is compared.
            Scope::Records { low, high, prefix } => match rel.get(prefix..) {
                Some(rest) => self.find((low, high, prefix), rest),
                None => None,
            },
        }
    }

    fn known_in_order(&self, scope: Scope, cursor: &mut usize, rel: &str) -> Option<Known> {
        let Scope::Records { low, high, prefix } = scope else { return self.known_in(scope, rel) };
        let rest = rel.get(prefix..)?;
        let from = (*cursor).clamp(low, high);
        let at = match self.rest_of(from, prefix) {
            Some(next) if from < high && next == rest.as_bytes() => Ok(from),
            _ => self.position((from, high, prefix), rest)?,
        };
        self.known_at(crate::tree::advance(cursor, at)?)
    }
}

/// Reads a stat cache saved by [`save_stat_cache`]; an empty one when there is none or it is
/// unreadable. Read whole: the agent's cache lies where the app can write, and a mapped file cut
/// short under a reader kills it (`SIGBUS`).
pub fn load_stat_cache(path: &Path) -> StatCache {
    stat_cache_of(fs::read(path).map(CacheBytes::Read))
}

/// [`load_stat_cache`] mapped instead of read, for a cache that only the user's own devloop
/// writes (the CLI's, in `~/.cache`): no copy, and only the pages a scan looks at are touched.
pub fn map_stat_cache(path: &Path) -> StatCache {
    stat_cache_of(CacheBytes::map(path))
}

fn stat_cache_of(bytes: io::Result<CacheBytes>) -> StatCache {
    let Ok(bytes) = bytes else { return StatCache::default() };
    let Some(count) = bytes.strip_prefix(CACHE_FORMAT).and_then(|rest| rest.get(..8)) else {
        return StatCache::default();
    };
    let count = u64::from_le_bytes(count.try_into().expect("8 bytes")) as usize;
    let fits = count
        .checked_mul(RECORD)
        .and_then(|r| r.checked_add(CACHE_FORMAT.len() + 8))
        .is_some_and(|end| end <= bytes.len());
    if !fits {
        return StatCache::default();
    }
    StatCache { bytes, count }
}

/// Saves the files of `tree` (path, stat, digest) atomically; best effort.
pub fn save_stat_cache(path: &Path, tree: &Tree) {
    let files: Vec<(&str, &Scanned)> =
        tree.iter().filter(|(_, s)| matches!(s, Scanned { entry: Entry::File { .. }, stat: Some(_) })).collect();
    let mut bytes = Vec::with_capacity(CACHE_FORMAT.len() + 8 + files.len() * (RECORD + 24));
    bytes.extend_from_slice(CACHE_FORMAT);
    bytes.extend_from_slice(&(files.len() as u64).to_le_bytes());
    let mut names = Vec::new();
    for (path, scanned) in &files {
        let (Entry::File { hash, size, .. }, Some(stat)) = (&scanned.entry, scanned.stat) else { continue };
        let (Ok(offset), Ok(len)) = (u32::try_from(names.len()), u32::try_from(path.len())) else { return };
        names.extend_from_slice(path.as_bytes());
        bytes.extend_from_slice(&offset.to_le_bytes());
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&size.to_le_bytes());
        bytes.extend_from_slice(&stat.fingerprint.get().to_le_bytes());
        bytes.extend_from_slice(&hash.0);
    }
    bytes.extend_from_slice(&names);
    if let Some(parent) = path.parent() {
        let _ = fs::create_dir_all(parent);
    }
    let tmp = path.with_extension("tmp");
    if fs::write(&tmp, bytes).is_ok() {
        let _ = fs::rename(&tmp, path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn write(root: &Path, rel: &str, body: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, body).unwrap();
    }

    fn setup() -> (tempfile::TempDir, Arc<Filter>) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "src/main.rs", "fn main() {}");
        write(root, ".env", "A=1");
        write(root, ".gitignore", "target/\n");
        write(root, "target/debug/bin", "x");
        write(root, ".git/HEAD", "ref");
        fs::create_dir_all(root.join("empty")).unwrap();
        symlink("src/main.rs", root.join("link")).unwrap();
        let filter = Arc::new(Filter::new(root, &[]).unwrap());
        (dir, filter)
    }

    /// A watch set by `before_read` must see every change the scan misses: the hook runs before
    /// the folder is listed, once per folder the tree holds, never for an ignored one.
    #[test]
    fn before_read_sees_each_folder_before_it_is_listed() {
        let (dir, filter) = setup();
        let root = dir.path().to_path_buf();
        let seen = Mutex::new(Vec::new());
        let out = walk_with(&filter, &Tree::new(), &|folder: &str| {
            seen.lock().unwrap().push(folder.to_owned());
            // Written before the listing: the scan must hold it.
            fs::write(root.join(folder).join("hooked.txt"), folder).unwrap();
        })
        .into_outcome();
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        assert_eq!(seen, ["", "empty", "src"]);
        for file in ["hooked.txt", "empty/hooked.txt", "src/hooked.txt"] {
            assert!(out.tree.contains_key(file), "{file} written by before_read is missing");
        }
    }

    /// The walker threads' finds merge into one tree in byte order, whichever thread read which
    /// folder: `a` < `a-b` < `a.txt` < `a/…`, each path once, every row its own entry.
    #[test]
    fn the_walkers_finds_merge_into_one_sorted_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut expected = std::collections::BTreeMap::new();
        for d in ["a", "a-b", "a/b", "a/b/c", "b", "z"] {
            fs::create_dir_all(root.join(d)).unwrap();
            expected.insert(d.to_string(), Entry::Dir);
        }
        for (i, f) in ["a.txt", "a/b.txt", "a/b/c/x", "a-b/y", "b/0", "z/z", "top"].iter().enumerate() {
            let body = format!("file {i}");
            write(root, f, &body);
            expected.insert(f.to_string(), Entry::File { hash: Digest::of(body.as_bytes()), size: 6, exec: false });
        }
        for i in 0..300 {
            let f = format!("b/{i:03}");
            write(root, &f, "many");
            expected.insert(f, Entry::File { hash: Digest::of(b"many"), size: 4, exec: false });
        }
        let filter = Arc::new(Filter::new(root, &[]).unwrap());
        let out = walk_below(&filter, "", &Tree::new(), 3, &|_| {}).into_outcome();
        let got: Vec<(&str, &Entry)> = out.tree.iter().map(|(p, s)| (p, &s.entry)).collect();
        let want: Vec<(&str, &Entry)> = expected.iter().map(|(p, e)| (p.as_str(), e)).collect();
        assert_eq!(got, want);
        assert_eq!(out.stats.entries, expected.len() as u64);
    }

    /// A walk looks each folder's files up in name order, from where the last was found: through
    /// the saved cache (whose records of a folder interleave those of its subfolders) and through
    /// the previous tree, every known file is found and only a new one is hashed.
    #[test]
    fn a_folder_s_files_are_found_in_the_stat_source_one_after_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        for f in ["a+", "a-b/y", "a.txt", "a/b.txt", "a/b/c/x", "a0", "b/0", "top"] {
            write(&root, f, f);
        }
        for i in (0..300).step_by(2) {
            write(&root, &format!("b/{i:03}"), "many");
        }
        let filter = Arc::new(Filter::new(&root, &[]).unwrap());
        settle();
        let first = scan(&filter, &Tree::new());
        assert_eq!(first.stats.hashed_files, 158);
        let cache_path = dir.path().join("cache.bin");
        save_stat_cache(&cache_path, &first.tree);
        // Nothing changed: nothing hashed, from any stat source.
        let sources: [&dyn StatSource; 3] = [&first.tree, &load_stat_cache(&cache_path), &map_stat_cache(&cache_path)];
        for (k, source) in sources.into_iter().enumerate() {
            let again = scan(&filter, source);
            assert_eq!(again.stats.hashed_files, 0, "stat source {k}");
            assert_eq!(again.tree, first.tree, "stat source {k}");
        }
        // New files between known ones, before the first and after the last: those alone hashed.
        for f in ["b/151", "b/!", "b/zz", "a/b/c/w", "a,"] {
            write(&root, f, "new");
        }
        settle();
        let sources: [&dyn StatSource; 3] = [&first.tree, &load_stat_cache(&cache_path), &map_stat_cache(&cache_path)];
        for (k, source) in sources.into_iter().enumerate() {
            let again = scan(&filter, source);
            assert_eq!(again.stats.hashed_files, 5, "stat source {k}");
            assert_eq!(again.tree.len(), first.tree.len() + 5, "stat source {k}");
        }
    }

    /// Random trees of names that sort around `/` (`a-`, `a.`, `a0` beside the folder `a`, whose
    /// own entries come after them), walked by two threads: the tree holds every path once, in
    /// the order a sort of every path gives (and `into_outcome` checks each append in debug
    /// builds).
    #[test]
    fn trees_of_names_that_sort_around_the_slash_come_out_in_path_order() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        const NAMES: [&str; 7] = ["a", "a-", "a.", "a0", "a-b", "b", "a.b"];
        fn read(root: &Path, rel: &str, into: &mut Vec<String>) {
            for entry in fs::read_dir(root.join(rel)).unwrap() {
                let entry = entry.unwrap();
                let name = entry.file_name().into_string().unwrap();
                let path = if rel.is_empty() { name } else { format!("{rel}/{name}") };
                if entry.file_type().unwrap().is_dir() {
                    read(root, &path, into);
                }
                into.push(path);
            }
        }
        for round in 0..25 {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path();
            for _ in 0..60 {
                let depth = 1 + next(4);
                let path: Vec<&str> = (0..depth).map(|_| NAMES[next(NAMES.len())]).collect();
                let full = root.join(path.join("/"));
                // A file where a folder is to go, or the path taken already: another one.
                if fs::create_dir_all(full.parent().unwrap()).is_err() || full.exists() {
                    continue;
                }
                if next(3) == 0 {
                    fs::create_dir(&full).unwrap();
                } else {
                    fs::write(&full, path.join("/")).unwrap();
                }
            }
            let mut want = Vec::new();
            read(root, "", &mut want);
            want.sort();
            let filter = Arc::new(Filter::new(root, &[]).unwrap());
            let out = walk_below(&filter, "", &Tree::new(), 2, &|_| {}).into_outcome();
            let got: Vec<&str> = out.tree.keys().collect();
            assert_eq!(got, want, "round {round}");
        }
    }

    /// A folder whose listing fills the walker's buffer several times over is read whole, each
    /// entry once.
    #[test]
    fn a_folder_larger_than_one_listing_buffer_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let padding = "n".repeat(40);
        let names: Vec<String> = (0..3000).map(|i| format!("big/{padding}{i:05}")).collect();
        fs::create_dir(root.join("big")).unwrap();
        for name in &names {
            write(root, name, "x");
        }
        let listed: usize = names.iter().map(|n| (n.len() - 4 + 20).div_ceil(8) * 8).sum();
        assert!(listed > 2 * LISTING_BYTES, "the folder must take several getdents calls ({listed} bytes)");
        let filter = Arc::new(Filter::new(root, &[]).unwrap());
        let out = walk_below(&filter, "", &Tree::new(), 2, &|_| {}).into_outcome();
        let got: Vec<&str> = out.tree.iter().map(|(p, _)| p).filter(|p| p.starts_with("big/")).collect();
        assert_eq!(got, names.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.problems.is_empty(), "{:?}", out.problems);
    }

    #[test]
    fn scan_reads_what_the_build_context_holds() {
        let (_dir, filter) = setup();
        let out = scan(&filter, &Tree::new());
        let paths: Vec<_> = out.tree.keys().collect();
        assert_eq!(paths, [".env", ".gitignore", "empty", "link", "src", "src/main.rs"]);
        assert_eq!(out.tree["link"].entry, Entry::Symlink { target: "src/main.rs".into() });
        assert_eq!(
            out.tree["src/main.rs"].entry,
            Entry::File { hash: Digest::of(b"fn main() {}"), size: 12, exec: false }
        );
        assert_eq!(out.stats.hashed_files, 3);
        assert!(out.problems.is_empty());
    }

    /// Files older than the racy window, so that their stats are cached.
    fn settle() {
        std::thread::sleep(RACY_WINDOW + Duration::from_millis(50));
    }

    #[test]
    fn stat_cache_skips_unchanged_files_and_rehashes_changed_ones() {
        let (dir, filter) = setup();
        settle();
        let first = scan(&filter, &Tree::new());
        let again = scan(&filter, &first.tree);
        assert_eq!(again.stats.hashed_files, 0);
        assert_eq!(again.tree, first.tree);
        write(dir.path(), "src/main.rs", "fn main() { changed() }");
        let third = scan(&filter, &again.tree);
        assert_eq!(third.stats.hashed_files, 1);
    }

    /// Sets a file's mtime, as `touch -d` does.
    fn set_mtime(path: &Path, secs: u64) {
        let file = fs::OpenOptions::new().write(true).open(path).unwrap();
        file.set_modified(UNIX_EPOCH + Duration::from_secs(secs)).unwrap();
    }

    #[test]
    fn same_size_rewrite_with_the_old_mtime_is_seen_also_through_the_saved_cache() {
        let (dir, filter) = setup();
        let file = dir.path().join("src/main.rs");
        set_mtime(&file, 1_700_000_000);
        settle();
        let first = scan(&filter, &Tree::new());
        assert!(first.tree["src/main.rs"].stat.is_some(), "a settled file's stat is cached");
        let cache = dir.path().join("cache.bin");
        save_stat_cache(&cache, &first.tree);
        // Same size, same inode, same mtime (`cp -p`, `touch -r`, an editor that restores it):
        // only the ctime tells.
        fs::write(&file, "fn main(){x}").unwrap();
        set_mtime(&file, 1_700_000_000);
        assert_eq!(Stat::of(&fs::metadata(&file).unwrap()).size, 12);
        let again = scan(&filter, &first.tree);
        assert_eq!(again.tree["src/main.rs"].entry.digest(), Some(Digest::of(b"fn main(){x}")));
        let across_runs = scan(&filter, &load_stat_cache(&cache));
        assert_eq!(across_runs.tree["src/main.rs"].entry.digest(), Some(Digest::of(b"fn main(){x}")));
    }

    #[test]
    fn the_saved_stat_cache_is_looked_up_in_place_and_a_damaged_one_is_empty() {
        let (dir, filter) = setup();
        settle();
        let tree = scan(&filter, &Tree::new()).tree;
        let path = dir.path().join("cache.bin");
        save_stat_cache(&path, &tree);
        // Read whole (the agent's) or mapped (the CLI's): the same cache.
        for cache in [load_stat_cache(&path), map_stat_cache(&path)] {
            // Files with a trusted stat only: not folders, not symlinks.
            assert_eq!(cache.paths().collect::<Vec<_>>(), [".env", ".gitignore", "src/main.rs"]);
            assert_eq!(cache.files(), 3);
            for path in [".env", ".gitignore", "src/main.rs"] {
                assert_eq!(cache.known(path), tree.known(path), "{path}");
            }
            assert_eq!(cache.known("src"), None);
            assert_eq!(cache.known("src/main.r"), None);
            assert_eq!(cache.known("zzz"), None);
            assert_eq!(folders_of(&cache).keys().collect::<Vec<_>>(), ["src"]);
        }
        // Every truncation of it, and garbage after the tag, read as an empty cache or as one
        // whose lookups fail: never a panic. (Each cut is a new file, as a save renames one in.)
        let bytes = fs::read(&path).unwrap();
        for cut in 0..bytes.len() {
            let cut_path = dir.path().join(format!("cut-{cut}.bin"));
            fs::write(&cut_path, &bytes[..cut]).unwrap();
            for cache in [load_stat_cache(&cut_path), map_stat_cache(&cut_path)] {
                let _ = cache.known("src/main.rs");
                let _ = cache.paths().count();
            }
        }
        let mut garbage = CACHE_FORMAT.to_vec();
        garbage.extend_from_slice(&u64::MAX.to_le_bytes());
        fs::write(&path, &garbage).unwrap();
        assert_eq!(load_stat_cache(&path).files(), 0);
        assert_eq!(map_stat_cache(&path).files(), 0);
    }

    #[test]
    fn a_stat_read_within_a_tick_of_the_change_is_not_trusted() {
        let now = SystemTime::now();
        let ns = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64;
        let key = |changed: SystemTime| Stat { size: 1, mtime_ns: ns(changed), ctime_ns: ns(changed), ino: 1 };
        assert_eq!(key(now).settled(now), None);
        assert_eq!(key(now - Duration::from_millis(20)).settled(now), None);
        let old = key(now - Duration::from_secs(1));
        assert_eq!(old.settled(now), Some(old.key()));
        // Whole-second timestamps: a tick is a second or two.
        let coarse = Stat { size: 1, mtime_ns: 1_000_000_000_000, ctime_ns: 1_000_000_000_000, ino: 1 };
        assert_eq!(coarse.settled(UNIX_EPOCH + Duration::from_millis(1_001_000)), None);
        assert_eq!(coarse.settled(UNIX_EPOCH + Duration::from_secs(1_003)), Some(coarse.key()));
        // A file rewritten right after its hash: the fresh scan keeps no stat, the next one hashes it again.
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), "aaaa").unwrap();
        let filter = Arc::new(Filter::new(dir.path(), &[]).unwrap());
        let first = scan(&filter, &Tree::new());
        assert_eq!(first.tree["f"].stat, None);
        fs::write(dir.path().join("f"), "bbbb").unwrap();
        let second = scan(&filter, &first.tree);
        assert_eq!(second.stats.hashed_files, 1);
        assert_eq!(second.tree["f"].entry.digest(), Some(Digest::of(b"bbbb")));
    }

    #[test]
    fn rescan_follows_hints() {
        let (dir, filter) = setup();
        let root = dir.path();
        let mut tree = scan(&filter, &Tree::new()).tree;
        write(root, "src/new/deep.rs", "x");
        fs::remove_file(root.join(".env")).unwrap();
        write(root, "target/ignored", "y");
        let out = rescan(&filter, &mut tree, &["src/new".into(), ".env".into(), "target/ignored".into()]);
        assert!(out.problems.is_empty());
        assert_eq!(out.stats.hashed_files, 1);
        assert_eq!(out.changed, [".env", "src/new", "src/new/deep.rs"]);
        assert_eq!(tree, scan(&filter, &Tree::new()).tree);
        // A folder replaced by a file.
        fs::remove_dir_all(root.join("src")).unwrap();
        write(root, "src", "now a file");
        let out = rescan(&filter, &mut tree, &["src".into()]);
        assert_eq!(out.changed, ["src", "src/main.rs", "src/new", "src/new/deep.rs"]);
        assert_eq!(tree, scan(&filter, &Tree::new()).tree);
    }

    #[cfg(unix)]
    #[test]
    fn unreadable_file_is_a_problem_not_a_failure() {
        let (dir, filter) = setup();
        if unsafe { libc_geteuid() } == 0 {
            // root reads everything; a fifo stands in for the unreadable file.
            let fifo = dir.path().join("pipe");
            let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            assert_eq!(unsafe { mkfifo(c.as_ptr(), 0o644) }, 0);
        } else {
            write(dir.path(), "secret", "s");
            fs::set_permissions(dir.path().join("secret"), std::os::unix::fs::PermissionsExt::from_mode(0o000))
                .unwrap();
        }
        let out = scan(&filter, &Tree::new());
        assert_eq!(out.problems.len(), 1, "{:?}", out.problems);
        assert!(out.tree.contains_key("src/main.rs"));
    }

    extern "C" {
        #[link_name = "geteuid"]
        fn libc_geteuid() -> u32;
        fn mkfifo(path: *const std::ffi::c_char, mode: u32) -> i32;
    }
}
