//! What the user sees. With `--json`, one JSON object a line on stdout (pipeable); otherwise
//! styled lines on stderr. Both come from the same [`Event`]s.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use console::style;
use devloop_agent::protocol::Stream;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Deploying {
        release: String,
        namespace: String,
    },
    Tunnel {
        url: String,
        remote_port: u16,
    },
    Service(ServiceRow),
    Uri(UriRow),
    RolledOut {
        release: String,
        millis: u64,
    },
    /// One check of `devloop doctor`: what it found, and what to do when it failed.
    Check {
        check: String,
        ok: bool,
        found: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        fix: Option<String>,
    },
    /// The new pod runs, but its app is not Ready (it crashed, or is slow to start): `up` goes on
    /// and syncs into it, so that the fix reaches it.
    RolledOutNotReady {
        release: String,
        pod: String,
        why: String,
        last_lines: Vec<String>,
        millis: u64,
    },
    Removed {
        release: String,
        namespace: String,
    },
    Prepared {
        stack: String,
        name: String,
    },
    /// The build context is in the builder: what travelled to bring it up to date.
    ContextSynced {
        files: u64,
        bytes: u64,
        millis: u64,
    },
    /// One step of an in-cluster image build, as BuildKit reports it.
    BuildStep {
        step: String,
        status: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        secs: Option<f64>,
    },
    Built {
        image: String,
        millis: u64,
    },
    /// The image for these build inputs is on the node (or in the registry) already.
    BuildSkipped {
        image: String,
        /// In a registry (rather than on the builder's node).
        pushed: bool,
    },
    /// Where `up` puts the dev image, and why: the builder's node, or a registry.
    ImageDestination {
        destination: String,
        why: String,
    },
    Rebuilding {
        path: String,
        reason: String,
    },
    File {
        path: String,
        outcome: String,
    },
    Scanned {
        entries: u64,
        hashed_files: u64,
        millis: u64,
    },
    Connected {
        target: String,
        agent: String,
        entries: u64,
        /// The agent answered from its live index (no walk of its tree for this session).
        from_memory: bool,
    },
    SyncStarted {
        round: u64,
        files: u64,
        deletes: u64,
        bytes: u64,
    },
    /// Every second of a sync that lasts longer: what of it is done (packed and sent), and the rate.
    SyncProgress {
        files_done: u64,
        files: u64,
        bytes_done: u64,
        bytes: u64,
        bytes_per_sec: u64,
    },
    Applied {
        round: u64,
        files: u64,
        deleted: u64,
        bytes: u64,
        refused: u64,
        millis: f64,
    },
    UpToDate {
        round: u64,
    },
    Restarted {
        pid: u32,
        stop_ms: f64,
        start_ms: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        ready_ms: Option<f64>,
    },
    BuildFailed {
        code: i32,
        output: String,
    },
    NotReady {
        pid: u32,
        message: String,
    },
    RestartFailed {
        message: String,
    },
    Output {
        stream: Stream,
        line: String,
    },
    Exited {
        pid: u32,
        code: i32,
    },
    Problem {
        path: String,
        message: String,
    },
    Watching {
        root: String,
        mode: String,
    },
    RebuildNeeded {
        path: String,
        pattern: String,
    },
    Disconnected {
        reason: String,
    },
    Reconnecting {
        attempt: u32,
        delay_ms: u64,
    },
    Warning {
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        hint: Option<String>,
    },
    Error {
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        hint: Option<String>,
    },
}

/// One row of `list-up`: a service devloop runs in the namespace.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceRow {
    pub name: String,
    pub status: String,
    pub restarts: i32,
    pub image: String,
    pub last_sync: String,
}

/// One row of `list-uris`.
#[derive(Clone, Debug, Serialize)]
pub struct UriRow {
    pub name: String,
    /// The URL, or `Pending` while the ingress has no address.
    pub url: String,
    /// `public` (an ingress) or `tunnel` (a running `devloop up` on this machine).
    pub kind: String,
    /// Where the URL's host answers: the address the ingress controller published (a host name
    /// in the URL may not be in any DNS yet); `-` while there is none.
    pub address: String,
    /// `Available`, or what stands in the way: `Pending: …` (no address, and why), `no ready
    /// endpoints: …` (the Service behind it has no Ready pod).
    pub status: String,
}

#[derive(Clone)]
pub struct Reporter {
    inner: Arc<Inner>,
}

type Observer = Box<dyn Fn(&Event) + Send + Sync>;

struct Inner {
    /// Told of every event before it is shown (e.g. to mark the last sync in the cluster).
    observer: std::sync::OnceLock<Observer>,
    service: std::sync::OnceLock<String>,
    json: bool,
    verbose: bool,
    /// Tells only the observer (a sync whose events are summed by its caller).
    silent: bool,
    stdout: Mutex<std::io::Stdout>,
    bar: Mutex<Option<ProgressBar>>,
}

impl Reporter {
    pub fn new(json: bool, verbose: bool) -> Reporter {
        if std::env::var_os("NO_COLOR").is_some() {
            console::set_colors_enabled(false);
            console::set_colors_enabled_stderr(false);
        }
        Reporter {
            inner: Arc::new(Inner {
                observer: std::sync::OnceLock::new(),
                service: std::sync::OnceLock::new(),
                json,
                verbose,
                silent: false,
                stdout: Mutex::new(std::io::stdout()),
                bar: Mutex::new(None),
            }),
        }
    }

    /// A reporter that shows nothing: its events reach only its observer.
    pub fn silent() -> Reporter {
        let inner = Inner {
            observer: std::sync::OnceLock::new(),
            service: std::sync::OnceLock::new(),
            json: true,
            verbose: false,
            silent: true,
            stdout: Mutex::new(std::io::stdout()),
            bar: Mutex::new(None),
        };
        Reporter { inner: Arc::new(inner) }
    }

    /// Sets the observer of all events (once).
    pub fn observe(&self, observer: impl Fn(&Event) + Send + Sync + 'static) {
        let _ = self.inner.observer.set(Box::new(observer));
    }

    /// Prints rows of data on stdout (a table in human mode; the events carry them with --json).
    pub fn table(&self, header: &[&str], rows: Vec<(Vec<String>, Event)>) {
        if self.inner.json {
            for (_, event) in rows {
                self.emit(event);
            }
            return;
        }
        let mut lines: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
        lines.extend(rows.into_iter().map(|(cells, _)| cells));
        let widths: Vec<usize> = (0..header.len())
            .map(|i| lines.iter().map(|l| l.get(i).map_or(0, |c| c.chars().count())).max().unwrap_or(0))
            .collect();
        let mut out = self.inner.stdout.lock().expect("stdout lock");
        for line in lines {
            let text: Vec<String> = line.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            let _ = writeln!(out, "{}", text.join("  ").trim_end());
        }
    }

    pub fn emit(&self, event: Event) {
        if let Some(observer) = self.inner.observer.get() {
            observer(&event);
        }
        if self.inner.silent {
            return;
        }
        if self.inner.json {
            let mut line = serde_json::to_vec(&event).expect("events serialize");
            line.push(b'\n');
            let mut out = self.inner.stdout.lock().expect("stdout lock");
            let _ = out.write_all(&line);
            let _ = out.flush();
            return;
        }
        if let Event::Output { stream, line } = &event {
            self.output(*stream, line);
            return;
        }
        if self.build_progress(&event) {
            return;
        }
        if let Some(text) = self.human(&event) {
            match self.inner.bar.lock().expect("bar lock").as_ref() {
                Some(bar) => bar.println(text),
                None => eprintln!("{text}"),
            }
        }
    }

    /// On a terminal, an image build is one spinner line naming the running step; finished steps
    /// scroll above it. Elsewhere each step is a plain line (`human`). Says whether it showed the event.
    fn build_progress(&self, event: &Event) -> bool {
        if !console::Term::stderr().is_term() {
            return false;
        }
        let mut bar = self.inner.bar.lock().expect("bar lock");
        match event {
            Event::BuildStep { step, status, secs } => {
                let spinner = bar.get_or_insert_with(|| {
                    let spinner = ProgressBar::new_spinner();
                    spinner.set_style(
                        ProgressStyle::with_template("{spinner} building: {msg} ({elapsed})").expect("valid template"),
                    );
                    spinner.enable_steady_tick(Duration::from_millis(100));
                    spinner
                });
                match (status.as_str(), secs) {
                    ("running", _) => spinner.set_message(step.clone()),
                    (status, Some(secs)) => spinner.println(format!("  {} {step} ({secs:.1}s)", style(status).dim())),
                    (status, None) => spinner.println(format!("  {} {step}", style(status).dim())),
                }
                true
            }
            Event::Built { .. } | Event::Error { .. } | Event::BuildSkipped { .. } => {
                if let Some(spinner) = bar.take() {
                    spinner.finish_and_clear();
                }
                false
            }
            _ => false,
        }
    }

    /// Names the service whose app output this reporter prefixes (once the config is read).
    pub fn set_service(&self, name: &str) {
        let _ = self.inner.service.set(name.to_string());
    }

    /// The app's own lines go to stdout, prefixed with the service name (build lines only with -v).
    fn output(&self, stream: Stream, line: &str) {
        if stream == Stream::Build && !self.inner.verbose {
            return;
        }
        let service = self.inner.service.get().map(String::as_str).unwrap_or("app");
        let prefix = style(format!("{service} |")).dim();
        let text = format!("{prefix} {line}");
        match self.inner.bar.lock().expect("bar lock").as_ref() {
            Some(bar) => bar.println(text),
            None => {
                let mut out = self.inner.stdout.lock().expect("stdout lock");
                let _ = writeln!(out, "{text}");
                let _ = out.flush();
            }
        }
    }

    fn human(&self, event: &Event) -> Option<String> {
        let tag = style("devloop").bold();
        Some(match event {
            Event::Scanned { .. }
            | Event::Connected { .. }
            | Event::SyncStarted { .. }
            | Event::SyncProgress { .. }
            | Event::Applied { .. }
            | Event::UpToDate { .. } => return self.sync_text(event),
            Event::Tunnel { url, remote_port } => {
                format!("{tag} tunnel {} → the pod's port {remote_port}", style(url).cyan().underlined())
            }
            Event::Service(_) | Event::Uri(_) => return None,
            Event::Deploying { release, namespace } => {
                format!("{tag} deploying {} to namespace {namespace} (helm upgrade --install)", style(release).cyan())
            }
            Event::RolledOut { release, millis } => format!("{tag} {} rolled out in {millis} ms", style(release).cyan()),
            Event::RolledOutNotReady { release, pod, why, last_lines, millis } => {
                let mut text = format!(
                    "{tag} {} rolled out in {millis} ms, but the app of pod {pod} is {}: {why}; syncing into it anyway, so your fix reaches it",
                    style(release).cyan(),
                    style("not ready").yellow()
                );
                for line in last_lines {
                    text.push_str(&format!("\n{tag}   {line}"));
                }
                text
            }
            Event::Removed { release, namespace } => {
                format!("{tag} removed release {} from namespace {namespace}", style(release).cyan())
            }
            Event::Prepared { stack, name } => format!("{tag} prepared {} ({stack})", style(name).cyan()),
            Event::ContextSynced { files, bytes, millis } => {
                format!(
                    "{tag} build context in the builder: {}, {} sent in {millis} ms",
                    count(*files, "file", "files"),
                    human_bytes(*bytes)
                )
            }
            Event::BuildStep { step, status, secs } => match secs {
                Some(secs) => format!("{tag} {} {step} ({secs:.1}s)", style(status).dim()),
                None => format!("{tag} {} {step}", style(status).dim()),
            },
            Event::Built { image, millis } => format!("{tag} {} {} in {millis} ms", style("built").green(), style(image).cyan()),
            Event::BuildSkipped { image, pushed: false } => {
                format!("{tag} {} is on the node already: nothing to build", style(image).cyan())
            }
            Event::BuildSkipped { image, pushed: true } => {
                format!("{tag} {} is in the registry already: nothing to build or push", style(image).cyan())
            }
            Event::ImageDestination { destination, why } => {
                format!("{tag} image: {} ({why})", style(destination).cyan())
            }
            Event::Rebuilding { path, reason } => {
                format!("{tag} {} {path} changed ({reason})", style("rebuilding:").yellow().bold())
            }
            Event::File { path, outcome } => match outcome.as_str() {
                "skipped" => format!("{tag} {} {path} (it exists; --force rewrites it)", style("kept").yellow()),
                other => format!("{tag} {} {path}", style(other).green()),
            },
            Event::Restarted { .. }
            | Event::BuildFailed { .. }
            | Event::NotReady { .. }
            | Event::RestartFailed { .. }
            | Event::Exited { .. } => return app_text(event),
            Event::Output { .. } => return None,
            Event::Problem { path, message } if path.is_empty() => format!("{tag} {} {message}", style("problem").yellow()),
            Event::Problem { path, message } => format!("{tag} {} {path}: {message}", style("problem").yellow()),
            Event::Watching { root, mode } => format!("{tag} watching {root} ({mode}); Ctrl+C to stop"),
            Event::RebuildNeeded { path, pattern } => format!(
                "{tag} {} `{path}` changed (matches rebuild rule `{pattern}`): the dev image must be rebuilt\nhint: rebuild and redeploy the image, then run devloop again; or remove the rule from `rebuild:` in devloop.yaml",
                style("rebuild needed:").red().bold()
            ),
            Event::Disconnected { reason } => format!("{tag} {} {reason}", style("disconnected:").yellow()),
            Event::Reconnecting { attempt, delay_ms } => {
                format!("{tag} reconnecting in {delay_ms} ms (attempt {attempt})")
            }
            Event::Warning { message, hint } => with_hint(format!("{tag} {} {message}", style("warning:").yellow()), hint),
            Event::Check { check, ok, found, fix } => {
                let mark = if *ok { style("ok").green() } else { style("FAIL").red().bold() };
                with_hint(format!("{mark:>4} {check}: {found}"), fix)
            }
            Event::Error { message, hint } => with_hint(format!("{} {message}", style("error:").red().bold()), hint),
        })
    }

    /// The lines of a sync round.
    fn sync_text(&self, event: &Event) -> Option<String> {
        let tag = style("devloop").bold();
        Some(match event {
            Event::Scanned { entries, hashed_files, millis } => {
                if !self.inner.verbose {
                    return None;
                }
                format!("{tag} scanned {entries} paths ({hashed_files} hashed) in {millis} ms")
            }
            Event::Connected { target, agent, entries, from_memory } => {
                let how = if *from_memory { ", known from its live index" } else { "" };
                format!("{tag} connected to {} (agent {agent}, {entries} paths there{how})", style(target).cyan())
            }
            Event::SyncStarted { files, deletes, bytes, .. } => {
                if !self.inner.verbose && files + deletes < 20 {
                    return None;
                }
                format!(
                    "{tag} syncing {}, {}, {}",
                    count(*files, "file", "files"),
                    count(*deletes, "deletion", "deletions"),
                    human_bytes(*bytes)
                )
            }
            Event::SyncProgress { files_done, files, bytes_done, bytes, bytes_per_sec } => format!(
                "{tag} syncing: {files_done}/{files} files, {}/{} ({}/s)",
                human_bytes(*bytes_done),
                human_bytes(*bytes),
                human_bytes(*bytes_per_sec)
            ),
            Event::Applied { files, deleted, bytes, refused, millis, .. } => {
                let mut s = format!(
                    "{tag} {} {}, {deleted} deleted, {} in {millis:.1} ms",
                    style("synced").green(),
                    count(*files, "file", "files"),
                    human_bytes(*bytes)
                );
                if *refused > 0 {
                    s.push_str(&format!(", {} refused", style(refused).red()));
                }
                s
            }
            Event::UpToDate { .. } => format!("{tag} {}", style("up to date").green()),
            _ => return None,
        })
    }

    /// Progress of a sync of `files` files and `bytes` bytes: counted from the packing thread
    /// ([`Progress::inc`]) and shown by [`Reporter::show_progress`] once it lasts over a second.
    /// Call [`Reporter::finish_progress`] after.
    pub fn progress(&self, files: u64, bytes: u64) -> Progress {
        let bar = (!self.inner.json && !self.inner.silent && console::Term::stderr().is_term()).then(|| {
            // Hidden until the first tick: a short sync shows nothing.
            let bar = ProgressBar::with_draw_target(Some(bytes.max(1)), ProgressDrawTarget::hidden());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} syncing [{bar:30}] {msg} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            *self.inner.bar.lock().expect("bar lock") = Some(bar.clone());
            bar
        });
        Progress(Arc::new(ProgressState {
            files,
            bytes,
            files_done: AtomicU64::new(0),
            bytes_done: AtomicU64::new(0),
            started: std::time::Instant::now(),
            bar,
        }))
    }

    /// One tick of a sync's progress: the bar on a terminal, else an event (a JSON line, or a
    /// plain line for a log).
    pub fn show_progress(&self, progress: &Progress) {
        let state = &progress.0;
        let (files_done, bytes_done) =
            (state.files_done.load(Ordering::Relaxed), state.bytes_done.load(Ordering::Relaxed));
        if let Some(bar) = &state.bar {
            if bar.is_hidden() {
                bar.set_draw_target(ProgressDrawTarget::stderr());
            }
            bar.set_position(bytes_done);
            bar.set_message(format!("{files_done}/{} files", state.files));
            return;
        }
        let secs = state.started.elapsed().as_secs_f64().max(1e-3);
        self.emit(Event::SyncProgress {
            files_done,
            files: state.files,
            bytes_done,
            bytes: state.bytes,
            bytes_per_sec: (bytes_done as f64 / secs) as u64,
        });
    }

    pub fn finish_progress(&self) {
        if let Some(bar) = self.inner.bar.lock().expect("bar lock").take() {
            bar.finish_and_clear();
        }
    }
}

/// A sync's progress counters, bumped by the packing thread.
#[derive(Clone)]
pub struct Progress(Arc<ProgressState>);

struct ProgressState {
    files: u64,
    bytes: u64,
    files_done: AtomicU64,
    bytes_done: AtomicU64,
    started: std::time::Instant,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// One entry of `bytes` bytes packed.
    pub fn inc(&self, bytes: u64) {
        self.0.files_done.fetch_add(1, Ordering::Relaxed);
        self.0.bytes_done.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The lines about the app: restarts, failed builds, exits.
fn app_text(event: &Event) -> Option<String> {
    let tag = style("devloop").bold();
    Some(match event {
        Event::Restarted { pid, stop_ms, start_ms, ready_ms } => {
            let mut s =
                format!("{tag} {} pid {pid} (stop {stop_ms:.1} ms, start {start_ms:.1} ms", style("restarted").green());
            if let Some(ready) = ready_ms {
                s.push_str(&format!(", ready after {ready:.1} ms"));
            }
            s.push(')');
            s
        }
        Event::BuildFailed { code, output } => format!(
            "{tag} {} (exit code {code}); the previous version keeps running\n{}",
            style("build failed").red().bold(),
            output.trim_end()
        ),
        Event::NotReady { pid, message } => format!("{tag} {} pid {pid}: {message}", style("not ready:").red()),
        Event::RestartFailed { message } => format!("{tag} {} {message}", style("restart failed:").red()),
        Event::Exited { pid, code } => {
            format!("{tag} {} pid {pid} exited with code {code}; the next change restarts it", style("app").yellow())
        }
        _ => return None,
    })
}

fn with_hint(mut text: String, hint: &Option<String>) -> String {
    if let Some(hint) = hint {
        text.push_str(&format!("\n{} {hint}", style("hint:").cyan()));
    }
    text
}

fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// `1 file`, `2 files`.
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}
