//! Packing a batch: the upserts of a sync as one tar stream, written into any sink chunk by chunk
//! (the session turns chunks into data frames). Never the whole batch in memory.
//!
//! Each regular file's blake3 goes into its PAX header, computed from the very bytes packed, so
//! the agent can verify what arrived and the session knows exactly what the target now holds.

use std::io::{self, Read, Seek, Write};
use std::os::fd::OwnedFd;
use std::path::Path;

use devloop_agent::beneath::{OpenError, Opened};

use devloop_agent::manifest::{Digest, Entry};
use devloop_agent::protocol::{Problem, PAX_BLAKE3};
use devloop_agent::walk::StatKey;
use tar::{EntryType, Header};

/// Files up to this size are read once into memory; larger ones are read twice (hash, then send).
const READ_ONCE_LIMIT: u64 = 4 << 20;

/// What went into the stream.
#[derive(Debug, Default)]
pub struct Packed {
    /// Paths packed with the entry as packed (the digest of the bytes sent).
    pub sent: Vec<(String, Entry)>,
    /// Paths that vanished or could not be read; left for the next round.
    pub skipped: Vec<Problem>,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("the transport stopped taking the batch: {0}")]
    Sink(#[source] io::Error),
}

/// One path to pack: its entry as scanned, and the stat it was hashed at (for files).
pub type Upsert = (String, Entry, Option<StatKey>);

/// Where a batch is packed: any `Write`, which may also take a file's bytes straight from its
/// descriptor into its own buffer ([`ChunkWriter`] does: one copy of each byte, not two).
pub trait Sink: Write {
    /// Writes exactly `size` bytes read from `file` at its offset: the file's, then zeros if it
    /// ends sooner (the agent's digest check refuses such a file; the stream stays well-formed).
    fn fill_from(&mut self, file: &mut std::fs::File, size: u64) -> io::Result<()> {
        io::copy(&mut ExactSize { inner: file.take(size), remaining: size }, self).map(drop)
    }
}

impl Sink for Vec<u8> {}

impl<S: Sink + ?Sized> Sink for &mut S {
    fn fill_from(&mut self, file: &mut std::fs::File, size: u64) -> io::Result<()> {
        (**self).fill_from(file, size)
    }
}

/// Packs `upserts` (paths relative to `root`) into `sink`. `progress` is told of every byte packed.
pub fn pack<W: Sink>(root: &Path, upserts: &[Upsert], sink: W, progress: &dyn Fn(u64)) -> Result<Packed, PackError> {
    let mut builder = tar::Builder::new(sink);
    builder.mode(tar::HeaderMode::Deterministic);
    let mut packed = Packed::default();
    // Files are opened beneath the root's descriptor, following no symlink on the way: a folder
    // swapped for a symlink to outside the tree since the scan is never read through.
    let root_dir = devloop_agent::beneath::open_root(root);
    for (path, entry, stat) in upserts {
        let result = match entry {
            Entry::Dir => append_dir(&mut builder, path).map(|()| Some(Entry::Dir)),
            Entry::Symlink { target } => {
                append_symlink(&mut builder, path, target).map(|()| Some(Entry::Symlink { target: target.clone() }))
            }
            Entry::File { exec, .. } => match &root_dir {
                Ok(dir) => append_file(&mut builder, dir, path, *exec, *stat, entry.digest()),
                Err(e) => {
                    Err(Failure::Read(io::Error::new(e.kind(), format!("cannot open the folder being synced: {e}"))))
                }
            },
        };
        match result {
            Ok(Some(entry)) => {
                packed.bytes += entry.size();
                progress(entry.size());
                packed.sent.push((path.clone(), entry));
            }
            Ok(None) => {
                packed.skipped.push(Problem { path: path.clone(), message: "vanished before it was sent".into() })
            }
            Err(Failure::Read(e)) => packed.skipped.push(Problem { path: path.clone(), message: e.to_string() }),
            Err(Failure::Sink(e)) => return Err(PackError::Sink(e)),
        }
    }
    builder.into_inner().map_err(PackError::Sink)?;
    Ok(packed)
}

enum Failure {
    /// Reading the local file failed: skip it.
    Read(io::Error),
    /// Writing to the sink failed: the batch is over.
    Sink(io::Error),
}

fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(0);
    header
}

fn append_dir<W: Sink>(builder: &mut tar::Builder<W>, path: &str) -> Result<(), Failure> {
    let mut h = header(EntryType::Directory, 0o755, 0);
    builder.append_data(&mut h, path, io::empty()).map_err(Failure::Sink)
}

fn append_symlink<W: Sink>(builder: &mut tar::Builder<W>, path: &str, target: &str) -> Result<(), Failure> {
    let mut h = header(EntryType::Symlink, 0o777, 0);
    builder.append_link(&mut h, path, target).map_err(Failure::Sink)
}

/// Packs the regular file `path` as it is now (`scanned`: the stat the scan hashed it at, whose
/// digest `known` is taken when the file still has it). `None` when it vanished or changed type
/// since: the session looks at it again.
fn append_file<W: Sink>(
    builder: &mut tar::Builder<W>,
    root: &OwnedFd,
    path: &str,
    exec: bool,
    scanned: Option<StatKey>,
    known: Option<Digest>,
) -> Result<Option<Entry>, Failure> {
    let Opened { mut file, stat } = match devloop_agent::beneath::open_file(root, path) {
        Ok(opened) => opened,
        Err(OpenError::Io(e)) if e.kind() == io::ErrorKind::NotFound || is_changed_type(&e) => return Ok(None),
        Err(OpenError::NotRegular(_)) => return Ok(None),
        Err(OpenError::Io(e)) => return Err(Failure::Read(e)),
    };
    let full = devloop_agent::walk::Stat::of_stat(&stat);
    // Unchanged since the scan (another file renamed over it changes the key too): the scan's
    // digest holds. Otherwise the content is hashed as it is read.
    let now = full.key();
    let mode = if exec { 0o755 } else { 0o644 };
    // The open file still has the stat the scan hashed it at: its digest is known, one pass less.
    // (A write racing this read makes the agent's digest check refuse it; the watcher resends.)
    if let (Some(digest), true) = (known, scanned == Some(now)) {
        builder.append_pax_extensions([(PAX_BLAKE3, digest.to_hex().as_bytes())]).map_err(Failure::Sink)?;
        let mut h = header(EntryType::Regular, mode, full.size);
        append_from_file(builder, &mut h, path, &mut file, full.size).map_err(Failure::Sink)?;
        return Ok(Some(Entry::File { hash: digest, size: full.size, exec }));
    }
    if full.size <= READ_ONCE_LIMIT {
        let mut content = Vec::with_capacity(full.size as usize);
        file.read_to_end(&mut content).map_err(Failure::Read)?;
        let digest = Digest::of(&content);
        builder.append_pax_extensions([(PAX_BLAKE3, digest.to_hex().as_bytes())]).map_err(Failure::Sink)?;
        let mut h = header(EntryType::Regular, mode, content.len() as u64);
        append_bytes(builder, &mut h, path, &content).map_err(Failure::Sink)?;
        return Ok(Some(Entry::File { hash: digest, size: content.len() as u64, exec }));
    }
    // Hashed, then read again from the start through the same descriptor.
    let (digest, hashed_size) = devloop_agent::walk::hash_reader(&mut file).map_err(Failure::Read)?;
    file.seek(io::SeekFrom::Start(0)).map_err(Failure::Read)?;
    builder.append_pax_extensions([(PAX_BLAKE3, digest.to_hex().as_bytes())]).map_err(Failure::Sink)?;
    let mut h = header(EntryType::Regular, mode, hashed_size);
    // If the file changes between the two reads the agent's digest check refuses it, and the
    // watcher's next hint sends it again. The stream itself stays well-formed either way.
    let exact = ExactSize { inner: file.take(hashed_size), remaining: hashed_size };
    builder.append_data(&mut h, path, exact).map_err(Failure::Sink)?;
    Ok(Some(Entry::File { hash: digest, size: hashed_size, exec }))
}

/// Appends a regular file's entry whose `size` bytes are read from `file` straight into the
/// sink. A path that fits the header is written here; a longer one takes the tar crate's way
/// (its GNU long-name entry first).
fn append_from_file<W: Sink>(
    builder: &mut tar::Builder<W>,
    h: &mut Header,
    path: &str,
    file: &mut std::fs::File,
    size: u64,
) -> io::Result<()> {
    if h.set_path(path).is_err() {
        let exact = ExactSize { inner: file.take(size), remaining: size };
        return builder.append_data(h, path, exact);
    }
    h.set_cksum();
    let sink = builder.get_mut();
    sink.write_all(h.as_bytes())?;
    sink.fill_from(file, size)?;
    pad_block(sink, size)
}

/// [`append_from_file`] of bytes at hand: written into the sink in one piece.
fn append_bytes<W: Sink>(builder: &mut tar::Builder<W>, h: &mut Header, path: &str, content: &[u8]) -> io::Result<()> {
    if h.set_path(path).is_err() {
        return builder.append_data(h, path, content);
    }
    h.set_cksum();
    let sink = builder.get_mut();
    sink.write_all(h.as_bytes())?;
    sink.write_all(content)?;
    pad_block(sink, content.len() as u64)
}

/// Entries take whole 512-byte blocks: zeros after `size` bytes up to the next one.
fn pad_block(sink: &mut impl Write, size: u64) -> io::Result<()> {
    let pad = (512 - size % 512) % 512;
    sink.write_all(&[0; 512][..pad as usize])
}

/// A path that stopped being reachable as scanned: something on the way is no longer a folder.
fn is_changed_type(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR))
}

/// Yields exactly `remaining` bytes: the file's, then zeros if it shrank.
struct ExactSize<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for ExactSize<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.remaining as usize);
        let n = match self.inner.read(&mut buf[..want])? {
            0 => {
                buf[..want].fill(0);
                want
            }
            n => n,
        };
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// A `Write` that hands out fixed-size chunks to a callback (which may block).
pub struct ChunkWriter<F: FnMut(Vec<u8>) -> io::Result<()>> {
    buf: Vec<u8>,
    chunk: usize,
    emit: F,
}

impl<F: FnMut(Vec<u8>) -> io::Result<()>> ChunkWriter<F> {
    pub fn new(chunk: usize, emit: F) -> Self {
        ChunkWriter { buf: Vec::with_capacity(chunk), chunk, emit }
    }
}

impl<F: FnMut(Vec<u8>) -> io::Result<()>> Write for ChunkWriter<F> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.chunk - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.chunk {
            let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk));
            (self.emit)(full)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            (self.emit)(rest)?;
        }
        Ok(())
    }
}

impl<F: FnMut(Vec<u8>) -> io::Result<()>> Sink for ChunkWriter<F> {
    /// Reads into the chunk's free room itself: the kernel's copy is the only one.
    fn fill_from(&mut self, file: &mut std::fs::File, size: u64) -> io::Result<()> {
        let mut left = size;
        while left > 0 {
            if self.buf.len() == self.chunk {
                let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk));
                (self.emit)(full)?;
            }
            let room = (self.chunk - self.buf.len()).min(usize::try_from(left).unwrap_or(usize::MAX));
            let spare = &mut self.buf.spare_capacity_mut()[..room];
            let got = match rustix::io::read(&*file, spare) {
                Ok((read, _)) => read.len(),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            if got == 0 {
                // The file ended sooner than its stat said: zeros keep the entry's size.
                let zeros = self.buf.len() + room;
                self.buf.resize(zeros, 0);
                left -= room as u64;
                continue;
            }
            // SAFETY: the kernel wrote `got` bytes at the start of the spare capacity.
            unsafe { self.buf.set_len(self.buf.len() + got) };
            left -= got as u64;
        }
        Ok(())
    }
}

impl<F: FnMut(Vec<u8>) -> io::Result<()>> Drop for ChunkWriter<F> {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn packs_files_links_and_folders_with_digests() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::write(dir.path().join("d/a.txt"), "alpha").unwrap();
        let long = format!("{}/b.txt", "x".repeat(150));
        fs::create_dir(dir.path().join("x".repeat(150))).unwrap();
        fs::write(dir.path().join(&long), "beta").unwrap();
        // a.txt was scanned at another stat: its stale digest is not trusted. b.txt's stat matches.
        let b_stat = devloop_agent::walk::Stat::of(&fs::metadata(dir.path().join(&long)).unwrap()).key();
        let upserts = vec![
            ("d".to_string(), Entry::Dir, None),
            ("d/a.txt".to_string(), Entry::File { hash: Digest::of(b"stale"), size: 5, exec: true }, None),
            ("gone.txt".to_string(), Entry::File { hash: Digest::of(b""), size: 0, exec: false }, None),
            ("link".to_string(), Entry::Symlink { target: "d/a.txt".into() }, None),
            (long.clone(), Entry::File { hash: Digest::of(b"beta"), size: 4, exec: false }, Some(b_stat)),
        ];
        let mut out = Vec::new();
        let packed = pack(dir.path(), &upserts, &mut out, &|_| {}).unwrap();
        assert_eq!(packed.bytes, 9);
        assert_eq!(packed.skipped.len(), 1);
        // The digest sent is the digest of the bytes packed, not the stale one from the scan.
        assert_eq!(packed.sent[1], ("d/a.txt".into(), Entry::File { hash: Digest::of(b"alpha"), size: 5, exec: true }));

        let mut archive = tar::Archive::new(out.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = String::from_utf8(entry.path_bytes().to_vec()).unwrap();
            let digest = entry
                .pax_extensions()
                .unwrap()
                .map(|exts| exts.flatten().find(|e| e.key() == Ok(PAX_BLAKE3)).unwrap().value().unwrap().to_string());
            seen.push((path, entry.header().entry_type(), digest));
        }
        assert_eq!(seen[0], ("d".into(), EntryType::Directory, None));
        assert_eq!(seen[1], ("d/a.txt".into(), EntryType::Regular, Some(Digest::of(b"alpha").to_hex())));
        assert_eq!(seen[2].1, EntryType::Symlink);
        assert_eq!(seen[3].0, long);
    }

    /// Files read straight into the chunks (their digests known from the scan) make the same
    /// stream as any tar writer would: whole blocks, any size, across chunk boundaries.
    #[test]
    fn files_read_into_the_chunks_make_a_well_formed_stream() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [0usize, 1, 511, 512, 513, 3000, 10_000];
        let mut upserts = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let body: Vec<u8> = (0..*size).map(|b| (b * 7 + i) as u8).collect();
            let name = format!("f{i}.bin");
            fs::write(dir.path().join(&name), &body).unwrap();
            let stat = devloop_agent::walk::Stat::of(&fs::metadata(dir.path().join(&name)).unwrap()).key();
            upserts.push((name, Entry::File { hash: Digest::of(&body), size: *size as u64, exec: false }, Some(stat)));
        }
        let mut chunks = Vec::new();
        let packed = {
            let sink = ChunkWriter::new(1000, |c| {
                assert!(c.len() <= 1000);
                chunks.push(c);
                Ok(())
            });
            pack(dir.path(), &upserts, sink, &|_| {}).unwrap()
        };
        assert_eq!(packed.sent.len(), sizes.len());
        let stream = chunks.concat();
        let mut archive = tar::Archive::new(stream.as_slice());
        let mut seen = 0;
        for (entry, (name, expected, _)) in archive.entries().unwrap().zip(&upserts) {
            let mut entry = entry.unwrap();
            assert_eq!(entry.path_bytes().as_ref(), name.as_bytes());
            let mut content = Vec::new();
            entry.read_to_end(&mut content).unwrap();
            assert_eq!(Some(Digest::of(&content)), expected.digest(), "{name}");
            seen += 1;
        }
        assert_eq!(seen, sizes.len());
    }

    #[test]
    fn a_file_shorter_than_its_stat_is_filled_with_zeros() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("short"), b"abc").unwrap();
        let mut file = fs::File::open(dir.path().join("short")).unwrap();
        let mut chunks = Vec::new();
        {
            let mut sink = ChunkWriter::new(4, |c| {
                chunks.push(c);
                Ok(())
            });
            sink.fill_from(&mut file, 6).unwrap();
        }
        assert_eq!(chunks, [b"abc\0".to_vec(), b"\0\0".to_vec()]);
    }

    #[test]
    fn chunk_writer_emits_fixed_chunks_then_the_rest() {
        let mut chunks = Vec::new();
        {
            let mut w = ChunkWriter::new(4, |c| {
                chunks.push(c);
                Ok(())
            });
            w.write_all(b"0123456789").unwrap();
        }
        assert_eq!(chunks, [b"0123".to_vec(), b"4567".to_vec(), b"89".to_vec()]);
    }
}
