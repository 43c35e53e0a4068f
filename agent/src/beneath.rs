//! Opening the paths of a tree beneath its root's descriptor, following no symlink on the way.
//!
//! Both ends read trees that someone else may be changing: a folder swapped for a symlink to a
//! folder outside the tree between the listing and the open must not make the walk (or the
//! packer) read outside. Every path is resolved with `openat2` (`RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`), or, where the kernel or a seccomp profile
//! refuses `openat2`, one `O_NOFOLLOW` open per component. A symlink on the way is `ELOOP` (or
//! `ENOTDIR`), never followed.
//!
//! Nothing here opens what is not a regular file or a folder for reading: a FIFO opened for
//! reading blocks until a writer comes, so files are opened `O_NONBLOCK` and checked with
//! `fstat` before a byte is read.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags, Stat};

/// Flags of a folder opened to look up names in it (and to list it).
const DIR_FLAGS: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

/// Flags of a file opened for reading: never blocks (FIFOs), never becomes a terminal.
const FILE_FLAGS: OFlags =
    OFlags::RDONLY.union(OFlags::NOFOLLOW).union(OFlags::NONBLOCK).union(OFlags::NOCTTY).union(OFlags::CLOEXEC);

/// Opens `rel` (a checked relative path, `""` or `.` for `base` itself) beneath `base` with
/// `flags`, following no symlink in any component.
pub fn open(base: impl AsFd, rel: &str, flags: OFlags) -> io::Result<OwnedFd> {
    let base = base.as_fd();
    let target = if rel.is_empty() { "." } else { rel };
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    for _ in 0..8 {
        match rustix::fs::openat2(base, target, flags | OFlags::NOFOLLOW, Mode::empty(), resolve) {
            Ok(fd) => return Ok(fd),
            // The kernel asks for a retry when a rename raced the lookup.
            Err(rustix::io::Errno::AGAIN) => continue,
            // No openat2 here (kernels before 5.6, seccomp profiles that refuse it).
            Err(rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) => return open_by_components(base, target, flags),
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::new(io::ErrorKind::Interrupted, format!("`{rel}` kept changing while it was opened")))
}

/// The fallback of [`open`]: one `O_NOFOLLOW` open per component.
fn open_by_components(base: std::os::fd::BorrowedFd<'_>, rel: &str, flags: OFlags) -> io::Result<OwnedFd> {
    let names: Vec<&str> = rel.split('/').filter(|n| !n.is_empty() && *n != ".").collect();
    let Some((last, folders)) = names.split_last() else {
        return Ok(rustix::fs::openat(base, ".", flags | OFlags::NOFOLLOW, Mode::empty())?);
    };
    let mut dir: Option<OwnedFd> = None;
    for name in folders {
        if *name == ".." {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "`..` in a path of the tree"));
        }
        let at = dir.as_ref().map_or(base, |d| d.as_fd());
        dir = Some(rustix::fs::openat(at, *name, DIR_FLAGS | OFlags::PATH, Mode::empty())?);
    }
    if *last == ".." {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "`..` in a path of the tree"));
    }
    let at = dir.as_ref().map_or(base, |d| d.as_fd());
    Ok(rustix::fs::openat(at, *last, flags | OFlags::NOFOLLOW, Mode::empty())?)
}

/// Opens the root of a tree, the folder the user named (symlinks in its own path are followed:
/// the root is what it resolves to), as the base of the other opens here.
pub fn open_root(path: &std::path::Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(path, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?)
}

/// Opens the folder `rel` beneath `base` for lookups and listing.
pub fn open_dir(base: impl AsFd, rel: &str) -> io::Result<OwnedFd> {
    open(base, rel, DIR_FLAGS)
}

/// A regular file opened for reading, with the stat of what was opened.
pub struct Opened {
    pub file: File,
    pub stat: Stat,
}

/// Why a path could not be opened as a regular file.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Not a regular file (a FIFO, socket or device; or a folder or symlink now).
    #[error("not a regular file ({0}); skipped")]
    NotRegular(&'static str),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl OpenError {
    /// As an `io::Error`, for callers that keep one error type.
    pub fn into_io(self) -> io::Error {
        match self {
            OpenError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
        }
    }
}

/// Opens `rel` beneath `base` for reading, only if it is a regular file: never blocks on a FIFO,
/// never follows a symlink.
pub fn open_file(base: impl AsFd, rel: &str) -> Result<Opened, OpenError> {
    checked(open(base, rel, FILE_FLAGS)?)
}

/// Opens the name `name` of the folder `dir` for reading, only if it is a regular file.
pub fn open_file_at(dir: impl AsFd, name: &std::ffi::CStr) -> Result<Opened, OpenError> {
    checked(rustix::fs::openat(dir, name, FILE_FLAGS, Mode::empty()).map_err(io::Error::from)?)
}

/// Opens a path of the file system (a config or values file) for reading, only if it is a
/// regular file: a FIFO in its place is an error, not a hang. Symlinks are followed, as users
/// expect of a file they name.
pub fn open_named_file(path: &std::path::Path) -> Result<Opened, OpenError> {
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    checked(rustix::fs::open(path, flags, Mode::empty()).map_err(io::Error::from)?)
}

fn checked(fd: OwnedFd) -> Result<Opened, OpenError> {
    let stat = rustix::fs::fstat(&fd).map_err(io::Error::from)?;
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => {}
        other => return Err(OpenError::NotRegular(kind_name(other))),
    }
    // Reads of a regular file never block; clearing O_NONBLOCK keeps them ordinary anyway.
    let _ = rustix::fs::fcntl_setfl(&fd, OFlags::RDONLY);
    Ok(Opened { file: File::from(fd), stat })
}

/// A file type as a user names it.
pub fn kind_name(kind: FileType) -> &'static str {
    match kind {
        FileType::RegularFile => "a file",
        FileType::Directory => "a folder",
        FileType::Symlink => "a symlink",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "of an unknown kind",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_symlink_anywhere_on_the_way_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let (root, outside) = (dir.path().join("root"), dir.path().join("outside"));
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::create_dir_all(outside.join("deep")).unwrap();
        std::fs::write(outside.join("id_rsa"), "secret").unwrap();
        std::fs::write(outside.join("deep/id_rsa"), "secret").unwrap();
        std::fs::write(root.join("a/ok"), "ok").unwrap();
        symlink(&outside, root.join("a/out")).unwrap();
        symlink(&outside, root.join("top")).unwrap();
        let base = open_root(&root).unwrap();
        assert!(open_file(&base, "a/ok").is_ok());
        for rel in ["a/out/id_rsa", "a/out/deep/id_rsa", "top/id_rsa", "top/deep/id_rsa"] {
            assert!(open_file(&base, rel).is_err(), "{rel} was opened through a symlink");
            assert!(open_by_components(base.as_fd(), rel, FILE_FLAGS).is_err(), "{rel} (fallback)");
        }
        assert!(open_dir(&base, "a/out").is_err());
        assert!(open_dir(&base, "top/deep").is_err());
        assert!(open_by_components(base.as_fd(), "a/../top/id_rsa", FILE_FLAGS).is_err());
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        rustix::fs::mknodat(rustix::fs::CWD, dir.path().join("pipe"), FileType::Fifo, Mode::from_raw_mode(0o644), 0)
            .unwrap();
        let base = open_root(dir.path()).unwrap();
        assert!(matches!(open_file(&base, "pipe"), Err(OpenError::NotRegular("a FIFO"))));
        assert!(matches!(open_named_file(&dir.path().join("pipe")), Err(OpenError::NotRegular("a FIFO"))));
        assert!(matches!(open_named_file(dir.path()), Err(OpenError::NotRegular("a folder"))));
    }
}
