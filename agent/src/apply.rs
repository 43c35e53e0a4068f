//! Applying one batch to the root, atomically per file.
//!
//! Deletions first (deepest paths first), then exec-bit changes, then the entries of the batch's tar
//! stream in order. A regular file is written into the staging folder (`.devloop/staging`, on the
//! same filesystem as the root), its blake3 checked against the digest the CLI put in the entry's
//! PAX header, its mode set, and only then renamed over the destination: a reader sees the old file
//! or the new one, never half of one. An interrupted batch leaves only staging leftovers, which the
//! next session clears.
//!
//! Architecture invariant: nothing is written outside the root. Every path passes
//! [`relpath::check`]; no path is reached through a symlink; symlinks are created only when they
//! resolve inside the root; devices, fifos and hard links are refused; entries above the size limit
//! are refused. A refused entry is reported by path and the rest of the batch goes on.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use tar::EntryType;

use crate::manifest::{Digest, Entry};
use crate::protocol::{Applied, Chmod, Problem, PAX_BLAKE3};
use crate::relpath::{self, PathError};
use crate::walk::{Scanned, StatKey};
use crate::RESERVED_DIR;

/// Default largest file a batch may carry.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 1 << 30;

/// A change to the agent's own idea of its tree (its stat cache), made by a batch.
#[derive(Debug, PartialEq, Eq)]
pub enum TreeUpdate {
    Put(String, Scanned),
    Remove(String),
}

pub struct Applier {
    root: PathBuf,
    staging: PathBuf,
    max_file_size: u64,
    seq: u64,
    /// This process's id, part of staged names (read once: it is a syscall).
    pid: u32,
    /// Folders this batch already checked or created (cleared per batch: the app may change the
    /// tree between batches).
    known_folders: HashSet<String>,
}

#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0}")]
    Path(#[from] PathError),
    #[error("path goes through a symlink or a file at `{0}`")]
    NotAFolder(String),
    #[error("symlink target `{0}` points outside the root")]
    LinkOutside(String),
    #[error("{0} entries are not synced (only files, folders and symlinks)")]
    Kind(&'static str),
    #[error("entry of {size} bytes is larger than the {max} allowed")]
    TooLarge { size: u64, max: u64 },
    #[error("content does not match its digest (expected {expected}, got {got})")]
    DigestMismatch { expected: String, got: String },
    #[error("entry carries no {PAX_BLAKE3} digest")]
    NoDigest,
    #[error("a folder with content stands where a file is to go")]
    FolderInTheWay,
    #[error("name is not UTF-8")]
    NotUtf8,
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Applier {
    /// Prepares the staging folder under `root`, clearing what an interrupted batch left there.
    pub fn new(root: &Path, max_file_size: u64) -> io::Result<Applier> {
        let staging = root.join(RESERVED_DIR).join("staging");
        match fs::remove_dir_all(&staging) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::create_dir_all(&staging)?;
        Ok(Applier {
            root: root.to_path_buf(),
            staging,
            max_file_size,
            seq: 0,
            pid: std::process::id(),
            known_folders: HashSet::new(),
        })
    }

    /// Stands in while the real applier works on a blocking thread.
    pub(crate) fn placeholder() -> Applier {
        Applier {
            root: PathBuf::new(),
            staging: PathBuf::new(),
            max_file_size: 0,
            seq: 0,
            pid: 0,
            known_folders: HashSet::new(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Applies one batch whose tar stream is `tar`. Never fails as a whole: what could not be done
    /// is listed in `refused`, and a stream that breaks off is reported in `incomplete`.
    pub fn apply(
        &mut self,
        id: u64,
        deletes: &[String],
        chmods: &[Chmod],
        tar: impl Read,
    ) -> (Applied, Option<String>, Vec<TreeUpdate>) {
        let started = Instant::now();
        self.known_folders.clear();
        let mut report = Applied { id, ..Applied::default() };
        let mut updates = Vec::new();

        let mut deletes: Vec<&String> = deletes.iter().collect();
        deletes.sort_unstable_by(|a, b| b.cmp(a));
        for path in deletes {
            match self.delete(path) {
                Ok(true) => {
                    report.deleted += 1;
                    updates.push(TreeUpdate::Remove(path.clone()));
                }
                Ok(false) => updates.push(TreeUpdate::Remove(path.clone())),
                Err(refusal) => report.refused.push(refused(path, refusal)),
            }
        }
        for chmod in chmods {
            match self.chmod(chmod) {
                Ok(update) => updates.extend(update),
                Err(refusal) => report.refused.push(refused(&chmod.path, refusal)),
            }
        }

        let mut archive = tar::Archive::new(tar);
        let incomplete = match archive.entries() {
            Ok(entries) => {
                let mut broke = None;
                for entry in entries {
                    let mut entry = match entry {
                        Ok(entry) => entry,
                        Err(e) => {
                            broke = Some(format!("the batch's tar stream broke off: {e}"));
                            break;
                        }
                    };
                    let path = match entry_path(&entry) {
                        Ok(path) => path,
                        Err(refusal) => {
                            let shown = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
                            report.refused.push(refused(&shown, refusal));
                            continue;
                        }
                    };
                    match self.entry(&path, &mut entry) {
                        Ok(scanned) => {
                            report.written += 1;
                            report.bytes += scanned.entry.size();
                            updates.push(TreeUpdate::Put(path, scanned));
                        }
                        Err(Refusal::Io(e)) if is_stream_error(&e) => {
                            broke = Some(format!("the batch's tar stream broke off at `{path}`: {e}"));
                            break;
                        }
                        Err(refusal) => report.refused.push(refused(&path, refusal)),
                    }
                }
                broke
            }
            Err(e) => Some(format!("the batch's tar stream is unreadable: {e}")),
        };
        report.micros = started.elapsed().as_micros() as u64;
        (report, incomplete, updates)
    }

    /// Removes one path; `Ok(false)` when it was already gone.
    fn delete(&mut self, path: &str) -> Result<bool, Refusal> {
        relpath::check(path)?;
        self.parents_are_folders(path)?;
        let abs = self.root.join(path);
        let meta = match fs::symlink_metadata(&abs) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        if meta.is_dir() {
            fs::remove_dir(&abs)?;
            self.known_folders.remove(path);
        } else {
            fs::remove_file(&abs)?;
        }
        Ok(true)
    }

    fn chmod(&self, chmod: &Chmod) -> Result<Option<TreeUpdate>, Refusal> {
        relpath::check(&chmod.path)?;
        self.parents_are_folders(&chmod.path)?;
        let abs = self.root.join(&chmod.path);
        let meta = fs::symlink_metadata(&abs)?;
        if !meta.is_file() {
            return Err(Refusal::Kind("exec-bit changes of non-file"));
        }
        fs::set_permissions(&abs, fs::Permissions::from_mode(file_mode(chmod.exec)))?;
        // The content is unchanged, so the digest in the stat cache stays valid; only ctime moved.
        Ok(None)
    }

    fn entry<R: Read>(&mut self, path: &str, entry: &mut tar::Entry<'_, R>) -> Result<Scanned, Refusal> {
        let header = entry.header();
        match header.entry_type() {
            EntryType::Directory => {
                self.make_folders(path)?;
                Ok(Scanned { entry: Entry::Dir, stat: None })
            }
            EntryType::Regular | EntryType::Continuous => {
                let size = header.size()?;
                if size > self.max_file_size {
                    return Err(Refusal::TooLarge { size, max: self.max_file_size });
                }
                let exec = header.mode()? & 0o111 != 0;
                let expected = pax_digest(entry)?;
                self.prepare_parent(path)?;
                let staged = self.staged_path();
                let result = self.write_file(&staged, entry, expected, exec).and_then(|(digest, stat)| {
                    self.place(&staged, path)?;
                    Ok(Scanned { entry: Entry::File { hash: digest, size, exec }, stat: Some(stat) })
                });
                if result.is_err() {
                    let _ = fs::remove_file(&staged);
                }
                result
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or(Refusal::Kind("symlink without target"))?;
                let target = std::str::from_utf8(&target).map_err(|_| Refusal::NotUtf8)?.to_owned();
                if !relpath::link_stays_inside(path, &target) {
                    return Err(Refusal::LinkOutside(target));
                }
                self.prepare_parent(path)?;
                let staged = self.staged_path();
                symlink(&target, &staged)?;
                let placed = self.place(&staged, path);
                if placed.is_err() {
                    let _ = fs::remove_file(&staged);
                }
                placed?;
                Ok(Scanned { entry: Entry::Symlink { target }, stat: None })
            }
            EntryType::Char => Err(Refusal::Kind("character device")),
            EntryType::Block => Err(Refusal::Kind("block device")),
            EntryType::Fifo => Err(Refusal::Kind("fifo")),
            EntryType::Link => Err(Refusal::Kind("hard link")),
            _ => Err(Refusal::Kind("unknown tar")),
        }
    }

    /// Writes the entry's content to `staged` and checks its digest; returns the digest and the
    /// stat of the written file (what the stat cache keeps; a rename does not change it).
    fn write_file<R: Read>(
        &self,
        staged: &Path,
        entry: &mut tar::Entry<'_, R>,
        expected: Digest,
        exec: bool,
    ) -> Result<(Digest, StatKey), Refusal> {
        let mode = file_mode(exec);
        let mut out = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(staged)?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(stream_error(e).into()),
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
        let got = Digest(*hasher.finalize().as_bytes());
        if got != expected {
            return Err(Refusal::DigestMismatch { expected: expected.to_hex(), got: got.to_hex() });
        }
        let meta = out.metadata()?;
        if meta.permissions().mode() & 0o777 != mode {
            // The umask took bits away.
            out.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        Ok((got, StatKey::of(&meta)))
    }

    /// Renames a staged entry over `path`. An empty folder in the way is replaced; a folder with
    /// content never is.
    fn place(&mut self, staged: &Path, path: &str) -> Result<(), Refusal> {
        let dest = self.root.join(path);
        match fs::rename(staged, &dest) {
            Ok(()) => Ok(()),
            Err(e) if matches!(fs::symlink_metadata(&dest), Ok(m) if m.is_dir()) => {
                fs::remove_dir(&dest).map_err(|_| Refusal::FolderInTheWay)?;
                self.known_folders.remove(path);
                fs::rename(staged, &dest).map_err(|_| Refusal::Io(e))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn staged_path(&mut self) -> PathBuf {
        self.seq += 1;
        self.staging.join(format!("{}-{}", self.pid, self.seq))
    }

    /// Every parent of `path` must be a real folder (never a symlink): the write cannot leave the root.
    fn parents_are_folders(&self, path: &str) -> Result<(), Refusal> {
        for dir in relpath::ancestors(path) {
            match fs::symlink_metadata(self.root.join(dir)) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => return Err(Refusal::NotAFolder(dir.to_owned())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn prepare_parent(&mut self, path: &str) -> Result<(), Refusal> {
        match path.rfind('/') {
            Some(cut) => self.make_folders(&path[..cut]),
            None => Ok(()),
        }
    }

    /// Creates `path` and its parents as folders, refusing to pass through symlinks or files.
    fn make_folders(&mut self, path: &str) -> Result<(), Refusal> {
        if self.known_folders.contains(path) {
            return Ok(());
        }
        for dir in relpath::ancestors(path).chain(std::iter::once(path)) {
            if self.known_folders.contains(dir) {
                continue;
            }
            let abs = self.root.join(dir);
            match fs::symlink_metadata(&abs) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => return Err(Refusal::NotAFolder(dir.to_owned())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => match fs::create_dir(&abs) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e.into()),
                },
                Err(e) => return Err(e.into()),
            }
            self.known_folders.insert(dir.to_owned());
        }
        Ok(())
    }
}

fn entry_path<R: Read>(entry: &tar::Entry<'_, R>) -> Result<String, Refusal> {
    let bytes = entry.path_bytes();
    let path = std::str::from_utf8(&bytes).map_err(|_| Refusal::NotUtf8)?;
    let path = path.strip_suffix('/').unwrap_or(path);
    relpath::check(path)?;
    Ok(path.to_owned())
}

fn pax_digest<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Digest, Refusal> {
    let Some(extensions) = entry.pax_extensions()? else {
        return Err(Refusal::NoDigest);
    };
    for ext in extensions {
        let ext = ext?;
        if ext.key() == Ok(PAX_BLAKE3) {
            return ext.value().ok().and_then(Digest::from_hex).ok_or(Refusal::NoDigest);
        }
    }
    Err(Refusal::NoDigest)
}

fn file_mode(exec: bool) -> u32 {
    if exec {
        0o755
    } else {
        0o644
    }
}

fn refused(path: &str, refusal: Refusal) -> Problem {
    Problem { path: path.to_owned(), message: refusal.to_string() }
}

/// Errors reading the tar stream itself are marked so the batch stops instead of refusing one path.
#[derive(Debug)]
struct StreamError(io::Error);

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for StreamError {}

fn stream_error(e: io::Error) -> io::Error {
    io::Error::new(e.kind(), StreamError(e))
}

fn is_stream_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<StreamError>())
}
