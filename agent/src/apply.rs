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
//! [`relpath::check`]; every folder is resolved at the moment of use (a writer thread keeps the
//! one its previous file went into for the next files of the same group), beneath the root's own file
//! descriptor, without following any symlink (`openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS`, or one `O_NOFOLLOW` open per component where the kernel lacks it), and
//! every change is made relative to that folder's descriptor (`renameat`, `unlinkat`, `fchmod` of
//! a file opened without following links): a folder swapped for a symlink while a batch runs is
//! refused, not followed. Symlinks are created only in the form [`relpath::link_is_contained`]
//! accepts; devices, fifos and hard links are refused; entries above the size limit are refused.
//! A refused entry is reported by path and the rest of the batch goes on.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use tar::EntryType;

use crate::manifest::{Digest, Entry};
use crate::protocol::{Applied, Chmod, MAX_BATCH_ENTRIES, PAX_BLAKE3};
use crate::relpath::{self, PathError};
use crate::walk::Scanned;
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
    dest: Dest,
    /// The copy buffer of files streamed by the reading thread, kept across files.
    buf: Vec<u8>,
}

/// Where entries go, shared by the threads of one batch.
struct Dest {
    /// The root, opened once: every path is resolved beneath it.
    root_fd: OwnedFd,
    /// The staging folder, `.devloop/staging` (same file system as the root).
    staging: OwnedFd,
    seq: AtomicU64,
    /// This process's id, part of staged names (read once: it is a syscall).
    pid: u32,
    max_file_size: u64,
    /// Whether unnamed files (`O_TMPFILE`) and linking them in work here (overlayfs before Linux
    /// 6.6 and some others have no `O_TMPFILE`; without `CAP_DAC_READ_SEARCH` and `/proc` there
    /// is no way to link one in). Cleared at the first failure; the staging folder serves then.
    unnamed: AtomicBool,
}

/// Files up to this size are read whole from the stream and written by the batch's writer
/// threads; larger ones are streamed to disk by the reading thread itself.
const SMALL_FILE: u64 = 256 << 10;
/// Writer threads of a batch (spawned at its second small file). File creation waits on the file
/// system more than on the CPU, so more writers than cores pay off on real disks.
const WRITERS: usize = 4;
/// Small files go to the writers in groups of up to this many files or [`GROUP_BYTES`]: waking a
/// thread costs about as much as writing a small file, so it is paid once per group.
const GROUP_FILES: usize = 16;
const GROUP_BYTES: usize = 256 << 10;
/// Groups read and waiting for a writer: bounds a batch's memory to about
/// `(QUEUED + WRITERS) * (GROUP_BYTES + SMALL_FILE)`.
const QUEUED: usize = 4;

#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0}")]
    Path(#[from] PathError),
    #[error("path goes through a symlink or a file at `{0}`")]
    NotAFolder(String),
    #[error("symlink target `{0}` may point outside the root (targets must be `../`s then names, and stay inside)")]
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

impl From<rustix::io::Errno> for Refusal {
    fn from(e: rustix::io::Errno) -> Refusal {
        Refusal::Io(e.into())
    }
}

impl Applier {
    /// Opens the root and the staging folder, clearing what an interrupted batch left there. The
    /// caller holds the root's session lock (see `serve`): no other session is staging anything.
    pub fn new(root: &Path, max_file_size: u64) -> io::Result<Applier> {
        let root_fd = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        let reserved = reserved_folder(&root_fd)?;
        let staging = folder(&reserved, "staging", true).map_err(refusal_to_io)?;
        // Opened through the descriptor just checked: `.devloop` was resolved without symlinks.
        let path = PathBuf::from(format!("/proc/self/fd/{}", rustix::fd::AsRawFd::as_raw_fd(&staging)));
        for leftover in std::fs::read_dir(&path)? {
            let leftover = leftover?;
            let gone = match leftover.file_type()? {
                t if t.is_dir() => std::fs::remove_dir_all(leftover.path()),
                _ => std::fs::remove_file(leftover.path()),
            };
            match gone {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        let dest = Dest {
            root_fd,
            staging,
            seq: AtomicU64::new(0),
            pid: std::process::id(),
            max_file_size,
            unnamed: AtomicBool::new(true),
        };
        Ok(Applier { root: root.to_path_buf(), dest, buf: Vec::new() })
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
        let mut report = Applied { id, ..Applied::default() };
        let mut updates = Vec::new();

        // Deepest first (a folder after its content); each keeps its place in the batch.
        let mut deletes: Vec<(usize, &String)> = deletes.iter().enumerate().collect();
        deletes.sort_unstable_by(|a, b| b.1.cmp(a.1));
        for (at, path) in &deletes {
            match self.delete(path) {
                Ok(true) => {
                    report.deleted += 1;
                    updates.push(TreeUpdate::Remove((*path).clone()));
                }
                Ok(false) => updates.push(TreeUpdate::Remove((*path).clone())),
                Err(refusal) => report.refuse(*at, path, refusal.to_string()),
            }
        }
        for (i, chmod) in chmods.iter().enumerate() {
            match self.chmod(chmod) {
                Ok(()) => {}
                Err(refusal) => report.refuse(deletes.len() + i, &chmod.path, refusal.to_string()),
            }
        }

        let first_entry = deletes.len() + chmods.len();
        let incomplete = self.apply_entries(tar, first_entry, &mut report, &mut updates);
        report.micros = started.elapsed().as_micros() as u64;
        (report, incomplete, updates)
    }

    /// Applies the entries of the batch's tar stream in order; says why when the stream broke off.
    /// Small files are read whole and, from the second one on, handed to writer threads;
    /// everything else is applied by this thread.
    /// `first_entry` is the place in the batch of the stream's first entry.
    fn apply_entries(
        &mut self,
        tar: impl Read,
        first_entry: usize,
        report: &mut Applied,
        updates: &mut Vec<TreeUpdate>,
    ) -> Option<String> {
        let mut archive = tar::Archive::new(crate::targuard::Guard::new(tar));
        // With a seek the crate skips nothing it need not: see the guard's `Seek`.
        let entries = match archive.entries_with_seek() {
            Ok(entries) => entries,
            Err(e) => return Some(format!("the batch's tar stream is unreadable: {e}")),
        };
        // Results in stream order (writers finish out of order), for a stable report.
        let mut results: Vec<Written> = Vec::new();
        let (done_tx, done_rx) = mpsc::channel::<Vec<Written>>();
        let (dest, buf) = (&self.dest, &mut self.buf);
        let buffers = Buffers::default();
        let broke = std::thread::scope(|scope| {
            let mut writers: Option<Writers> = None;
            let mut group = Group::default();
            let mut small_seen = false;
            let mut broke = None;
            for (seq, entry) in entries.enumerate() {
                // The CLI never sends more; a stream of a million tiny refused entries would
                // make the answer grow without bound.
                if first_entry + seq >= MAX_BATCH_ENTRIES {
                    broke = Some(format!("the batch holds more than {MAX_BATCH_ENTRIES} entries"));
                    break;
                }
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
                        let shown: String = String::from_utf8_lossy(&entry.path_bytes()).chars().take(256).collect();
                        results.push((seq, shown, Err(refusal)));
                        continue;
                    }
                };
                let result = match small_file(&mut entry, dest.max_file_size, &buffers) {
                    // The first small file is written here: a one-file edit waits for no thread.
                    Ok(Some(file)) if !small_seen => {
                        small_seen = true;
                        let written = dest.write_small(&path, &file, &mut LastFolder::default());
                        buffers.give_back([file.content]);
                        written
                    }
                    Ok(Some(file)) => {
                        if group.add(seq, path, file) {
                            let writers =
                                writers.get_or_insert_with(|| Writers::start(scope, dest, &done_tx, &buffers));
                            writers.send(group.take());
                            results.extend(done_rx.try_iter().flatten());
                        }
                        continue;
                    }
                    Ok(None) => dest.entry(buf, &path, &mut entry),
                    Err(refusal) => Err(refusal),
                };
                match result {
                    Err(Refusal::Io(e)) if is_stream_error(&e) => {
                        broke = Some(format!("the batch's tar stream broke off at `{path}`: {e}"));
                        break;
                    }
                    result => results.push((seq, path, result)),
                }
            }
            // The last group; the writers finish what they were handed (all of it arrived
            // whole) before the batch is reported.
            if !group.files.is_empty() {
                writers.get_or_insert_with(|| Writers::start(scope, dest, &done_tx, &buffers)).send(group.take());
            }
            drop(writers);
            broke
        });
        drop(done_tx);
        results.extend(done_rx.try_iter().flatten());
        results.sort_unstable_by_key(|(seq, _, _)| *seq);
        for (seq, path, result) in results {
            match result {
                Ok(scanned) => {
                    report.written += 1;
                    report.bytes += scanned.entry.size();
                    updates.push(TreeUpdate::Put(path, scanned));
                }
                Err(refusal) => report.refuse(first_entry + seq, &path, refusal.to_string()),
            }
        }
        broke
    }

    /// Removes one path; `Ok(false)` when it was already gone.
    fn delete(&mut self, path: &str) -> Result<bool, Refusal> {
        relpath::check(path)?;
        let (parent, name) = split(path);
        let dir = match self.folder(parent, false) {
            Ok(dir) => dir,
            Err(Refusal::Io(e)) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(refusal) => return Err(refusal),
        };
        let stat = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(rustix::io::Errno::NOENT) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let flags = if FileType::from_raw_mode(stat.st_mode).is_dir() { AtFlags::REMOVEDIR } else { AtFlags::empty() };
        match rustix::fs::unlinkat(&dir, name, flags) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Sets the exec bit of a regular file, opened without following a symlink.
    fn chmod(&self, chmod: &Chmod) -> Result<(), Refusal> {
        relpath::check(&chmod.path)?;
        let (parent, name) = split(&chmod.path);
        let dir = self.folder(parent, false)?;
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
        let file = match rustix::fs::openat(&dir, name, flags, Mode::empty()) {
            Ok(file) => file,
            Err(rustix::io::Errno::LOOP) => return Err(Refusal::Kind("exec-bit changes of non-file")),
            Err(e) => return Err(e.into()),
        };
        if !FileType::from_raw_mode(rustix::fs::fstat(&file)?.st_mode).is_file() {
            return Err(Refusal::Kind("exec-bit changes of non-file"));
        }
        // The content is unchanged, so the agent's digest stays valid; the ctime moves, so the
        // stat cache hashes the file once more next time.
        rustix::fs::fchmod(&file, Mode::from_raw_mode(file_mode(chmod.exec)))?;
        Ok(())
    }

    /// The folder `path` (the root for ""), resolved beneath the root without following any
    /// symlink; created with its parents when `create`.
    fn folder(&self, path: &str, create: bool) -> Result<OwnedFd, Refusal> {
        folder(&self.dest.root_fd, path, create)
    }
}

impl Dest {
    /// Applies one entry this thread reads to its end (folders, symlinks, large files); `buf` is
    /// the copy buffer, kept across files.
    fn entry<R: Read>(&self, buf: &mut Vec<u8>, path: &str, entry: &mut tar::Entry<'_, R>) -> Result<Scanned, Refusal> {
        let header = entry.header();
        match header.entry_type() {
            EntryType::Directory => {
                self.folder(path, true)?;
                Ok(Scanned { entry: Entry::Dir, stat: None })
            }
            EntryType::Regular | EntryType::Continuous => {
                let size = header.size()?;
                if size > self.max_file_size {
                    return Err(Refusal::TooLarge { size, max: self.max_file_size });
                }
                let exec = header.mode()? & 0o111 != 0;
                let expected = pax_digest(entry)?;
                let staged = self.staged_name();
                let result = self.write_file(buf, &staged, entry, expected, exec).and_then(|digest| {
                    self.place(&staged, path)?;
                    Ok(Scanned { entry: Entry::File { hash: digest, size, exec }, stat: None })
                });
                if result.is_err() {
                    let _ = rustix::fs::unlinkat(&self.staging, &staged, AtFlags::empty());
                }
                result
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or(Refusal::Kind("symlink without target"))?;
                let target = std::str::from_utf8(&target).map_err(|_| Refusal::NotUtf8)?.to_owned();
                if !relpath::link_is_contained(path, &target) {
                    return Err(Refusal::LinkOutside(target.chars().take(256).collect()));
                }
                let staged = self.staged_name();
                rustix::fs::symlinkat(target.as_str(), &self.staging, &staged)?;
                let placed = self.place(&staged, path);
                if placed.is_err() {
                    let _ = rustix::fs::unlinkat(&self.staging, &staged, AtFlags::empty());
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

    /// Writes the entry's content to `staged` and checks its digest; returns the digest. (No
    /// stat is cached for a file just written: it is too fresh to trust, see
    /// [`crate::walk::Stat::settled`]; the next walk hashes it once it has settled.)
    fn write_file<R: Read>(
        &self,
        buf: &mut Vec<u8>,
        staged: &str,
        entry: &mut tar::Entry<'_, R>,
        expected: Digest,
        exec: bool,
    ) -> Result<Digest, Refusal> {
        let mode = file_mode(exec);
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut out = File::from(rustix::fs::openat(&self.staging, staged, flags, Mode::from_raw_mode(mode))?);
        let mut hasher = blake3::Hasher::new();
        buf.resize(256 << 10, 0);
        loop {
            let n = match entry.read(buf) {
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
        fix_mode(&out, mode)?;
        Ok(got)
    }

    /// Writes a small file that arrived whole: checked against its digest before anything is
    /// written, then created unnamed in its folder and linked in under its name (a new file), or
    /// staged and renamed over what is there. Either way a reader sees the whole file or none.
    /// `last` is the folder the previous file of the caller's group went into (a batch comes
    /// folder by folder): kept, it saves resolving the same folder again for each file. (No stat
    /// is cached for the file, as in [`Dest::write_file`].)
    fn write_small(&self, path: &str, file: &SmallFile, last: &mut LastFolder) -> Result<Scanned, Refusal> {
        let got = Digest::of(&file.content);
        if got != file.expected {
            return Err(Refusal::DigestMismatch { expected: file.expected.to_hex(), got: got.to_hex() });
        }
        let (parent, name) = split(path);
        let mode = file_mode(file.exec);
        let kept = last.holds(parent);
        match self.create(last.open(self, parent)?, name, &file.content, mode) {
            // The folder kept from the previous file may have been removed since (a removed folder
            // answers ENOENT or EPERM, by file system): resolved (and made) anew, once.
            Err(_) if kept => {
                last.forget();
                self.create(last.open(self, parent)?, name, &file.content, mode)?
            }
            created => created?,
        }
        let size = file.content.len() as u64;
        Ok(Scanned { entry: Entry::File { hash: got, size, exec: file.exec }, stat: None })
    }

    /// Creates the file `name` in `dir` with `content`, unnamed and linked in where this file
    /// system can, else staged and renamed.
    fn create(&self, dir: &OwnedFd, name: &str, content: &[u8], mode: u32) -> Result<(), Refusal> {
        if !(self.unnamed.load(Ordering::Relaxed) && self.write_unnamed(dir, name, content, mode)?) {
            self.write_staged(dir, name, content, mode)?;
        }
        Ok(())
    }

    /// `O_TMPFILE` in the destination folder, linked in; `false` when this file system or
    /// sandbox cannot (then the staging folder serves from now on).
    fn write_unnamed(&self, dir: &OwnedFd, name: &str, content: &[u8], mode: u32) -> Result<bool, Refusal> {
        let flags = OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC;
        let out = match rustix::fs::openat(dir, ".", flags, Mode::from_raw_mode(mode)) {
            Ok(fd) => File::from(fd),
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR | rustix::io::Errno::INVAL) => {
                self.unnamed.store(false, Ordering::Relaxed);
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        (&out).write_all(content)?;
        fix_mode(&out, mode)?;
        match link_unnamed(&out, dir, name) {
            Ok(true) => Ok(true),
            Ok(false) => {
                self.unnamed.store(false, Ordering::Relaxed);
                Ok(false)
            }
            // Something is there already: link into staging, then rename over it.
            Err(rustix::io::Errno::EXIST) => {
                let staged = self.staged_name();
                let placed = match link_unnamed(&out, &self.staging, &staged) {
                    Ok(true) => self.place_in(&staged, dir, name),
                    Ok(false) => Err(Refusal::Io(io::ErrorKind::Unsupported.into())),
                    Err(e) => Err(e.into()),
                };
                if placed.is_err() {
                    let _ = rustix::fs::unlinkat(&self.staging, &staged, AtFlags::empty());
                }
                placed.map(|()| true)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A named file in the staging folder, renamed over `name` in `dir`.
    fn write_staged(&self, dir: &OwnedFd, name: &str, content: &[u8], mode: u32) -> Result<(), Refusal> {
        let staged = self.staged_name();
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let result = (|| {
            let out = File::from(rustix::fs::openat(&self.staging, &staged, flags, Mode::from_raw_mode(mode))?);
            (&out).write_all(content)?;
            fix_mode(&out, mode)?;
            self.place_in(&staged, dir, name)
        })();
        if result.is_err() {
            let _ = rustix::fs::unlinkat(&self.staging, &staged, AtFlags::empty());
        }
        result
    }

    /// Renames a staged entry over `path`, in its parent folder resolved now. An empty folder in
    /// the way is replaced; a folder with content never is.
    fn place(&self, staged: &str, path: &str) -> Result<(), Refusal> {
        let (parent, name) = split(path);
        let dir = self.folder(parent, true)?;
        self.place_in(staged, &dir, name)
    }

    /// [`Dest::place`] into the folder `dir`, resolved by the caller.
    fn place_in(&self, staged: &str, dir: &OwnedFd, name: &str) -> Result<(), Refusal> {
        match rustix::fs::renameat(&self.staging, staged, dir, name) {
            Ok(()) => Ok(()),
            Err(e @ (rustix::io::Errno::ISDIR | rustix::io::Errno::NOTEMPTY | rustix::io::Errno::EXIST)) => {
                let in_the_way = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| FileType::from_raw_mode(st.st_mode).is_dir());
                if !in_the_way {
                    return Err(e.into());
                }
                rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(|_| Refusal::FolderInTheWay)?;
                rustix::fs::renameat(&self.staging, staged, dir, name)?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn staged_name(&self) -> String {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{}-{seq}", self.pid)
    }

    fn folder(&self, path: &str, create: bool) -> Result<OwnedFd, Refusal> {
        folder(&self.root_fd, path, create)
    }
}

/// Links an unnamed file in as `name` in `dir`. `Ok(false)` when this process cannot link one
/// (`AT_EMPTY_PATH` needs `CAP_DAC_READ_SEARCH`; the `/proc` route needs `/proc`).
fn link_unnamed(file: &File, dir: &OwnedFd, name: &str) -> Result<bool, rustix::io::Errno> {
    match rustix::fs::linkat(file, "", dir, name, AtFlags::EMPTY_PATH) {
        Ok(()) => return Ok(true),
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::PERM) => {}
        Err(e) => return Err(e),
    }
    let magic = format!("/proc/self/fd/{}", rustix::fd::AsRawFd::as_raw_fd(file));
    match rustix::fs::linkat(rustix::fs::CWD, magic.as_str(), dir, name, AtFlags::SYMLINK_FOLLOW) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::PERM | rustix::io::Errno::ACCESS) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Sets the mode the umask took bits away from.
fn fix_mode(file: &File, mode: u32) -> io::Result<()> {
    if umask() & mode == 0 {
        return Ok(());
    }
    if std::os::unix::fs::PermissionsExt::mode(&file.metadata()?.permissions()) & 0o777 != mode {
        rustix::fs::fchmod(file, Mode::from_raw_mode(mode))?;
    }
    Ok(())
}

/// This process's umask, read once from `/proc/self/status` (the `umask` call would set it,
/// racing the writer threads); unknown counts as one that takes every bit.
fn umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let line = status.lines().find_map(|l| l.strip_prefix("Umask:"));
        line.and_then(|v| u32::from_str_radix(v.trim(), 8).ok()).unwrap_or(0o777)
    })
}

/// A small file read whole from the stream, for a writer thread.
struct SmallFile {
    content: Vec<u8>,
    expected: Digest,
    exec: bool,
}

/// What became of one entry: its place in the stream, its path, and the outcome.
type Written = (usize, String, Result<Scanned, Refusal>);

/// Reads a small regular file's content and digest from the stream; `None` for any other entry.
fn small_file<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    max_file_size: u64,
    buffers: &Buffers,
) -> Result<Option<SmallFile>, Refusal> {
    let header = entry.header();
    if !matches!(header.entry_type(), EntryType::Regular | EntryType::Continuous) {
        return Ok(None);
    }
    let size = header.size()?;
    if size > SMALL_FILE || size > max_file_size {
        return Ok(None);
    }
    let exec = header.mode()? & 0o111 != 0;
    let expected = pax_digest(entry)?;
    let mut content = buffers.take(size as usize);
    if let Err(e) = entry.read_exact(&mut content) {
        buffers.give_back([content]);
        return Err(Refusal::Io(stream_error(e)));
    }
    Ok(Some(SmallFile { content, expected, exec }))
}

/// The content buffers of small files: given back once a file is written and taken again for the
/// next one read, so that a file is read into memory that needs neither allocating nor zeroing
/// (a buffer that held a file is overwritten in place). One batch's; at most [`KEPT_BYTES`] kept.
#[derive(Default)]
struct Buffers(Mutex<(Vec<Vec<u8>>, usize)>);

/// What [`Buffers`] keeps: about the content of the groups a batch has in flight.
const KEPT_BYTES: usize = QUEUED * GROUP_BYTES;

impl Buffers {
    /// A buffer of `size` bytes to overwrite (only the part no file ever filled is zeroed).
    fn take(&self, size: usize) -> Vec<u8> {
        let mut buf = {
            let mut kept = self.0.lock().expect("buffers poisoned");
            let buf = kept.0.pop().unwrap_or_default();
            kept.1 -= buf.capacity();
            buf
        };
        buf.resize(size, 0);
        buf
    }

    fn give_back(&self, bufs: impl IntoIterator<Item = Vec<u8>>) {
        let mut kept = self.0.lock().expect("buffers poisoned");
        for buf in bufs {
            if kept.1 + buf.capacity() <= KEPT_BYTES {
                kept.1 += buf.capacity();
                kept.0.push(buf);
            }
        }
    }
}

/// Small files read whole, waiting to go to a writer together.
#[derive(Default)]
struct Group {
    files: Vec<(usize, String, SmallFile)>,
    bytes: usize,
}

impl Group {
    /// Adds a file; whether the group is full.
    fn add(&mut self, seq: usize, path: String, file: SmallFile) -> bool {
        self.bytes += file.content.len();
        self.files.push((seq, path, file));
        self.files.len() >= GROUP_FILES || self.bytes >= GROUP_BYTES
    }

    fn take(&mut self) -> Vec<(usize, String, SmallFile)> {
        self.bytes = 0;
        std::mem::take(&mut self.files)
    }
}

/// The folder a writer's previous file went into, by its path in the root: resolved beneath the
/// root (no symlink followed) for the first file of a group that goes there, kept for the next
/// ones. A folder swapped for a symlink meanwhile is not followed: the descriptor is the folder.
#[derive(Default)]
struct LastFolder(Option<(String, OwnedFd)>);

impl LastFolder {
    fn holds(&self, parent: &str) -> bool {
        self.0.as_ref().is_some_and(|(path, _)| path == parent)
    }

    /// The folder `parent`, kept or resolved now (made if missing).
    fn open(&mut self, dest: &Dest, parent: &str) -> Result<&OwnedFd, Refusal> {
        if !self.holds(parent) {
            self.0 = None;
            self.0 = Some((parent.to_owned(), dest.folder(parent, true)?));
        }
        Ok(&self.0.as_ref().expect("just kept").1)
    }

    fn forget(&mut self) {
        self.0 = None;
    }
}

/// The writer threads of one batch, fed groups of files through a short queue.
struct Writers {
    tx: mpsc::SyncSender<Vec<(usize, String, SmallFile)>>,
}

impl Writers {
    fn start<'scope>(
        scope: &'scope std::thread::Scope<'scope, '_>,
        dest: &'scope Dest,
        done: &mpsc::Sender<Vec<Written>>,
        buffers: &'scope Buffers,
    ) -> Writers {
        let (tx, rx) = mpsc::sync_channel::<Vec<(usize, String, SmallFile)>>(QUEUED);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..WRITERS {
            let (rx, done) = (Arc::clone(&rx), done.clone());
            scope.spawn(move || loop {
                let job = rx.lock().expect("writer queue poisoned").recv();
                let Ok(files) = job else { break };
                let mut last = LastFolder::default();
                let mut written = Vec::with_capacity(files.len());
                let mut contents = Vec::with_capacity(files.len());
                for (seq, path, file) in files {
                    let result = dest.write_small(&path, &file, &mut last);
                    contents.push(file.content);
                    written.push((seq, path, result));
                }
                buffers.give_back(contents);
                if done.send(written).is_err() {
                    break;
                }
            });
        }
        Writers { tx }
    }

    fn send(&self, files: Vec<(usize, String, SmallFile)>) {
        // The writers end only when this sender is dropped.
        let _ = self.tx.send(files);
    }
}

/// The reserved folder `.devloop` of the root, created if missing, never through a symlink.
pub(crate) fn reserved_folder(root_fd: &OwnedFd) -> io::Result<OwnedFd> {
    folder(root_fd, RESERVED_DIR, true).map_err(refusal_to_io)
}

/// Opens `path` beneath `base` as a folder, following no symlink; creates missing folders when
/// `create`. A symlink or a file on the way is [`Refusal::NotAFolder`].
fn folder(base: &OwnedFd, path: &str, create: bool) -> Result<OwnedFd, Refusal> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let target = if path.is_empty() { "." } else { path };
    for _ in 0..8 {
        match rustix::fs::openat2(base, target, flags, Mode::empty(), resolve) {
            Ok(fd) => return Ok(fd),
            // The kernel asks for a retry when a rename raced the lookup.
            Err(rustix::io::Errno::AGAIN) => continue,
            Err(rustix::io::Errno::NOENT) if !create => return Err(Refusal::Io(io::ErrorKind::NotFound.into())),
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR | rustix::io::Errno::XDEV) => {
                return Err(Refusal::NotAFolder(first_non_folder(base, path)))
            }
            // Missing folders to create, or no openat2 (older kernels, seccomp profiles that
            // refuse it): one component at a time.
            Err(_) => break,
        }
    }
    let mut dir = rustix::io::fcntl_dupfd_cloexec(base, 0)?;
    for (end, name) in components(path) {
        let opened = match rustix::fs::openat(&dir, name, flags, Mode::empty()) {
            Err(rustix::io::Errno::NOENT) if create => {
                match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                rustix::fs::openat(&dir, name, flags, Mode::empty())
            }
            other => other,
        };
        dir = match opened {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Err(Refusal::Io(io::ErrorKind::NotFound.into())),
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                return Err(Refusal::NotAFolder(path[..end].to_owned()))
            }
            Err(e) => return Err(e.into()),
        };
    }
    Ok(dir)
}

/// For the error message: the first component of `path` that is not a folder.
fn first_non_folder(base: &OwnedFd, path: &str) -> String {
    for (end, _) in components(path) {
        let is_dir = rustix::fs::statat(base, &path[..end], AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|st| FileType::from_raw_mode(st.st_mode).is_dir());
        if !is_dir {
            return path[..end].to_owned();
        }
    }
    path.to_owned()
}

/// The components of a checked relative path, each with the end of the prefix it closes.
fn components(path: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut start = 0;
    path.split('/').filter(|c| !c.is_empty()).map(move |name| {
        let begin = path[start..].find(name).map_or(start, |i| start + i);
        start = begin + name.len();
        (start, name)
    })
}

/// `a/b/c` → (`a/b`, `c`); `c` → (``, `c`).
fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(cut) => (&path[..cut], &path[cut + 1..]),
        None => ("", path),
    }
}

fn refusal_to_io(refusal: Refusal) -> io::Error {
    match refusal {
        Refusal::Io(e) => e,
        other => io::Error::other(other.to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn small(content: &[u8]) -> SmallFile {
        SmallFile { content: content.to_vec(), expected: Digest::of(content), exec: false }
    }

    /// A writer keeps the folder of its previous file: removed since, it is made anew; swapped
    /// for a symlink to outside since, the file goes into the folder itself, never outside.
    #[test]
    fn the_folder_kept_from_the_previous_file_is_the_folder_itself() {
        let dir = tempfile::tempdir().unwrap();
        let (root, outside) = (dir.path().join("root"), dir.path().join("outside"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let applier = Applier::new(&root, DEFAULT_MAX_FILE_SIZE).unwrap();
        let dest = &applier.dest;
        let mut last = LastFolder::default();

        dest.write_small("d/a", &small(b"a"), &mut last).unwrap();
        assert!(last.holds("d"));
        std::fs::remove_dir_all(root.join("d")).unwrap();
        dest.write_small("d/b", &small(b"b"), &mut last).unwrap();
        assert_eq!(std::fs::read(root.join("d/b")).unwrap(), b"b", "the removed folder was made again");

        std::fs::rename(root.join("d"), root.join("d.real")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("d")).unwrap();
        dest.write_small("d/c", &small(b"c"), &mut last).unwrap();
        assert_eq!(std::fs::read(root.join("d.real/c")).unwrap(), b"c");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "nothing written outside");

        // A new writer (or the next group) resolves the path again: the symlink is refused.
        let refused = dest.write_small("d/e", &small(b"e"), &mut LastFolder::default());
        assert!(matches!(refused, Err(Refusal::NotAFolder(_))), "{refused:?}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }
}
