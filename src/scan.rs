//! The scan stage: the local tree, read off the async runtime in one blocking task per scan.
//! The tree moves into the task and back, so a rescan never copies it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use devloop_agent::filter::Filter;
use devloop_agent::protocol::Problem;
use devloop_agent::walk::{self, RescanOutcome, ScanStats, Tree};
use tracing::{info_span, Instrument};

/// The result of a full scan.
pub struct Full {
    pub tree: Tree,
    pub problems: Vec<Problem>,
    pub stats: ScanStats,
    pub took: Duration,
}

/// Reads the whole tree; `previous` serves as the stat cache.
pub async fn full(filter: Arc<Filter>, previous: Tree) -> Full {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let outcome = walk::scan(&filter, &previous);
        drop(previous);
        Full { tree: outcome.tree, problems: outcome.problems, stats: outcome.stats, took: started.elapsed() }
    })
    .instrument(info_span!("scan", kind = "full"))
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
