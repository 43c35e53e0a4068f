//! The session: the one place that holds mutable sync state.
//!
//! ```text
//! connect ─► handshake ─► agent manifest = baseline ─► diff(baseline, local) ─► batch ─► Applied
//!    ▲                                                                                  │
//!    └── reconnect with backoff ◄── stream broke        watch hints ─► rescan ─► classify ─► diff ─► batch
//! ```
//!
//! Architecture invariant: the baseline (what the target holds) advances only from an `Applied`
//! acknowledgement, by what the batch carried minus what the agent refused.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devloop_agent::filter::Filter;
use devloop_agent::manifest::{Entry, Manifest, Record};
use devloop_agent::protocol::{self, Chmod, RestartReport, ToAgent};
use devloop_agent::relpath;
use devloop_agent::walk::{self, Tree};
use tokio::sync::watch;
use tracing::{info_span, Instrument};

use super::baseline::{self, Baseline, Refused, Sent};
use super::classify::{classify, classify_resync, Plan, Rules};
use super::client::{self, AgentClient, Greeting};
use super::diff::{diff, diff_paths, Change};
use super::pack;
use super::scan;
use super::transport::Transport;
use super::watch::{Hints, Watcher, Window};
use super::SessionError;
use crate::report::{Event, Reporter};

#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub root: PathBuf,
    pub excludes: Vec<String>,
    /// Sync the folder as docker's build context for this Dockerfile (the builder's copy).
    pub docker_context: Option<String>,
    pub rules: Rules,
    pub window: Window,
    /// Longest wait for the agent's handshake and manifest.
    pub connect_timeout: Duration,
}

/// How a session ended without error.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `--once`: the target equals the source.
    Synced,
    /// Shut down on request.
    Stopped,
    /// A rebuild trigger changed; this loop cannot go on with a stale image.
    RebuildNeeded { path: String, pattern: String },
}

/// Most entries (deletions, exec-bit changes, files) one batch carries: every message stays far
/// below the frame limit (a deletion list of 300,000 paths would not fit in one), and so does the
/// agent's answer, which names each refused entry by its place; the agent holds to it too.
const BATCH_ENTRIES: usize = protocol::MAX_BATCH_ENTRIES;

/// Longest wait for the agent to read its tree, once it has said welcome.
const SCAN_TIMEOUT: Duration = Duration::from_secs(30 * 60);

pub struct Session {
    config: SessionConfig,
    transport: Box<dyn Transport>,
    reporter: Reporter,
    filter: Arc<Filter>,
    /// The local tree as last scanned.
    local: Tree,
    /// What the target holds, as acknowledged.
    baseline: Baseline,
    /// Paths to diff again next round (vanished or unreadable while packing).
    pending: BTreeSet<String>,
    /// Paths the agent refused, with the local entry it refused: not resent until it changes.
    refused: Refused,
    live: Option<AgentClient>,
    round: u64,
    /// How the last restart went (for `--once`).
    last_restart: Option<RestartReport>,
    /// A synced change calls for a restart that has not been asked for yet (held back while
    /// more of a burst is arriving).
    restart_owed: bool,
    /// Names this CLI process to the agent across reconnects (see `ToAgent::Hello`).
    id: String,
    /// The largest file the connected agent takes (0: no limit said).
    max_file_size: u64,
    /// Paths the last full scan could not read (unreadable, not a file, folder or symlink):
    /// the target cannot equal the source there.
    unreadable: BTreeSet<String>,
    /// The local tree's stats or digests changed since the stat cache was loaded: save it at
    /// the end.
    cache_dirty: bool,
}

impl Session {
    pub fn new(
        config: SessionConfig,
        transport: Box<dyn Transport>,
        reporter: Reporter,
    ) -> Result<Session, SessionError> {
        let filter = Arc::new(Filter::with(&config.root, &config.excludes, config.docker_context.as_deref())?);
        Ok(Session {
            config,
            transport,
            reporter,
            filter,
            local: Tree::new(),
            baseline: Baseline::default(),
            pending: BTreeSet::new(),
            refused: Refused::new(),
            live: None,
            round: 0,
            last_restart: None,
            restart_owed: false,
            id: session_id(),
            max_file_size: 0,
            unreadable: BTreeSet::new(),
            cache_dirty: false,
        })
    }

    /// Scans, connects and brings the target up to date; then (unless `once`) follows the local
    /// tree until `shutdown` turns true.
    pub async fn run(mut self, once: bool, mut shutdown: watch::Receiver<bool>) -> Result<Outcome, SessionError> {
        // The first scan and the connection (the agent reads its own tree meanwhile) overlap.
        // Unless `once`, the folders the stat cache knows are watched before the scan reads
        // them: what changes during the scan raises an event, and no second scan is needed.
        let filter = Arc::clone(&self.filter);
        let cache = scan::cache_path(&self.config.root);
        let (root, reporter) = (self.config.root.clone(), self.reporter.clone());
        let scanning = async move {
            let cached = scan::load_cache(cache).await;
            let watcher = match once {
                true => None,
                false => Some(Watcher::start(&root, &Tree::new(), reporter)),
            };
            // Each folder is watched by the walk, right before it is read.
            let ahead = watcher.as_ref().and_then(|w| w.as_ref().ok()).and_then(Watcher::ahead);
            let before_read: scan::BeforeRead = match ahead.clone() {
                Some(ahead) => Box::new(move |folder| ahead.watch(folder)),
                None => Box::new(|_| {}),
            };
            (scan::first(filter, cached, before_read).await, watcher.map(|w| (w, ahead)))
        };
        let ((full, watcher), connected) = tokio::select! {
            both = async { tokio::join!(scanning, self.connect_timed()) } => both,
            _ = shutdown.wait_for(|stop| *stop) => return Ok(Outcome::Stopped),
        };
        self.adopt(full);
        // The walker threads' buffers go back to the OS before a sync allocates its own.
        devloop_agent::release_memory();
        let connected = connected?;
        let mut watcher = match watcher {
            None => None,
            Some((watcher, ahead)) => {
                let mut watcher = watcher?;
                if let Some(ahead) = ahead {
                    watcher.settle_ahead(ahead)?;
                }
                // Folders read without a watch (the limit reached, a folder replaced while it
                // was read) are watched now and read again (cheap: stat-cached).
                let added = watcher.reset(&self.local)?;
                self.follow_new_folders(&mut watcher, relpath::outermost(added)).await?;
                Some(watcher)
            }
        };
        let resynced = tokio::select! {
            result = self.resync(connected) => result,
            _ = shutdown.wait_for(|stop| *stop) => return Ok(Outcome::Stopped),
        };
        match resynced {
            Ok(()) => self.restart_if_owed().await?,
            // The stream broke during the first sync (the pod went away right after the connect,
            // as in a rollout): reconnect and resync, as later in the session.
            Err(err) => {
                if let Some(outcome) = self.recover(err, &mut shutdown).await? {
                    return Ok(outcome);
                }
            }
        }
        let Some(watcher) = watcher.as_mut() else {
            let verdict = match self.unequal() {
                Some(differ) => Err(differ),
                None => self.ready_verdict().await,
            };
            self.close().await;
            return verdict.map(|()| Outcome::Synced);
        };
        self.reporter
            .emit(Event::Watching { root: self.config.root.display().to_string(), mode: watcher.mode().into() });
        // The first scan's and the sync's transient buffers (and the baseline's delta, gone now)
        // go back to the OS, once the watch is on.
        devloop_agent::release_memory();
        let outcome = self.follow(watcher, &mut shutdown).await;
        self.close().await;
        outcome
    }

    async fn follow(
        &mut self,
        watcher: &mut Watcher,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Outcome, SessionError> {
        let mut heartbeat = tokio::time::interval(client::HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let live = self.live.as_mut().expect("connected");
            let step = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return Ok(Outcome::Stopped),
                // An idle stream is checked every few seconds: a link gone silent ends the
                // session (and the reconnect loop says so) within seconds.
                _ = heartbeat.tick() => live.heartbeat().await.map(|()| None),
                hints = watcher.next(self.config.window) => match hints {
                    Some(hints) => self.round(watcher, hints).await,
                    None => return Ok(Outcome::Stopped),
                },
                // Between batches the agent speaks only for the app (shown by the client); anything
                // else is logged, a broken stream is an error.
                message = live.next() => message.map(|other| {
                    tracing::debug!(?other, "unexpected message between batches");
                    None
                }),
            };
            let step = match step {
                // Ask for the restart once the burst is over: no hint waiting to be read.
                Ok(None) if !watcher.pending() => self.restart_if_owed().await.map(|()| None),
                other => other,
            };
            match step {
                Ok(None) => {}
                Ok(Some(outcome)) => return Ok(outcome),
                Err(err) => {
                    if let Some(outcome) = self.recover(err, shutdown).await? {
                        return Ok(outcome);
                    }
                }
            }
        }
    }

    /// After a broken stream: reconnects and resyncs (`None`), or ends with `Stopped` when asked
    /// to meanwhile; an error that is not worth a reconnect is returned as it is.
    async fn recover(
        &mut self,
        err: SessionError,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<Outcome>, SessionError> {
        if !err.is_recoverable() {
            return Err(err);
        }
        self.reporter.emit(Event::Disconnected { reason: err.to_string() });
        tokio::select! {
            result = self.reconnect() => result.map(|()| None),
            _ = shutdown.wait_for(|stop| *stop) => Ok(Some(Outcome::Stopped)),
        }
    }

    /// `--once`: the paths where the target does not equal the source after the sync (refused
    /// by the agent, unreadable here, vanished while sent), as the error that says so.
    fn unequal(&self) -> Option<SessionError> {
        let mut differ: BTreeSet<&str> = self.unreadable.iter().map(String::as_str).collect();
        differ.extend(self.refused.keys().map(String::as_str));
        differ.extend(self.pending.iter().map(String::as_str));
        let count = differ.len();
        let first = differ.into_iter().next()?;
        Some(SessionError::Unequal { count, first: first.to_owned() })
    }

    /// `--once`: the app must be running and ready. Asks the agent when no restart happened.
    async fn ready_verdict(&mut self) -> Result<(), SessionError> {
        let report = match self.last_restart.take() {
            Some(report) => report,
            None => {
                let report = self.live.as_mut().expect("connected").restart(ToAgent::Ready).await?;
                self.report_restart(&report);
                report
            }
        };
        match report {
            RestartReport::Restarted { .. } | RestartReport::Unsupervised => Ok(()),
            RestartReport::BuildFailed { code, .. } => {
                Err(SessionError::App(format!("the build failed (exit code {code})")))
            }
            RestartReport::NotReady { message, .. } => {
                Err(SessionError::App(format!("the app is not ready: {message}")))
            }
            RestartReport::Failed { message } => {
                Err(SessionError::App(format!("the app could not be restarted: {message}")))
            }
        }
    }

    fn report_restart(&self, report: &RestartReport) {
        let event = match report {
            RestartReport::Restarted { pid, stop_ms, start_ms, ready_ms } => {
                Event::Restarted { pid: *pid, stop_ms: *stop_ms, start_ms: *start_ms, ready_ms: *ready_ms }
            }
            RestartReport::BuildFailed { code, output } => Event::BuildFailed { code: *code, output: output.clone() },
            RestartReport::NotReady { pid, message } => Event::NotReady { pid: *pid, message: message.clone() },
            RestartReport::Failed { message } => Event::RestartFailed { message: message.clone() },
            RestartReport::Unsupervised => return,
        };
        self.reporter.emit(event);
    }

    /// One watch round: rescan what the hints point at, classify, sync.
    async fn round(&mut self, watcher: &mut Watcher, hints: Hints) -> Result<Option<Outcome>, SessionError> {
        // Rebuild triggers that never sync (the values files) are seen by their events alone.
        let silent_trigger = hints.paths.iter().find_map(|p| {
            let pattern = self.config.rules.rebuild.first_match(p)?;
            self.filter.is_excluded(p, false).then(|| (p.clone(), pattern.to_string()))
        });
        if let Some((path, pattern)) = silent_trigger {
            self.reporter.emit(Event::RebuildNeeded { path: path.clone(), pattern: pattern.clone() });
            return Ok(Some(Outcome::RebuildNeeded { path, pattern }));
        }
        let rules_changed = hints.paths.iter().any(|p| Filter::is_rule_file(p));
        let changed: Vec<String> = if hints.rescan || rules_changed {
            if rules_changed {
                self.filter.reload();
            }
            let before = self.scan_all().await;
            if rules_changed {
                // Newly ignored paths are left alone in the target, not deleted.
                self.baseline.forget_excluded(&self.filter);
            }
            let added = watcher.reset(&self.local)?;
            self.follow_new_folders(watcher, relpath::outermost(added)).await?;
            diff(&before, &self.local)
                .iter()
                .map(|c| c.path().to_owned())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        } else {
            let hinted: Vec<String> = hints.paths.into_iter().collect();
            let mut changed = self.rescan(hinted.clone()).await;
            let fresh = watcher.update(&self.local, &changed, &hinted)?;
            changed.extend(self.follow_new_folders(watcher, fresh).await?);
            changed.sort_unstable();
            changed.dedup();
            changed
        };
        let plan = classify(changed.iter().map(|p| (p.as_str(), self.was_or_is_dir(p))), &self.config.rules);
        let restart = match plan {
            Plan::Rebuild { path, pattern } => {
                self.reporter.emit(Event::RebuildNeeded { path: path.clone(), pattern: pattern.clone() });
                return Ok(Some(Outcome::RebuildNeeded { path, pattern }));
            }
            Plan::Nothing if self.pending.is_empty() => return Ok(None),
            Plan::Nothing => false,
            Plan::Sync { restart } => restart,
        };
        let mut paths: BTreeSet<String> = std::mem::take(&mut self.pending);
        paths.extend(changed);
        let changes = diff_paths(&self.baseline.view(&self.local), &self.local, paths.iter().map(String::as_str));
        self.restart_owed |= restart;
        self.sync(changes).await?;
        Ok(None)
    }

    /// New (or replaced) folders were walked before their watch existed: walks them again until
    /// no new folder appears (a `git checkout` creates folders and files in a burst). Returns
    /// what changed.
    async fn follow_new_folders(
        &mut self,
        watcher: &mut Watcher,
        mut fresh: Vec<String>,
    ) -> Result<Vec<String>, SessionError> {
        let mut changed = Vec::new();
        while !fresh.is_empty() {
            let again = self.rescan(fresh.clone()).await;
            fresh = watcher.update(&self.local, &again, &fresh)?;
            changed.extend(again);
        }
        Ok(changed)
    }

    /// Re-reads `paths` of the local tree; returns what changed.
    async fn rescan(&mut self, paths: Vec<String>) -> Vec<String> {
        // What the tree holds where the rescan may change it (each path, its folders and what
        // is under it): the baseline keeps it where it changes.
        let before = touched(&self.local, &paths);
        let tree = std::mem::take(&mut self.local);
        let (tree, outcome) = scan::targeted(Arc::clone(&self.filter), tree, paths).await;
        self.local = tree;
        for path in &outcome.changed {
            self.baseline.pin(path, before.get(path));
        }
        self.cache_dirty |= !outcome.changed.is_empty() || outcome.stats.hashed_files > 0;
        self.report_problems(&outcome.problems);
        outcome.changed
    }

    /// Asks the agent for the restart that synced changes called for.
    async fn restart_if_owed(&mut self) -> Result<(), SessionError> {
        if !self.restart_owed {
            return Ok(());
        }
        let report = self.live.as_mut().expect("connected").restart(ToAgent::Restart).await?;
        self.restart_owed = false;
        self.report_restart(&report);
        self.last_restart = Some(report);
        Ok(())
    }

    fn was_or_is_dir(&self, path: &str) -> bool {
        self.local
            .get(path)
            .map(|s| s.entry.is_dir())
            .or_else(|| self.baseline.entry(&self.local, path).map(Entry::is_dir))
            .unwrap_or(false)
    }

    /// Scans the whole tree (the current one serving as stat cache); gives back the tree it
    /// replaced. The baseline keeps what the target holds where the tree changed.
    async fn scan_all(&mut self) -> Tree {
        let previous = std::mem::take(&mut self.local);
        let full = scan::full(Arc::clone(&self.filter), previous).await;
        let before = self.adopt(full);
        for change in diff(&before, &self.local) {
            self.baseline.pin(change.path(), before.get(change.path()).map(|s| &s.entry));
        }
        before
    }

    /// Makes a full scan the local tree; gives back the tree it replaced.
    fn adopt(&mut self, full: scan::Full) -> Tree {
        self.reporter.emit(Event::Scanned {
            entries: full.stats.entries,
            hashed_files: full.stats.hashed_files,
            millis: full.took.as_millis() as u64,
        });
        self.report_problems(&full.problems);
        self.unreadable = full.problems.iter().map(|p| p.path.clone()).collect();
        self.cache_dirty |= full.cache_changed;
        self.local = full.tree;
        full.previous
    }

    fn report_problems(&self, problems: &[protocol::Problem]) {
        for p in problems {
            self.reporter.emit(Event::Problem { path: p.path.clone(), message: p.message.clone() });
        }
    }

    async fn reconnect(&mut self) -> Result<(), SessionError> {
        self.live = None;
        let mut delay = Duration::from_millis(100);
        for attempt in 1u32.. {
            self.reporter.emit(Event::Reconnecting { attempt, delay_ms: delay.as_millis() as u64 });
            tokio::time::sleep(delay).await;
            match self.connect_and_resync().await {
                Ok(()) => return self.restart_if_owed().await,
                Err(SessionError::Transport(e)) if e.is_permanent() => return Err(SessionError::Transport(e)),
                Err(err) if err.is_recoverable() || matches!(err, SessionError::Transport(_)) => {
                    self.reporter.emit(Event::Disconnected { reason: err.to_string() });
                    // At most 2 s apart: work resumes within seconds of the cluster answering again.
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(err) => return Err(err),
            }
        }
        unreachable!("the reconnect loop only ends by returning")
    }

    /// Connects, takes the agent's manifest as the baseline, and sends what differs.
    async fn connect_and_resync(&mut self) -> Result<(), SessionError> {
        self.live = None;
        let connected = self.connect_timed().await?;
        self.resync(connected).await
    }

    /// Connects; the agent must welcome the client within the connect timeout, and then read its
    /// tree within [`SCAN_TIMEOUT`] (a million files on a cold disk take minutes).
    async fn connect_timed(&self) -> Result<(AgentClient, Greeting), SessionError> {
        let limits = (self.config.connect_timeout, SCAN_TIMEOUT);
        let rules = (self.config.excludes.as_slice(), self.config.docker_context.as_deref());
        AgentClient::connect(self.transport.as_ref(), &self.id, rules, &self.reporter, limits).await
    }

    /// Takes the agent's manifest as the baseline and sends what differs from the local tree.
    /// Equal digests stand for equal trees: then the records do not travel.
    async fn resync(&mut self, (mut client, greeting): (AgentClient, Greeting)) -> Result<(), SessionError> {
        self.max_file_size = greeting.max_file_size;
        // A local target's agent starts its app at the first restart: asked for even when the
        // target is up to date already (devloop started again on a synced folder).
        self.restart_owed |= greeting.app_waiting;
        let same = greeting.digest == walk::digest(&self.local);
        let timeout = self.config.connect_timeout;
        // Unequal digests: the records, taken one by one as they arrive (only where the target
        // differs from the local tree is kept).
        let mut held = baseline::Builder::new(&self.local);
        let filter = Arc::clone(&self.filter);
        let each = |record: Record| {
            if !filter.is_excluded(&record.path, record.entry.is_dir()) {
                held.held(record.path, record.entry);
            }
        };
        tokio::time::timeout(timeout, client.manifest(!same, each))
            .await
            .map_err(|_| SessionError::Timeout(timeout))??;
        self.live = Some(client);
        // Equal digests: the target holds the local tree.
        self.baseline = if same { Baseline::default() } else { held.finish() };
        self.reporter.emit(Event::Connected {
            target: self.transport.describe(),
            agent: greeting.agent,
            entries: greeting.entries,
            from_memory: greeting.from_memory,
        });
        self.pending.clear();
        self.refused.clear();
        // Equal digests: the baseline is the local tree's manifest, nothing differs.
        let changes = self.baseline.diff(&self.local);
        let kinds = changes.iter().map(|c| (c.path(), self.was_or_is_dir(c.path())));
        let restart = match classify_resync(kinds, &self.config.rules) {
            Plan::Sync { restart } => restart,
            _ => false,
        };
        if changes.is_empty() {
            self.round += 1;
            self.reporter.emit(Event::UpToDate { round: self.round });
            return Ok(());
        }
        self.restart_owed |= restart;
        let synced = self.sync(changes).await;
        // An empty target's baseline followed the local tree up to the last path sent; past the
        // last one it follows the whole tree.
        self.baseline.rebase(&self.local);
        synced
    }

    /// Sends `changes` in batches of at most [`BATCH_ENTRIES`] entries and folds what each
    /// acknowledgement confirms into the baseline.
    async fn sync(&mut self, changes: Vec<Change>) -> Result<(), SessionError> {
        let mut deletes = Vec::new();
        let mut chmods = Vec::new();
        let mut upserts = Vec::new();
        let mut bytes = 0u64;
        for change in changes {
            match change {
                Change::Delete { path } => deletes.push(path),
                Change::Chmod { path, exec } => chmods.push(Chmod { path, exec }),
                Change::Upsert { path, entry } if self.max_file_size > 0 && entry.size() > self.max_file_size => {
                    // Refused before a byte of it travels: the agent would refuse it at the end.
                    if self.refused.get(&path) != Some(&entry) {
                        let message = format!(
                            "{} bytes, larger than the {} the agent takes (devloop-agent --max-file-size); not sent",
                            entry.size(),
                            self.max_file_size
                        );
                        self.reporter.emit(Event::Problem { path: path.clone(), message });
                        self.refused.insert(path, entry);
                    }
                }
                // Only the path is kept: each batch takes the entry and stat from the local
                // tree (which holds still during a sync), so that a big sync does not hold a
                // second copy of them for its whole length.
                Change::Upsert { path, entry } => {
                    if self.refused.get(&path) != Some(&entry) {
                        bytes += entry.size();
                        upserts.push(path);
                    }
                }
            }
        }
        if deletes.is_empty() && chmods.is_empty() && upserts.is_empty() {
            return Ok(());
        }
        self.reporter.emit(Event::SyncStarted {
            round: self.round + 1,
            files: upserts.len() as u64,
            deletes: deletes.len() as u64,
            bytes,
        });
        let progress = self.reporter.progress(upserts.len() as u64, bytes);
        // A sync that lasts over a second shows its progress every second.
        let ticker = {
            let (reporter, progress) = (self.reporter.clone(), progress.clone());
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                every.tick().await;
                loop {
                    every.tick().await;
                    reporter.show_progress(&progress);
                }
            })
        };
        // Deepest first, so that a folder's deletion comes in the batch after its content's.
        deletes.sort_unstable_by(|a, b| b.cmp(a));
        let mut result = Ok(());
        let (mut deletes, mut chmods, mut upserts) = (deletes.into_iter(), chmods.into_iter(), upserts.into_iter());
        loop {
            let d: Vec<String> = deletes.by_ref().take(BATCH_ENTRIES).collect();
            let c: Vec<Chmod> = chmods.by_ref().take(BATCH_ENTRIES - d.len()).collect();
            let local = &self.local;
            let u: Vec<pack::Upsert> = upserts
                .by_ref()
                .filter_map(|path| {
                    let scanned = local.get(&path)?;
                    Some((path, scanned.entry.clone(), scanned.stat))
                })
                .take(BATCH_ENTRIES - d.len() - c.len())
                .collect();
            if d.is_empty() && c.is_empty() && u.is_empty() {
                break;
            }
            result = self.sync_batch(d, c, u, progress.clone()).await;
            if result.is_err() {
                break;
            }
        }
        ticker.abort();
        self.reporter.finish_progress();
        result
    }

    /// Sends one batch and folds the acknowledged part into the baseline.
    async fn sync_batch(
        &mut self,
        deletes: Vec<String>,
        chmods: Vec<Chmod>,
        upserts: Vec<pack::Upsert>,
        progress: crate::report::Progress,
    ) -> Result<(), SessionError> {
        self.round += 1;
        let round = self.round;
        let started = Instant::now();
        let client = self.live.as_mut().expect("connected");
        let root = self.config.root.clone();
        let (applied, packed) = client
            .batch(round, deletes.clone(), chmods.clone(), upserts, root, progress)
            .instrument(info_span!("sync", round))
            .await?;
        let sent = Sent { deletes: &deletes, chmods: &chmods, upserts: packed.sent };
        baseline::fold(&mut self.baseline, &self.local, &mut self.refused, sent, &applied);
        for problem in packed.skipped {
            self.pending.insert(problem.path.clone());
            self.reporter.emit(Event::Problem { path: problem.path, message: problem.message });
        }
        for problem in &applied.refused {
            self.reporter.emit(Event::Problem {
                path: problem.path.clone(),
                message: format!("refused by the agent: {}", problem.message),
            });
        }
        let unshown = applied.refused_count().saturating_sub(applied.refused.len() as u64);
        if unshown > 0 {
            self.reporter.emit(Event::Problem {
                path: String::new(),
                message: format!(
                    "the agent refused {unshown} more paths (the first ones of each reason are shown above)"
                ),
            });
        }
        self.reporter.emit(Event::Applied {
            round,
            files: applied.written,
            deleted: applied.deleted,
            bytes: applied.bytes,
            refused: applied.refused_count(),
            millis: (started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
        });
        Ok(())
    }

    /// Says goodbye, lets the transport wind down, and keeps the stat cache for the next run
    /// (when it changed).
    async fn close(&mut self) {
        if self.cache_dirty {
            scan::save_cache(scan::cache_path(&self.config.root), std::mem::take(&mut self.local)).await;
        }
        if let Some(client) = self.live.take() {
            client.close().await;
        }
    }
}

/// The entries of `tree` a rescan of `paths` may change: each path, its folders, and everything
/// under it.
fn touched(tree: &Tree, paths: &[String]) -> Manifest {
    let mut out = Manifest::new();
    for path in paths {
        for dir in relpath::ancestors(path).chain(std::iter::once(path.as_str())) {
            if let Some(s) = tree.get(dir) {
                out.entry(dir.to_owned()).or_insert_with(|| s.entry.clone());
            }
        }
        let prefix = format!("{path}/");
        for (p, s) in tree.prefixed(&prefix) {
            out.entry(p.to_owned()).or_insert_with(|| s.entry.clone());
        }
    }
    out
}

/// An id for this CLI process's session: pid and start time.
fn session_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{:x}", std::process::id(), nanos % (1 << 40))
}
