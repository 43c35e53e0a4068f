//! [`Tree`]: a scanned tree, path → [`Scanned`], sorted by path, kept compact.
//!
//! A tree of 100,000 paths is most of what the CLI and the agent hold between sessions. As a
//! `BTreeMap<String, Scanned>` each path cost a `String` (24 bytes, and a heap block with its
//! header and rounding) besides the entry. Here the paths lie one after the other in one string,
//! the entries in one array in the same order, looked up by binary search; what changes between
//! two rebuilds waits in a small sorted overlay, folded in once it grows to an eighth of the tree.

use std::cmp::Ordering;
use std::collections::btree_map;
use std::collections::BTreeMap;
use std::fmt;
use std::iter::Peekable;
use std::ops::Bound;

use crate::walk::Scanned;

/// Paths of a scanned tree, sorted, each with what the scan found.
#[derive(Clone, Default)]
pub struct Tree {
    /// The paths of `rows`, one after the other.
    paths: String,
    /// Where the path of each row ends in `paths` (it begins where the previous one ends).
    ends: Vec<u32>,
    /// The rows' entries, sorted by path.
    rows: Vec<Scanned>,
    /// Changes not yet folded into the rows: `Some` added or replaced, `None` removed.
    changes: BTreeMap<String, Option<Scanned>>,
    /// How many paths the tree holds.
    len: usize,
}

/// The overlay is folded into the rows once it holds this many paths, or an eighth of the rows
/// if more: a rebuild costs a pass over the tree.
const FOLD_AT: usize = 256;

impl Tree {
    pub fn new() -> Tree {
        Tree::default()
    }

    /// An empty tree with room for `rows` paths of `bytes` bytes in all (a walk's merged finds,
    /// counted before they go in).
    pub fn with_capacity(bytes: usize, rows: usize) -> Tree {
        Tree {
            paths: String::with_capacity(bytes),
            ends: Vec::with_capacity(rows),
            rows: Vec::with_capacity(rows),
            ..Tree::default()
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, path: &str) -> Option<&Scanned> {
        match self.changes.get(path) {
            Some(change) => change.as_ref(),
            None => self.row(path).ok().map(|i| &self.rows[i]),
        }
    }

    /// [`Tree::get`] of paths asked for in increasing order: `cursor` (0 before the first) keeps
    /// the row where the last one was found, so that the next is looked for from there — the row
    /// right after it first. A walk reads each folder's names in order.
    pub fn get_in_order(&self, cursor: &mut usize, path: &str) -> Option<&Scanned> {
        if !self.changes.is_empty() {
            return self.get(path);
        }
        let from = (*cursor).min(self.rows.len());
        let at = match self.rows.get(from) {
            Some(_) if self.path(from) == path => Ok(from),
            _ => self.row_in(from, self.rows.len(), path),
        };
        advance(cursor, at).map(|i| &self.rows[i])
    }

    /// The entry of `path`, to change in place.
    pub fn get_mut(&mut self, path: &str) -> Option<&mut Scanned> {
        if self.changes.contains_key(path) {
            return self.changes.get_mut(path).and_then(Option::as_mut);
        }
        let i = self.row(path).ok()?;
        Some(&mut self.rows[i])
    }

    pub fn contains_key(&self, path: &str) -> bool {
        self.get(path).is_some()
    }

    /// Sets `path` to `scanned`; returns what it was.
    pub fn insert(&mut self, path: String, scanned: Scanned) -> Option<Scanned> {
        if self.changes.is_empty() && self.after_last(&path) {
            self.push(&path, scanned);
            self.len += 1;
            return None;
        }
        let old = match self.changes.get(&path) {
            Some(change) => change.clone(),
            None => self.row(&path).ok().map(|i| self.rows[i].clone()),
        };
        self.changes.insert(path, Some(scanned));
        if old.is_none() {
            self.len += 1;
        }
        self.fold_when_large();
        old
    }

    /// Sets `path` to `scanned` as [`Tree::insert`] does, without an owned path when it sorts
    /// after every path the tree holds (paths given in order are appended).
    pub fn append(&mut self, path: &str, scanned: Scanned) {
        if self.changes.is_empty() && self.after_last(path) {
            self.push(path, scanned);
            self.len += 1;
        } else {
            self.insert(path.to_owned(), scanned);
        }
    }

    /// Removes `path`; returns what it was.
    pub fn remove(&mut self, path: &str) -> Option<Scanned> {
        let row = self.row(path).ok();
        let old = match (self.changes.get_mut(path), row) {
            (Some(change), _) => {
                let old = change.take();
                if row.is_none() {
                    self.changes.remove(path);
                }
                old
            }
            (None, Some(i)) => {
                self.changes.insert(path.to_owned(), None);
                Some(self.rows[i].clone())
            }
            (None, None) => None,
        };
        if old.is_some() {
            self.len -= 1;
            self.fold_when_large();
        }
        old
    }

    /// Every path and its entry, in path order.
    pub fn iter(&self) -> Iter<'_> {
        self.iter_from(0, self.changes.range::<str, _>(..))
    }

    /// The paths from `start` on (`start` included), in path order.
    pub fn from(&self, start: &str) -> Iter<'_> {
        let first = self.row(start).unwrap_or_else(|at| at);
        self.iter_from(first, self.changes.range::<str, _>((Bound::Included(start), Bound::Unbounded)))
    }

    /// The paths that begin with `prefix`, in path order.
    pub fn prefixed<'a: 'p, 'p>(&'a self, prefix: &'p str) -> impl Iterator<Item = (&'a str, &'a Scanned)> + 'p {
        self.from(prefix).take_while(move |(path, _)| path.starts_with(prefix))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.iter().map(|(path, _)| path)
    }

    pub fn values(&self) -> impl Iterator<Item = &Scanned> + '_ {
        self.iter().map(|(_, scanned)| scanned)
    }

    /// Gives back what the tree holds beyond its paths (after a scan built it in pieces).
    pub fn shrink_to_fit(&mut self) {
        self.fold();
        self.paths.shrink_to_fit();
        self.ends.shrink_to_fit();
        self.rows.shrink_to_fit();
    }

    fn iter_from<'a>(&'a self, first: usize, changes: btree_map::Range<'a, String, Option<Scanned>>) -> Iter<'a> {
        Iter { tree: self, next: first, changes: changes.peekable() }
    }

    fn path(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.paths[start..self.ends[i] as usize]
    }

    /// The row of `path`, or where it would be.
    fn row(&self, path: &str) -> Result<usize, usize> {
        self.row_in(0, self.rows.len(), path)
    }

    /// [`Tree::row`] searching rows `low..high` only.
    fn row_in(&self, mut low: usize, mut high: usize, path: &str) -> Result<usize, usize> {
        while low < high {
            let mid = low + (high - low) / 2;
            match self.path(mid).cmp(path) {
                Ordering::Less => low = mid + 1,
                Ordering::Greater => high = mid,
                Ordering::Equal => return Ok(mid),
            }
        }
        Err(low)
    }

    pub(crate) fn after_last(&self, path: &str) -> bool {
        self.rows.is_empty() || self.path(self.rows.len() - 1) < path
    }

    fn push(&mut self, path: &str, scanned: Scanned) {
        self.paths.push_str(path);
        // A tree's paths would need 4 GiB of text (some 40 million files) to overflow this.
        self.ends.push(u32::try_from(self.paths.len()).expect("a tree's paths fit in 4 GiB"));
        self.rows.push(scanned);
    }

    fn fold_when_large(&mut self) {
        if self.changes.len() >= FOLD_AT.max(self.rows.len() / 8) {
            self.fold();
        }
    }

    /// Rebuilds the rows with the overlay's changes in them.
    fn fold(&mut self) {
        if self.changes.is_empty() {
            return;
        }
        let bytes = self.paths.len() + self.changes.keys().map(String::len).sum::<usize>();
        let mut folded = Tree {
            paths: String::with_capacity(bytes),
            ends: Vec::with_capacity(self.len),
            rows: Vec::with_capacity(self.len),
            ..Tree::default()
        };
        for (path, scanned) in self.iter() {
            folded.push(path, scanned.clone());
        }
        folded.len = folded.rows.len();
        *self = folded;
    }
}

/// Moves a cursor of lookups in order past what one lookup found (`Ok`: the row found, or `Err`:
/// where it would be); the row found, if any.
pub(crate) fn advance(cursor: &mut usize, at: Result<usize, usize>) -> Option<usize> {
    match at {
        Ok(i) => {
            *cursor = i + 1;
            Some(i)
        }
        Err(i) => {
            *cursor = i;
            None
        }
    }
}

/// A tree's paths in order: the rows and the overlay merged.
pub struct Iter<'a> {
    tree: &'a Tree,
    next: usize,
    changes: Peekable<btree_map::Range<'a, String, Option<Scanned>>>,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a Scanned);

    fn next(&mut self) -> Option<Self::Item> {
        let tree = self.tree;
        loop {
            let row = (self.next < tree.rows.len()).then(|| tree.path(self.next));
            let order = match (row, self.changes.peek()) {
                (None, None) => return None,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(row), Some((path, _))) => row.cmp(path.as_str()),
            };
            if order == Ordering::Less {
                let i = self.next;
                self.next += 1;
                return Some((tree.path(i), &tree.rows[i]));
            }
            if order == Ordering::Equal {
                self.next += 1;
            }
            let (path, change) = self.changes.next().expect("a change is pending");
            if let Some(scanned) = change {
                return Some((path.as_str(), scanned));
            }
        }
    }
}

impl<'a> IntoIterator for &'a Tree {
    type Item = (&'a str, &'a Scanned);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl IntoIterator for Tree {
    type Item = (String, Scanned);
    type IntoIter = IntoIter;

    fn into_iter(mut self) -> IntoIter {
        self.fold();
        IntoIter { paths: self.paths, start: 0, ends: self.ends.into_iter(), rows: self.rows.into_iter() }
    }
}

/// A tree's paths in order, taken out of it.
pub struct IntoIter {
    paths: String,
    start: usize,
    ends: std::vec::IntoIter<u32>,
    rows: std::vec::IntoIter<Scanned>,
}

impl Iterator for IntoIter {
    type Item = (String, Scanned);

    fn next(&mut self) -> Option<Self::Item> {
        let end = self.ends.next()? as usize;
        let path = self.paths[self.start..end].to_owned();
        self.start = end;
        Some((path, self.rows.next()?))
    }
}

/// Paths given in order are appended as they come; others wait in the overlay (the last of a
/// path given twice wins, as in a map).
impl FromIterator<(String, Scanned)> for Tree {
    fn from_iter<I: IntoIterator<Item = (String, Scanned)>>(iter: I) -> Tree {
        let mut tree = Tree::new();
        tree.extend(iter);
        tree.shrink_to_fit();
        tree
    }
}

impl Extend<(String, Scanned)> for Tree {
    fn extend<I: IntoIterator<Item = (String, Scanned)>>(&mut self, iter: I) {
        for (path, scanned) in iter {
            self.insert(path, scanned);
        }
    }
}

/// `tree[path]`, as a map's: panics when the tree does not hold `path`.
impl std::ops::Index<&str> for Tree {
    type Output = Scanned;

    fn index(&self, path: &str) -> &Scanned {
        self.get(path).unwrap_or_else(|| panic!("the tree does not hold {path:?}"))
    }
}

impl PartialEq for Tree {
    fn eq(&self, other: &Tree) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for Tree {}

impl fmt::Debug for Tree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Digest, Entry};

    fn file(content: &str) -> Scanned {
        Scanned {
            entry: Entry::File { hash: Digest::of(content.as_bytes()), size: content.len() as u64, exec: false },
            stat: None,
        }
    }

    /// The same operations on a `BTreeMap` and a `Tree`, compared after each.
    #[test]
    fn behaves_as_a_sorted_map_through_folds() {
        let mut tree = Tree::new();
        let mut map = BTreeMap::new();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for step in 0..20_000u32 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let path = format!("d{}/f{}", state % 7, (state >> 8) % 400);
            let value = file(&format!("{step}"));
            if state.is_multiple_of(3) {
                assert_eq!(tree.remove(&path), map.remove(&path), "remove {path}");
            } else {
                assert_eq!(tree.insert(path.clone(), value.clone()), map.insert(path.clone(), value), "insert {path}");
            }
            assert_eq!(tree.len(), map.len());
            assert_eq!(tree.get(&path), map.get(&path));
            if step.is_multiple_of(997) {
                let all: Vec<_> = tree.iter().map(|(p, s)| (p.to_owned(), s.clone())).collect();
                let want: Vec<_> = map.iter().map(|(p, s)| (p.clone(), s.clone())).collect();
                assert_eq!(all, want);
                let under: Vec<_> = tree.prefixed("d3/").map(|(p, _)| p.to_owned()).collect();
                let want: Vec<_> = map.keys().filter(|p| p.starts_with("d3/")).cloned().collect();
                assert_eq!(under, want);
            }
        }
    }

    #[test]
    fn a_row_is_an_entry_and_a_stat_in_56_bytes() {
        // A file's digest (32), size (8) and exec bit, its stat's fingerprint (8).
        assert_eq!(std::mem::size_of::<Scanned>(), 56);
    }

    #[test]
    fn collects_unsorted_input_with_the_last_of_a_path_winning() {
        let tree: Tree = [("b".to_owned(), file("1")), ("a".to_owned(), file("2")), ("b".to_owned(), file("3"))]
            .into_iter()
            .collect();
        let all: Vec<_> = tree.iter().map(|(p, s)| (p, s.clone())).collect();
        assert_eq!(all, vec![("a", file("2")), ("b", file("3"))]);
        assert_eq!(tree.from("a0").map(|(p, _)| p).collect::<Vec<_>>(), vec!["b"]);
    }
}
