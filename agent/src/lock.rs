//! One session per root: `.devloop/session.lock`, held with `flock` for as long as a `serve`
//! session lasts, holding the holder's pid and session id.
//!
//! A second session waits for the first to end. When both carry the same session id, the holder
//! is a stale connection of the same CLI (an exec whose stream broke, which the transport did not
//! close): it is asked to stop (SIGTERM) and the new connection takes over. A holder from another
//! session is waited for up to [`LOCK_WAIT`], then named in the error.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
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
                        Some(pid) if ours && asked_to_stop != Some(pid) && is_serve(pid, &file) => {
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

/// Whether `pid` is another `devloop-agent serve` of this very lock: the same agent executable as
/// this process, serving (never `run`: that one supervises the app), and holding the `flock` of
/// `lock` itself. Whoever can write the lock file can write any pid into it; only a process that
/// passes all three checks is ever signalled.
fn is_serve(pid: i32, lock: &File) -> bool {
    if pid <= 0 || pid == std::process::id() as i32 {
        return false;
    }
    let same_exe = match (std::fs::metadata(format!("/proc/{pid}/exe")), std::fs::metadata("/proc/self/exe")) {
        (Ok(theirs), Ok(ours)) => (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()),
        _ => false,
    };
    let serving =
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| subcommand(&cmdline) == Some(b"serve"));
    same_exe && serving && holds_flock(pid, lock)
}

/// The agent's subcommand in a `/proc/PID/cmdline`: its first argument that is neither an option
/// nor an option's value.
fn subcommand(cmdline: &[u8]) -> Option<&[u8]> {
    const TAKE_A_VALUE: [&[u8]; 6] =
        [b"--root", b"--max-file-size", b"--grace", b"--build", b"--ready", b"--ready-timeout"];
    let mut args = cmdline.split(|&b| b == 0).skip(1);
    while let Some(arg) = args.next() {
        if TAKE_A_VALUE.contains(&arg) {
            args.next();
        } else if !arg.is_empty() && !arg.starts_with(b"-") {
            return Some(arg);
        }
    }
    None
}

/// Whether `/proc/locks` lists a `flock` of `pid` on the file `lock` is.
fn holds_flock(pid: i32, lock: &File) -> bool {
    let Ok(meta) = lock.metadata() else { return false };
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else { return false };
    locks.lines().any(|line| flock_line_matches(line, pid, major, minor, meta.ino()))
}

/// A line of `/proc/locks`: `1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF` (`->` marks a
/// waiter, which is not a holder).
fn flock_line_matches(line: &str, pid: i32, major: u32, minor: u32, ino: u64) -> bool {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.get(1) != Some(&"FLOCK") {
        return false;
    }
    let (Some(holder), Some(file)) = (fields.get(4), fields.get(5)) else { return false };
    let mut parts = file.split(':');
    let (Some(maj), Some(min), Some(inode)) = (parts.next(), parts.next(), parts.next()) else { return false };
    holder.parse() == Ok(pid)
        && u32::from_str_radix(maj, 16) == Ok(major)
        && u32::from_str_radix(min, 16) == Ok(minor)
        && inode.parse() == Ok(ino)
}

fn read_holder(file: &mut File) -> Holder {
    let mut text = String::new();
    let _ = file.rewind().and_then(|_| file.take(256).read_to_string(&mut text));
    let mut words = text.split_whitespace();
    Holder { pid: words.next().and_then(|p| p.parse().ok()), session: words.next().unwrap_or("").to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subcommand_is_the_first_word_that_is_not_an_option() {
        assert_eq!(subcommand(b"/bin/devloop-agent\0serve\0--root\0/app\0"), Some(b"serve".as_slice()));
        assert_eq!(subcommand(b"devloop-agent\0--root\0serve\0run\0--\0x\0"), Some(b"run".as_slice()));
        assert_eq!(subcommand(b"devloop-agent\0run\0--\0python\0serve\0"), Some(b"run".as_slice()));
        assert_eq!(subcommand(b"sleep\0"), None);
    }

    #[test]
    fn a_flock_line_names_its_holder_and_file() {
        let line = "3: FLOCK  ADVISORY  WRITE 4242 fe:01:1234 0 EOF";
        assert!(flock_line_matches(line, 4242, 0xfe, 1, 1234));
        assert!(!flock_line_matches(line, 4243, 0xfe, 1, 1234));
        assert!(!flock_line_matches(line, 4242, 0xfe, 1, 1235));
        assert!(!flock_line_matches("3: POSIX  ADVISORY  WRITE 4242 fe:01:1234 0 EOF", 4242, 0xfe, 1, 1234));
        assert!(!flock_line_matches("3: -> FLOCK  ADVISORY  WRITE 4242 fe:01:1234 0 EOF", 4242, 0xfe, 1, 1234));
    }
}
