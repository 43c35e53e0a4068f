//! One session per root: `.devloop/session.lock`, held with `flock` for as long as a `serve`
//! session lasts, holding the holder's pid and session id.
//!
//! A second session waits for the first to end. When both carry the same session id, the holder
//! is a stale connection of the same CLI (an exec whose stream broke, which the transport did not
//! close): it is asked to stop (SIGTERM) and the new connection takes over. A holder from another
//! session is waited for up to [`LOCK_WAIT`], then named in the error.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, Mode, OFlags};
use tracing::info;

/// How long a second session waits for the first to end.
pub const LOCK_WAIT: Duration = Duration::from_secs(30);

/// Held while alive; the kernel releases it when the process ends, however it ends.
pub struct SessionLock {
    _file: File,
}

/// Who holds the lock, as it wrote itself into the file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Holder {
    pub pid: Option<i32>,
    pub session: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "{pid}")?,
            None => f.write_str("unknown")?,
        }
        if !self.session.is_empty() {
            write!(f, ", session {}", self.session)?;
        }
        Ok(())
    }
}

impl SessionLock {
    /// Takes the root's session lock for `session`, waiting up to `wait`. `Ok(Err(holder))` when
    /// another session still holds it then.
    pub async fn acquire(root: &Path, session: &str, wait: Duration) -> io::Result<Result<SessionLock, Holder>> {
        let root_fd = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        let reserved = crate::apply::reserved_folder(&root_fd)?;
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut file = File::from(rustix::fs::openat(&reserved, "session.lock", flags, Mode::from_raw_mode(0o644))?);
        let started = Instant::now();
        let mut asked_to_stop = None;
        loop {
            match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    let holder = read_holder(&mut file);
                    if started.elapsed() >= wait {
                        return Ok(Err(holder));
                    }
                    let ours = !session.is_empty() && holder.session == session;
                    match holder.pid {
                        Some(pid) if ours && asked_to_stop != Some(pid) && is_serve(pid) => {
                            info!(pid, "a stale connection of this session holds the root; stopping it");
                            // SAFETY: kill has no memory effects; a pid that is gone is an ESRCH.
                            unsafe { libc::kill(pid, libc::SIGTERM) };
                            asked_to_stop = Some(pid);
                        }
                        _ if asked_to_stop.is_none() && started.elapsed() < Duration::from_millis(60) => {
                            info!(%holder, "another session serves this root; waiting for it to end");
                        }
                        _ => {}
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{} {}", std::process::id(), session)?;
        Ok(Ok(SessionLock { _file: file }))
    }
}

/// Whether `pid` is another `devloop-agent serve` process (never `run`: that one supervises the app).
fn is_serve(pid: i32) -> bool {
    pid != std::process::id() as i32
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmdline| cmdline.split(|&b| b == 0).any(|a| a == b"serve"))
}

fn read_holder(file: &mut File) -> Holder {
    let mut text = String::new();
    let _ = file.rewind().and_then(|_| file.take(256).read_to_string(&mut text));
    let mut words = text.split_whitespace();
    Holder { pid: words.next().and_then(|p| p.parse().ok()), session: words.next().unwrap_or("").to_owned() }
}
