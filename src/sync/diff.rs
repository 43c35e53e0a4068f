//! What must change in the target so that it equals the source. Pure: no IO.
//!
//! Architecture invariant: diff.rs does no IO and knows nothing of transports or sessions.

use std::collections::BTreeMap;
use std::iter::Peekable;

use devloop_agent::manifest::Entry;
use devloop_agent::walk::Tree;

/// One step that makes the target more like the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Create or replace the path with this entry.
    Upsert { path: String, entry: Entry },
    /// Remove the path (a folder only after everything under it).
    Delete { path: String },
    /// Same content, only the exec bit differs.
    Chmod { path: String, exec: bool },
}

impl Change {
    pub fn path(&self) -> &str {
        match self {
            Change::Upsert { path, .. } | Change::Delete { path } | Change::Chmod { path, .. } => path,
        }
    }
}

/// Anything that maps a path to an entry: a manifest, or a scanned tree.
pub trait Entries {
    fn entry(&self, path: &str) -> Option<&Entry>;
    fn sorted(&self) -> Box<dyn Iterator<Item = (&str, &Entry)> + '_>;
}

impl Entries for BTreeMap<String, Entry> {
    fn entry(&self, path: &str) -> Option<&Entry> {
        self.get(path)
    }
    fn sorted(&self) -> Box<dyn Iterator<Item = (&str, &Entry)> + '_> {
        Box::new(self.iter().map(|(p, e)| (p.as_str(), e)))
    }
}

impl Entries for Tree {
    fn entry(&self, path: &str) -> Option<&Entry> {
        self.get(path).map(|s| &s.entry)
    }
    fn sorted(&self) -> Box<dyn Iterator<Item = (&str, &Entry)> + '_> {
        Box::new(self.iter().map(|(p, s)| (p, &s.entry)))
    }
}

/// Compares two whole trees. Changes come in path order, so a folder's upsert precedes its content.
pub fn diff(target: &impl Entries, source: &impl Entries) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut t: Peekable<_> = target.sorted().peekable();
    let mut s: Peekable<_> = source.sorted().peekable();
    loop {
        match (t.peek(), s.peek()) {
            (None, None) => break,
            (Some(&(tp, _)), None) => {
                changes.push(Change::Delete { path: tp.to_owned() });
                t.next();
            }
            (None, Some(&(sp, se))) => {
                changes.push(Change::Upsert { path: sp.to_owned(), entry: se.clone() });
                s.next();
            }
            (Some(&(tp, te)), Some(&(sp, se))) => match tp.cmp(sp) {
                std::cmp::Ordering::Less => {
                    changes.push(Change::Delete { path: tp.to_owned() });
                    t.next();
                }
                std::cmp::Ordering::Greater => {
                    changes.push(Change::Upsert { path: sp.to_owned(), entry: se.clone() });
                    s.next();
                }
                std::cmp::Ordering::Equal => {
                    compare(sp, Some(te), Some(se), &mut changes);
                    t.next();
                    s.next();
                }
            },
        }
    }
    changes
}

/// Compares only the given paths (those a rescan saw change). Paths must be sorted and distinct.
pub fn diff_paths<'a>(
    target: &impl Entries,
    source: &impl Entries,
    paths: impl IntoIterator<Item = &'a str>,
) -> Vec<Change> {
    let mut changes = Vec::new();
    for path in paths {
        compare(path, target.entry(path), source.entry(path), &mut changes);
    }
    changes
}

fn compare(path: &str, target: Option<&Entry>, source: Option<&Entry>, changes: &mut Vec<Change>) {
    match (target, source) {
        (None, None) => {}
        (Some(_), None) => changes.push(Change::Delete { path: path.to_owned() }),
        (None, Some(s)) => changes.push(Change::Upsert { path: path.to_owned(), entry: s.clone() }),
        (Some(t), Some(s)) if t == s => {}
        (Some(Entry::File { hash: th, size: ts, .. }), Some(Entry::File { hash: sh, size: ss, exec }))
            if th == sh && ts == ss =>
        {
            changes.push(Change::Chmod { path: path.to_owned(), exec: *exec });
        }
        (Some(t), Some(s)) => {
            // A folder and a non-folder cannot replace each other in one rename.
            if t.is_dir() != s.is_dir() {
                changes.push(Change::Delete { path: path.to_owned() });
            }
            changes.push(Change::Upsert { path: path.to_owned(), entry: s.clone() });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devloop_agent::manifest::Digest;

    fn file(body: &str) -> Entry {
        Entry::File { hash: Digest::of(body.as_bytes()), size: body.len() as u64, exec: false }
    }

    fn tree(entries: &[(&str, Entry)]) -> BTreeMap<String, Entry> {
        entries.iter().map(|(p, e)| (p.to_string(), e.clone())).collect()
    }

    #[test]
    fn identical_trees_need_nothing() {
        let a = tree(&[("a", file("1")), ("d", Entry::Dir), ("d/x", file("2"))]);
        assert!(diff(&a, &a.clone()).is_empty());
    }

    #[test]
    fn same_bytes_saved_again_is_no_change() {
        // The manifest holds content, not mtimes: a re-save with identical bytes compares equal.
        let before = tree(&[("a.cs", file("class A {}"))]);
        let after = tree(&[("a.cs", file("class A {}"))]);
        assert!(diff(&before, &after).is_empty());
    }

    #[test]
    fn adds_edits_deletes_and_mode_changes() {
        let target = tree(&[("gone", file("x")), ("edit", file("old")), ("run.sh", file("sh"))]);
        let mut source = tree(&[("edit", file("new")), ("new", file("n"))]);
        source.insert("run.sh".into(), Entry::File { hash: Digest::of(b"sh"), size: 2, exec: true });
        assert_eq!(
            diff(&target, &source),
            [
                Change::Upsert { path: "edit".into(), entry: file("new") },
                Change::Delete { path: "gone".into() },
                Change::Upsert { path: "new".into(), entry: file("n") },
                Change::Chmod { path: "run.sh".into(), exec: true },
            ]
        );
    }

    #[test]
    fn folder_replaced_by_file_and_back() {
        let with_dir = tree(&[("a", Entry::Dir), ("a/x", file("x"))]);
        let with_file = tree(&[("a", file("now a file"))]);
        assert_eq!(
            diff(&with_dir, &with_file),
            [
                Change::Delete { path: "a".into() },
                Change::Upsert { path: "a".into(), entry: file("now a file") },
                Change::Delete { path: "a/x".into() },
            ]
        );
        assert_eq!(
            diff(&with_file, &with_dir),
            [
                Change::Delete { path: "a".into() },
                Change::Upsert { path: "a".into(), entry: Entry::Dir },
                Change::Upsert { path: "a/x".into(), entry: file("x") },
            ]
        );
    }

    #[test]
    fn file_replaced_by_symlink_is_one_upsert() {
        let target = tree(&[("l", file("x"))]);
        let source = tree(&[("l", Entry::Symlink { target: "x".into() })]);
        assert_eq!(
            diff(&target, &source),
            [Change::Upsert { path: "l".into(), entry: Entry::Symlink { target: "x".into() } }]
        );
    }

    #[test]
    fn targeted_diff_agrees_with_full_diff_on_those_paths() {
        let target = tree(&[("a", file("1")), ("b", file("2")), ("c", file("3"))]);
        let source = tree(&[("a", file("1")), ("b", file("changed")), ("d", file("4"))]);
        let full = diff(&target, &source);
        let paths = ["a", "b", "c", "d"];
        assert_eq!(diff_paths(&target, &source, paths), full);
        assert_eq!(diff_paths(&target, &source, ["b"]), [full[0].clone()]);
    }
}
