//! Helpers shared by the agent's integration tests.

#![allow(dead_code)]

use devloop_agent::manifest::Digest;
use devloop_agent::protocol::PAX_BLAKE3;

/// Builds tar streams entry by entry, writing header names raw so that hostile ones get through.
pub struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    pub fn new() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
    }

    pub fn header(name: &[u8], kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut header = tar::Header::new_ustar();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(mode);
        header.set_cksum();
        header
    }

    pub fn file(self, name: &str, body: &[u8]) -> Tar {
        self.file_with_digest(name, body, Digest::of(body))
    }

    pub fn file_with_digest(mut self, name: &str, body: &[u8], digest: Digest) -> Tar {
        self.0.append_pax_extensions([(PAX_BLAKE3, digest.to_hex().as_bytes())]).unwrap();
        let header = Tar::header(name.as_bytes(), tar::EntryType::Regular, body.len() as u64, 0o644);
        self.0.append(&header, body).unwrap();
        self
    }

    pub fn exec_file(mut self, name: &str, body: &[u8]) -> Tar {
        self.0.append_pax_extensions([(PAX_BLAKE3, Digest::of(body).to_hex().as_bytes())]).unwrap();
        let header = Tar::header(name.as_bytes(), tar::EntryType::Regular, body.len() as u64, 0o755);
        self.0.append(&header, body).unwrap();
        self
    }

    pub fn symlink(mut self, name: &str, target: &str) -> Tar {
        let mut header = Tar::header(name.as_bytes(), tar::EntryType::Symlink, 0, 0o777);
        header.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
        header.set_cksum();
        self.0.append(&header, &[][..]).unwrap();
        self
    }

    pub fn special(mut self, name: &str, kind: tar::EntryType) -> Tar {
        let header = Tar::header(name.as_bytes(), kind, 0, 0o644);
        self.0.append(&header, &[][..]).unwrap();
        self
    }

    pub fn dir(mut self, name: &str) -> Tar {
        let header = Tar::header(name.as_bytes(), tar::EntryType::Directory, 0, 0o755);
        self.0.append(&header, &[][..]).unwrap();
        self
    }

    pub fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}
