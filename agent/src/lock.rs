//! One session per root: `.devloop/session.lock`, held with `flock` for as long as a `serve`
//! session lasts. A second session waits for the first to end (a reconnect racing the old exec
//! that has not noticed its stream closed yet), and gives up with the holder's pid after a while.

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

impl SessionLock {
    /// Takes the root's session lock, waiting up to `wait`. `Ok(Err(pid))` when another session
    /// still holds it then (`pid` as that session wrote it).
    pub async fn acquire(root: &Path, wait: Duration) -> io::Result<Result<SessionLock, String>> {
        let root_fd = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        let reserved = crate::apply::reserved_folder(&root_fd)?;
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut file = File::from(rustix::fs::openat(&reserved, "session.lock", flags, Mode::from_raw_mode(0o644))?);
        let started = Instant::now();
        let mut said = false;
        loop {
            match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    let holder = holder(&mut file);
                    if started.elapsed() >= wait {
                        return Ok(Err(holder));
                    }
                    if !said {
                        info!(pid = %holder, "another session serves this root; waiting for it to end");
                        said = true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(Ok(SessionLock { _file: file }))
    }
}

fn holder(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.rewind().and_then(|_| file.take(32).read_to_string(&mut text));
    if text.trim().is_empty() {
        "unknown".into()
    } else {
        text.trim().to_owned()
    }
}
