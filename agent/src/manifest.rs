//! What a tree holds: a sorted map from relative path to [`Entry`]. Both ends build one; the diff
//! compares them. Paths are relative, `/`-separated, UTF-8, and never contain `.` or `..`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A blake3 digest. Serialized as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    #[cfg(feature = "tree")]
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 15)]));
        }
        s
    }

    pub fn from_hex(s: &str) -> Option<Digest> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Digest(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..12])
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Digest::from_hex(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

/// One path of a tree. Only what the image's build context would carry: content, the exec bit,
/// symlink targets, directories (so empty ones sync too).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    File {
        hash: Digest,
        size: u64,
        #[serde(default, skip_serializing_if = "is_false")]
        exec: bool,
    },
    Symlink {
        target: String,
    },
    Dir,
}

/// The digest of a manifest, path by path in the order given (sorted, as trees and manifests
/// iterate). Both ends compute it the same way; equal digests mean equal trees.
#[cfg(feature = "tree")]
pub fn digest_of<'a>(entries: impl IntoIterator<Item = (&'a str, &'a Entry)>) -> Digest {
    // The records go to the hasher in large pieces: blake3 hashes a long input many chunks at a
    // time, and a call per field costs more than the field (the digest is the same either way).
    const FLUSH_AT: usize = 64 << 10;
    let mut hasher = blake3::Hasher::new();
    let mut buf = Vec::with_capacity(FLUSH_AT + 4096);
    for (path, entry) in entries {
        buf.extend_from_slice(path.as_bytes());
        buf.push(0);
        match entry {
            Entry::File { hash, size, exec } => {
                buf.push(1);
                buf.extend_from_slice(&hash.0);
                buf.extend_from_slice(&size.to_le_bytes());
                buf.push(u8::from(*exec));
            }
            Entry::Symlink { target } => {
                buf.push(2);
                buf.extend_from_slice(target.as_bytes());
                buf.push(0);
            }
            Entry::Dir => buf.push(3),
        }
        if buf.len() >= FLUSH_AT {
            hasher.update(&buf);
            buf.clear();
        }
    }
    hasher.update(&buf);
    Digest(*hasher.finalize().as_bytes())
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Entry {
    pub fn is_dir(&self) -> bool {
        matches!(self, Entry::Dir)
    }

    /// A regular file's digest.
    pub fn digest(&self) -> Option<Digest> {
        match self {
            Entry::File { hash, .. } => Some(*hash),
            _ => None,
        }
    }

    /// Bytes this entry carries in a batch.
    pub fn size(&self) -> u64 {
        match self {
            Entry::File { size, .. } => *size,
            _ => 0,
        }
    }
}

pub type Manifest = BTreeMap<String, Entry>;

/// A manifest entry on the wire: the path beside its entry's fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub path: String,
    #[serde(flatten)]
    pub entry: Entry,
}

#[cfg(all(test, feature = "tree"))]
mod tests {
    use super::*;

    /// The digest is part of the protocol (an agent of another build compares it): hashing the
    /// records in large pieces must give what one update per field gives.
    #[test]
    fn digest_is_the_hash_of_the_records_field_by_field() {
        let entries: Vec<(String, Entry)> = (0..5000)
            .map(|i| {
                let entry = match i % 3 {
                    0 => Entry::File { hash: Digest::of(format!("{i}").as_bytes()), size: i, exec: i % 2 == 0 },
                    1 => Entry::Symlink { target: format!("../t{i}") },
                    _ => Entry::Dir,
                };
                (format!("d{:03}/e{i:05}", i / 100), entry)
            })
            .collect();
        let mut fields = blake3::Hasher::new();
        for (path, entry) in &entries {
            fields.update(path.as_bytes());
            fields.update(&[0]);
            match entry {
                Entry::File { hash, size, exec } => {
                    fields.update(&[1]);
                    fields.update(&hash.0);
                    fields.update(&size.to_le_bytes());
                    fields.update(&[u8::from(*exec)]);
                }
                Entry::Symlink { target } => {
                    fields.update(&[2]);
                    fields.update(target.as_bytes());
                    fields.update(&[0]);
                }
                Entry::Dir => {
                    fields.update(&[3]);
                }
            }
        }
        let expected = Digest(*fields.finalize().as_bytes());
        assert_eq!(digest_of(entries.iter().map(|(p, e)| (p.as_str(), e))), expected);
    }
}
