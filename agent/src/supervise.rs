//! The supervisor: runs the app in its own process group and restarts it on request.
//!
//! An actor: one task owns the app; a [`Supervisor`] handle sends it typed requests and gets typed
//! answers. Restart = optional build (if it fails, the old app keeps running) → SIGTERM to the
//! whole group → grace period → SIGKILL → wait until no process of the group is left (so the port
//! is free) → start → optional readiness probe. Restart requests that queue up while one runs are
//! answered by the next single restart: a burst costs one restart.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{info, info_span, warn, Instrument};

use crate::probe::Probe;
use crate::protocol::{RestartReport, Stream};
use crate::reap::{self, ExitCode, Reaper};
use crate::units::MAX_DURATION;

/// Longest build output kept for a `BuildFailed` report (the tail is what matters).
const BUILD_OUTPUT_MAX: usize = 64 << 10;

#[derive(Clone, Debug)]
pub struct SuperviseOptions {
    pub root: PathBuf,
    pub command: Vec<String>,
    pub build: Option<Vec<String>>,
    pub grace: Duration,
    pub ready: Option<Probe>,
    pub ready_timeout: Duration,
    /// Start the app at once (a container whose image holds the code), or only on the first
    /// restart request (a local folder that the first sync fills).
    pub start_now: bool,
    /// Copy the app's output to our own stdout/stderr (container logs). Off when our stdout
    /// carries the protocol.
    pub echo: bool,
}

/// What the app does, for whoever listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppEvent {
    Output { stream: Stream, line: String },
    Exited { pid: u32, code: ExitCode },
}

enum Request {
    Restart(oneshot::Sender<RestartReport>),
    Ready(oneshot::Sender<RestartReport>),
    Stop { signal: i32, reply: oneshot::Sender<Option<ExitCode>> },
}

/// A handle to the supervisor task.
#[derive(Clone)]
pub struct Supervisor {
    tx: mpsc::Sender<Request>,
    events: broadcast::Sender<AppEvent>,
    /// The app has been started once (it may have exited since).
    started: Arc<AtomicBool>,
}

impl Supervisor {
    /// Starts the supervisor task (and the app, with `start_now`).
    pub fn start(options: SuperviseOptions, reaper: Reaper) -> Supervisor {
        let (tx, rx) = mpsc::channel(64);
        let (events, _) = broadcast::channel(1024);
        let started = Arc::new(AtomicBool::new(false));
        let actor = Actor {
            options,
            reaper,
            app: None,
            events: events.clone(),
            rx,
            queued: Vec::new(),
            started: started.clone(),
        };
        tokio::spawn(actor.run());
        Supervisor { tx, events, started }
    }

    /// The app has not been started yet: it waits for the first restart (`run --wait`).
    pub fn waiting(&self) -> bool {
        !self.started.load(Ordering::Acquire)
    }

    /// Restarts the app (building first, if a build is set).
    pub async fn restart(&self) -> RestartReport {
        self.ask(Request::Restart).await
    }

    /// Makes sure the app runs and is ready.
    pub async fn ready(&self) -> RestartReport {
        self.ask(Request::Ready).await
    }

    /// Stops the app (signal to the group, grace, SIGKILL); its exit code, if it was running.
    pub async fn stop(&self, signal: i32) -> Option<ExitCode> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Request::Stop { signal, reply }).await.is_err() {
            return None;
        }
        rx.await.unwrap_or(None)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<AppEvent> {
        self.events.subscribe()
    }

    async fn ask(&self, make: fn(oneshot::Sender<RestartReport>) -> Request) -> RestartReport {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(make(reply)).await.is_err() {
            return RestartReport::Failed { message: "the supervisor has stopped".into() };
        }
        rx.await.unwrap_or(RestartReport::Failed { message: "the supervisor has stopped".into() })
    }
}

struct App {
    pid: u32,
    exit: oneshot::Receiver<ExitCode>,
}

struct Actor {
    options: SuperviseOptions,
    reaper: Reaper,
    app: Option<App>,
    events: broadcast::Sender<AppEvent>,
    rx: mpsc::Receiver<Request>,
    /// Requests taken off the channel while coalescing restarts.
    queued: Vec<Request>,
    started: Arc<AtomicBool>,
}

impl Actor {
    async fn run(mut self) {
        if self.options.start_now {
            if let Err(message) = self.start() {
                warn!(%message, "the app did not start");
            }
        }
        loop {
            let request = if let Some(request) = self.queued.pop() {
                request
            } else {
                tokio::select! {
                    request = self.rx.recv() => match request {
                        Some(request) => request,
                        None => break,
                    },
                    code = app_exit(&mut self.app) => {
                        let pid = self.app.take().map(|a| a.pid).unwrap_or_default();
                        info!(pid, code, "the app exited");
                        let _ = self.events.send(AppEvent::Exited { pid, code });
                        continue;
                    }
                }
            };
            match request {
                Request::Restart(reply) => {
                    let mut replies = vec![reply];
                    // Everything already queued is served by this one restart.
                    while let Ok(next) = self.rx.try_recv() {
                        match next {
                            Request::Restart(reply) => replies.push(reply),
                            other => self.queued.insert(0, other),
                        }
                    }
                    let report = self.restart().instrument(info_span!("restart")).await;
                    for reply in replies {
                        let _ = reply.send(report.clone());
                    }
                }
                Request::Ready(reply) => {
                    let report = match &self.app {
                        Some(app) => {
                            let pid = app.pid;
                            let started = Instant::now();
                            self.await_ready(pid, started, 0.0, 0.0).await
                        }
                        None => self.restart().await,
                    };
                    let _ = reply.send(report);
                }
                Request::Stop { signal, reply } => {
                    let code = self.stop(signal).await.1;
                    let _ = reply.send(code);
                    break;
                }
            }
        }
    }

    async fn restart(&mut self) -> RestartReport {
        if let Some(build) = self.options.build.clone() {
            if let Err((code, output)) = self.build(&build).await {
                return RestartReport::BuildFailed { code, output };
            }
        }
        let (stop, _) = self.stop(libc::SIGTERM).await;
        let started = Instant::now();
        let pid = match self.start() {
            Ok(pid) => pid,
            Err(message) => return RestartReport::Failed { message },
        };
        let start_ms = ms(started.elapsed());
        self.await_ready(pid, started, ms(stop), start_ms).await
    }

    async fn await_ready(&mut self, pid: u32, started: Instant, stop_ms: f64, start_ms: f64) -> RestartReport {
        let Some(probe) = self.options.ready.clone() else {
            return RestartReport::Restarted { pid, stop_ms, start_ms, ready_ms: None };
        };
        let deadline = started.checked_add(self.options.ready_timeout).unwrap_or(started + MAX_DURATION);
        let mut pause = Duration::from_micros(200);
        loop {
            let last = match probe.check().await {
                Ok(()) => {
                    return RestartReport::Restarted { pid, stop_ms, start_ms, ready_ms: Some(ms(started.elapsed())) }
                }
                Err(e) => e,
            };
            if let Some(app) = &mut self.app {
                if let Ok(code) = app.exit.try_recv() {
                    self.app = None;
                    let _ = self.events.send(AppEvent::Exited { pid, code });
                    return RestartReport::NotReady {
                        pid,
                        message: format!("the app exited with code {code} before it was ready"),
                    };
                }
            } else {
                return RestartReport::NotReady { pid, message: "the app is not running".into() };
            }
            if Instant::now() >= deadline {
                return RestartReport::NotReady {
                    pid,
                    message: format!("{probe} did not answer within {:?} (last: {last})", self.options.ready_timeout),
                };
            }
            fine_sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Stops the app's whole process group; how long it took, and the app's exit code.
    async fn stop(&mut self, signal: i32) -> (Duration, Option<ExitCode>) {
        let Some(mut app) = self.app.take() else { return (Duration::ZERO, None) };
        let started = Instant::now();
        let pgid = app.pid;
        reap::signal_group(pgid, signal);
        let grace_end = started.checked_add(self.options.grace).unwrap_or(started + MAX_DURATION);
        if !wait_group_gone(pgid, grace_end).await {
            warn!(pid = pgid, grace = ?self.options.grace, "the app ignored SIGTERM; killing its process group");
            reap::signal_group(pgid, libc::SIGKILL);
            wait_group_gone(pgid, Instant::now() + Duration::from_secs(10)).await;
        }
        let code = tokio::time::timeout(Duration::from_secs(1), &mut app.exit).await.ok().and_then(Result::ok);
        info!(pid = pgid, ?code, took = ?started.elapsed(), "stopped");
        (started.elapsed(), code)
    }

    fn start(&mut self) -> Result<u32, String> {
        let argv = &self.options.command;
        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .current_dir(&self.options.root)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (mut child, exit) =
            self.reaper.spawn(&mut command).map_err(|e| format!("cannot start `{}`: {e}", argv.join(" ")))?;
        let pid = child.id();
        if let Some(out) = child.stdout.take() {
            self.forward(OwnedFd::from(out), Stream::Stdout);
        }
        if let Some(err) = child.stderr.take() {
            self.forward(OwnedFd::from(err), Stream::Stderr);
        }
        info!(pid, "started");
        self.app = Some(App { pid, exit });
        self.started.store(true, Ordering::Release);
        Ok(pid)
    }

    /// Copies an output pipe line by line to the listeners (and our own output, with `echo`).
    fn forward(&self, fd: OwnedFd, stream: Stream) {
        let events = self.events.clone();
        let echo = self.options.echo;
        tokio::spawn(async move {
            let Ok(pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else { return };
            forward_lines(pipe, stream, events, echo).await;
        });
    }

    /// Runs the build; `Err((code, output))` when it fails.
    async fn build(&mut self, argv: &[String]) -> Result<(), (ExitCode, String)> {
        let started = Instant::now();
        let (read, write) = std::io::pipe().map_err(|e| (-1, format!("cannot make a pipe: {e}")))?;
        let write2 = write.try_clone().map_err(|e| (-1, format!("cannot make a pipe: {e}")))?;
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]).current_dir(&self.options.root).stdin(Stdio::null()).stdout(write).stderr(write2);
        let (child, exit) =
            self.reaper.spawn(&mut command).map_err(|e| (-1, format!("cannot start `{}`: {e}", argv.join(" "))))?;
        drop(command);
        let pid = child.id();
        let mut output = String::new();
        if let Ok(pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(read)) {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = self.events.send(AppEvent::Output { stream: Stream::Build, line: line.clone() });
                output.push_str(&line);
                output.push('\n');
                if output.len() > BUILD_OUTPUT_MAX {
                    let cut = output.len() - BUILD_OUTPUT_MAX;
                    let cut = (cut..output.len()).find(|&i| output.is_char_boundary(i)).unwrap_or(0);
                    output.drain(..cut);
                }
            }
        }
        let code = exit.await.unwrap_or(-1);
        info!(pid, code, took = ?started.elapsed(), "build");
        if code == 0 {
            Ok(())
        } else {
            Err((code, output))
        }
    }
}

async fn forward_lines(pipe: impl AsyncRead + Unpin, stream: Stream, events: broadcast::Sender<AppEvent>, echo: bool) {
    let mut lines = BufReader::new(pipe).lines();
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    while let Ok(Some(line)) = lines.next_line().await {
        if echo {
            let out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send) =
                if stream == Stream::Stdout { &mut stdout } else { &mut stderr };
            let _ = out.write_all(format!("{line}\n").as_bytes()).await;
        }
        let _ = events.send(AppEvent::Output { stream, line });
    }
}

/// Resolves when the app (if any) exits; pending forever when there is none.
async fn app_exit(app: &mut Option<App>) -> ExitCode {
    match app {
        Some(app) => (&mut app.exit).await.unwrap_or(-1),
        None => std::future::pending().await,
    }
}

/// Polls until no process of the group is left, or the deadline. True when the group is gone.
/// Polls finely at first: most apps are gone within a millisecond of SIGTERM.
async fn wait_group_gone(pgid: u32, deadline: Instant) -> bool {
    let started = Instant::now();
    let mut pause = Duration::from_micros(100);
    loop {
        if !reap::group_alive(pgid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        fine_sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
        if started.elapsed() > Duration::from_millis(20) {
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }
}

/// Sleeps for `pause`, to the tenth of a millisecond when it is short: tokio's timer ticks in
/// whole milliseconds, which would add a millisecond to every step of a restart.
async fn fine_sleep(pause: Duration) {
    if pause >= Duration::from_millis(2) {
        tokio::time::sleep(pause).await;
    } else {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(pause)).await;
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
