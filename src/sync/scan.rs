//! The scan stage: the local tree, read off the async runtime in one blocking task per scan.
//! The tree moves into the task and back, so a rescan never copies it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devloop_agent::filter::Filter;
use devloop_agent::protocol::Problem;
use devloop_agent::walk::{self, RescanOutcome, ScanStats, StatCache, StatSource, Tree};
use tracing::{info_span, Instrument};

/// The result of a full scan.
pub struct Full {
    pub tree: Tree,
    /// The tree given as stat cache, back to the caller (to diff against, without a copy).
    pub previous: Tree,
    pub problems: Vec<Problem>,
    pub stats: ScanStats,
    pub took: Duration,
    /// The stat cache to save differs from the one given (see [`walk::cache_changed`]).
    pub cache_changed: bool,
}

/// Reads the whole tree for the first time, `cache` (saved by an earlier run) as stat cache.
/// `before_read` is called with each folder right before the walk reads it (see
/// [`walk::walk_with`]).
pub async fn first(filter: Arc<Filter>, cache: StatCache, before_read: BeforeRead) -> Full {
    // The saved cache is let go before the tree is built: the two are never held at once.
    let (full, _) = scan(filter, cache, before_read, false, "first").await;
    full
}

/// What a scan calls with each folder before reading it.
pub type BeforeRead = Box<dyn Fn(&str) + Send + Sync>;

/// Reads the whole tree; `previous` serves as the stat cache and comes back in `Full::previous`.
pub async fn full(filter: Arc<Filter>, previous: Tree) -> Full {
    let (full, previous) = scan(filter, previous, Box::new(|_| {}), true, "full").await;
    Full { previous: previous.unwrap_or_default(), ..full }
}

/// One full scan in a blocking task; the stat source comes back with the result if `keep`,
/// or is dropped as soon as the walk is done.
async fn scan<S: StatSource + Send + 'static>(
    filter: Arc<Filter>,
    source: S,
    before_read: BeforeRead,
    keep: bool,
    kind: &'static str,
) -> (Full, Option<S>) {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let found = walk::walk_with(&filter, &source, &*before_read);
        let known = source.files();
        let source = keep.then_some(source);
        let outcome = found.into_outcome();
        let took = started.elapsed();
        let cache_changed = walk::cache_changed_from(known, &outcome);
        let (tree, problems, stats) = (outcome.tree, outcome.problems, outcome.stats);
        (Full { tree, previous: Tree::new(), problems, stats, took, cache_changed }, source)
    })
    .instrument(info_span!("scan", kind))
    .await
    .expect("scan task panicked")
}

/// Re-reads the hinted paths of `tree` and gives it back with what changed.
pub async fn targeted(filter: Arc<Filter>, mut tree: Tree, paths: Vec<String>) -> (Tree, RescanOutcome) {
    tokio::task::spawn_blocking(move || {
        let outcome = walk::rescan(&filter, &mut tree, &paths);
        (tree, outcome)
    })
    .instrument(info_span!("scan", kind = "targeted"))
    .await
    .expect("rescan task panicked")
}

/// Where the stat cache of a source folder lives between runs: `$XDG_CACHE_HOME/devloop/trees/`
/// (or `~/.cache/devloop/trees/`), named by a digest of the folder's path. `None` without a home.
pub fn cache_path(root: &Path) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    let digest = blake3::hash(root.as_os_str().as_encoded_bytes()).to_hex();
    Some(base.join("devloop").join("trees").join(format!("{}.cache", &digest[..32])))
}

/// The stat cache saved by an earlier run (empty when there is none).
pub async fn load_cache(path: Option<PathBuf>) -> StatCache {
    match path {
        Some(path) => tokio::task::spawn_blocking(move || walk::map_stat_cache(&path)).await.unwrap_or_default(),
        None => StatCache::default(),
    }
}

/// Saves the tree as the next run's stat cache, off the async runtime.
pub async fn save_cache(path: Option<PathBuf>, tree: Tree) {
    if let Some(path) = path {
        let _ = tokio::task::spawn_blocking(move || walk::save_stat_cache(&path, &tree)).await;
    }
}
