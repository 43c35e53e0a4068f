//! Child processes and their exit statuses, for a process that may be PID 1.
//!
//! The agent reaps every child it ever gets: its own (the app, the build) and orphans that the
//! kernel re-parents to it (as PID 1 in a container, or as a child subreaper elsewhere). One task
//! answers SIGCHLD with `waitpid(-1, WNOHANG)` and hands each status to whoever spawned that pid.
//! Spawning and registering happen under the same lock as reaping, so no exit is ever missed.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// An exit status in shell terms: the code, or 128 + the signal that killed the process.
pub type ExitCode = i32;

#[derive(Clone)]
pub struct Reaper {
    waiting: Arc<Mutex<HashMap<u32, oneshot::Sender<ExitCode>>>>,
}

impl Reaper {
    /// Starts reaping. Must run inside a tokio runtime; call before spawning anything.
    pub fn start() -> io::Result<Reaper> {
        become_subreaper();
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Reaper { waiting: Arc::new(Mutex::new(HashMap::new())) };
        let me = reaper.clone();
        tokio::spawn(async move {
            loop {
                me.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Spawns `command`; the receiver gets its exit status once it is reaped.
    pub fn spawn(&self, command: &mut Command) -> io::Result<(Child, oneshot::Receiver<ExitCode>)> {
        let mut waiting = self.waiting.lock().expect("reaper lock");
        let child = command.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiting.insert(child.id(), tx);
        Ok((child, rx))
    }

    fn reap_all(&self) {
        let mut waiting = self.waiting.lock().expect("reaper lock");
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid pointer to an int.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if let Some(tx) = waiting.remove(&(pid as u32)) {
                let _ = tx.send(exit_code(status));
            }
        }
    }
}

fn exit_code(status: i32) -> ExitCode {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        status
    }
}

/// Orphans of the app come to us even when we are not PID 1 (local targets).
fn become_subreaper() {
    // SAFETY: prctl with integer arguments; failure only means orphans go to PID 1 instead.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

/// Whether any process of the group is still alive (zombies count until reaped).
pub fn group_alive(pgid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    let r = unsafe { libc::kill(-(pgid as i32), 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Sends `signal` to every process of the group.
pub fn signal_group(pgid: u32, signal: i32) {
    // SAFETY: plain kill(2).
    unsafe {
        libc::kill(-(pgid as i32), signal);
    }
}
