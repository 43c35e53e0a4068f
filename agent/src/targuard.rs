//! A reader between a batch's byte stream and the `tar` crate that bounds what the crate would
//! buffer whole: the content of PAX extended headers (`x`, `g`) and GNU long names and long link
//! targets (`L`, `K`). The crate reads those into memory in one piece, so a peer that announces
//! a 500 MiB long name would cost 500 MiB (or more) of the agent's memory, which lives inside
//! the app's memory limit. The guard reads every 512-byte header as it streams past and fails the
//! stream when such a header announces more than [`MAX_META`] bytes, before its content is read.
//!
//! PAX `size` records (which would change how long the next entry's content is, and so where the
//! next header starts) are refused too: devloop's own batches never carry them.

use std::io::{self, Read, Seek, SeekFrom};

/// Largest extended header or long name accepted (paths are at most 4096 bytes; a PAX header
/// carries a path, a link target and a digest).
pub const MAX_META: u64 = 64 << 10;

const BLOCK: usize = 512;

pub struct Guard<R> {
    inner: R,
    /// The header block being gathered.
    header: [u8; BLOCK],
    filled: usize,
    /// Bytes of content (with padding) to let through before the next header.
    skip: u64,
    /// The content of a PAX header being gathered (to look for `size` records).
    pax: Option<(Vec<u8>, u64)>,
    /// Bytes passed so far: the stream's position, for [`Seek`].
    passed: u64,
}

impl<R: Read> Guard<R> {
    pub fn new(inner: R) -> Guard<R> {
        Guard { inner, header: [0; BLOCK], filled: 0, skip: 0, pax: None, passed: 0 }
    }

    /// Follows the bytes that passed: headers are checked, content is counted off.
    fn observe(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = (self.skip.min(bytes.len() as u64)) as usize;
                if let Some((content, left)) = &mut self.pax {
                    let take = (*left).min(n as u64) as usize;
                    content.extend_from_slice(&bytes[..take]);
                    *left -= take as u64;
                    if *left == 0 {
                        let content = std::mem::take(content);
                        self.pax = None;
                        check_pax(&content)?;
                    }
                }
                self.skip -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let n = (BLOCK - self.filled).min(bytes.len());
            self.header[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled == BLOCK {
                self.filled = 0;
                self.header_done()?;
            }
        }
        Ok(())
    }

    fn header_done(&mut self) -> io::Result<()> {
        if self.header.iter().all(|&b| b == 0) {
            // End-of-archive blocks: nothing follows them.
            return Ok(());
        }
        let size = octal_or_binary(&self.header[124..136])
            .ok_or_else(|| bad("a tar header's size field is not a number".into()))?;
        let kind = self.header[156];
        if matches!(kind, b'x' | b'g' | b'L' | b'K') {
            if size > MAX_META {
                return Err(bad(format!(
                    "a tar {} header of {size} bytes is larger than the {MAX_META} allowed",
                    match kind {
                        b'L' => "long-name",
                        b'K' => "long-link",
                        _ => "PAX",
                    }
                )));
            }
            if matches!(kind, b'x' | b'g') && size > 0 {
                self.pax = Some((Vec::with_capacity(size as usize), size));
            }
        }
        // Content is padded to whole blocks; a size within a block of u64::MAX has no padded end.
        self.skip = size
            .div_ceil(BLOCK as u64)
            .checked_mul(BLOCK as u64)
            .ok_or_else(|| bad(format!("a tar header announces {size} bytes, more than any stream holds")))?;
        Ok(())
    }
}

impl<R: Read> Read for Guard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.observe(&buf[..n])?;
        self.passed += n as u64;
        Ok(n)
    }
}

/// Forward only, by reading through (what a stream can do). The `tar` crate moves to each next
/// header by a seek when its reader can, and otherwise by reading into a 32 KiB buffer it zeroes
/// first — per header, even when there is nothing to skip (two headers per file in a batch).
impl<R: Read> Seek for Guard<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let ahead = match to {
            SeekFrom::Current(n) => u64::try_from(n).ok(),
            SeekFrom::Start(at) => at.checked_sub(self.passed),
            SeekFrom::End(_) => None,
        };
        let Some(ahead) = ahead else {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "a batch's stream only moves forward"));
        };
        if io::copy(&mut self.by_ref().take(ahead), &mut io::sink())? < ahead {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(self.passed)
    }
}

/// PAX records are `LEN KEY=VALUE\n`; a `size` record would move the next header.
fn check_pax(mut content: &[u8]) -> io::Result<()> {
    while !content.is_empty() {
        let space = content.iter().position(|&b| b == b' ').ok_or_else(|| bad("a malformed PAX record".into()))?;
        let len: usize = std::str::from_utf8(&content[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&len| len > space && len <= content.len())
            .ok_or_else(|| bad("a malformed PAX record".into()))?;
        let record = &content[space + 1..len];
        if record.starts_with(b"size=") || record.starts_with(b"GNU.sparse.") {
            return Err(bad("PAX size records are not accepted in a batch".into()));
        }
        content = &content[len..];
    }
    Ok(())
}

/// A tar number field: octal digits (space or NUL padded), or base-256 when the top bit is set.
fn octal_or_binary(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let mut value: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            value = value.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(value);
    }
    let text = std::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c: char| c == ' ' || c == '\0');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

fn bad(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u8, size: u64) -> [u8; BLOCK] {
        let mut h = tar::Header::new_ustar();
        h.set_size(size);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_path("x").unwrap();
        h.set_cksum();
        *h.as_bytes()
    }

    fn read_all(bytes: Vec<u8>) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        Guard::new(io::Cursor::new(bytes)).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn ordinary_archives_pass_through_unchanged() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        let long = "d/".repeat(200) + "f";
        builder.append_data(&mut h, &long, &b"abc"[..]).unwrap();
        builder.append_pax_extensions([("DEVLOOP.blake3", &b"00"[..])]).unwrap();
        let bytes = builder.into_inner().unwrap();
        assert_eq!(read_all(bytes.clone()).unwrap(), bytes);
    }

    #[test]
    fn huge_long_names_and_pax_headers_are_refused_before_their_content() {
        for kind in [b'L', b'K', b'x', b'g'] {
            // Only the header: the guard must refuse without the 500 MiB that it announces.
            let err = read_all(header(kind, 500 << 20).to_vec()).unwrap_err();
            assert!(err.to_string().contains("larger than"), "{err}");
        }
        let mut fine = header(b'0', 500 << 20).to_vec();
        fine.extend_from_slice(&[0u8; 1024]);
        assert!(read_all(fine).is_ok(), "a large regular file is the size cap's business, not the guard's");
    }

    #[test]
    fn entries_read_by_seeking_past_unread_content_are_the_entries_read_whole() {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, size) in [("a", 3usize), ("b", 70_000), ("c", 0), ("d", 513)] {
            let mut h = tar::Header::new_gnu();
            h.set_size(size as u64);
            h.set_mode(0o644);
            builder.append_pax_extensions([("DEVLOOP.blake3", name.as_bytes())]).unwrap();
            builder.append_data(&mut h, name, &vec![name.as_bytes()[0]; size][..]).unwrap();
        }
        let bytes = builder.into_inner().unwrap();
        // Every other entry's content left unread: the archive seeks past it.
        let mut archive = tar::Archive::new(Guard::new(io::Cursor::new(bytes)));
        let mut seen = Vec::new();
        for (i, entry) in archive.entries_with_seek().unwrap().enumerate() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut content = Vec::new();
            if i % 2 == 1 {
                entry.read_to_end(&mut content).unwrap();
            }
            seen.push((name, entry.size(), content.len()));
        }
        let want = [("a", 3, 0), ("b", 70_000, 70_000), ("c", 0, 0), ("d", 513, 513)];
        assert_eq!(seen, want.map(|(n, s, c)| (n.to_string(), s, c)));

        let mut guard = Guard::new(io::Cursor::new(vec![0u8; 1024]));
        assert_eq!(guard.seek(SeekFrom::Current(600)).unwrap(), 600);
        assert!(guard.seek(SeekFrom::Current(-1)).is_err(), "a stream cannot go back");
        assert!(guard.seek(SeekFrom::Current(1000)).is_err(), "past the end is an early end");
    }

    #[test]
    fn a_header_skipped_by_a_seek_is_still_checked() {
        let mut bytes = header(b'0', 0).to_vec();
        bytes.extend_from_slice(&header(b'x', 500 << 20));
        let mut guard = Guard::new(io::Cursor::new(bytes));
        let err = guard.seek(SeekFrom::Current(1024)).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
    }

    #[test]
    fn a_size_with_no_padded_end_is_refused_not_overflowed() {
        // Base-256 size fields can say up to u64::MAX (the fuzzer found it: an overflow panic).
        let mut h = header(b'0', 0);
        h[124..136].copy_from_slice(&[0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        let err = read_all(h.to_vec()).unwrap_err();
        assert!(err.to_string().contains("more than any stream holds"), "{err}");
    }

    #[test]
    fn pax_size_records_are_refused() {
        let record = b"16 size=1000000\n";
        let mut bytes = header(b'x', record.len() as u64).to_vec();
        let mut block = [0u8; BLOCK];
        block[..record.len()].copy_from_slice(record);
        bytes.extend_from_slice(&block);
        let err = read_all(bytes).unwrap_err();
        assert!(err.to_string().contains("size records"), "{err}");
    }
}
