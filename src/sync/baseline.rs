//! What the target holds, as far as the CLI knows: the baseline. It changes only by what the agent
//! acknowledged — a batch's deletions, exec-bit changes and entries, minus what it refused.
//! Pure: no IO.
//!
//! Architecture invariant: the baseline advances on `Applied`, never on "sent".

use std::collections::{HashMap, HashSet};

use devloop_agent::manifest::{Entry, Manifest};
use devloop_agent::protocol::{Applied, Chmod};

/// Paths the agent refused, with the local entry it refused: not sent again until it changes.
pub type Refused = HashMap<String, Entry>;

/// What one batch carried.
pub struct Sent<'a> {
    pub deletes: &'a [String],
    pub chmods: &'a [Chmod],
    /// The entries that went into the tar stream (what was packed, not what was planned: a file
    /// that vanished while packing is not among them).
    pub upserts: Vec<(String, Entry)>,
}

/// Folds the agent's answer to `sent` into the baseline and the refused paths. The answer names
/// each refused entry by its place in the batch: the deletions, then the exec-bit changes, then
/// the upserts, each in the order sent.
pub fn fold(baseline: &mut Manifest, refused: &mut Refused, sent: Sent<'_>, answer: &Applied) {
    let no: HashSet<usize> = answer.refused_at.iter().map(|&at| at as usize).collect();
    let (deletes, chmods) = (sent.deletes.len(), sent.chmods.len());
    for (at, path) in sent.deletes.iter().enumerate() {
        if !no.contains(&at) {
            baseline.remove(path);
        }
    }
    for (i, chmod) in sent.chmods.iter().enumerate() {
        if no.contains(&(deletes + i)) {
            continue;
        }
        if let Some(Entry::File { exec, .. }) = baseline.get_mut(&chmod.path) {
            *exec = chmod.exec;
        }
    }
    for (i, (path, entry)) in sent.upserts.into_iter().enumerate() {
        if no.contains(&(deletes + chmods + i)) {
            refused.insert(path, entry);
        } else {
            refused.remove(&path);
            baseline.insert(path, entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devloop_agent::manifest::Digest;
    use devloop_agent::protocol::Problem;

    fn file(body: &[u8]) -> Entry {
        Entry::File { hash: Digest::of(body), size: body.len() as u64, exec: false }
    }

    /// The agent's answer refusing the entries at `places` (in words for the first only, as
    /// when many are refused).
    fn answer(places: &[u32]) -> Applied {
        let refused = vec![Problem { path: "shown".into(), message: "no".into() }];
        Applied { id: 1, refused, refused_at: places.to_vec(), ..Applied::default() }
    }

    #[test]
    fn what_was_applied_enters_the_baseline_and_what_was_refused_does_not() {
        let mut baseline: Manifest =
            [("gone".to_string(), file(b"g")), ("kept".to_string(), file(b"k")), ("run.sh".to_string(), file(b"r"))]
                .into_iter()
                .collect();
        let mut refused = Refused::from([("new.txt".to_string(), file(b"old attempt"))]);
        let deletes = ["gone".to_string(), "kept".to_string()];
        let chmods = [Chmod { path: "run.sh".into(), exec: true }];
        let upserts =
            vec![("new.txt".to_string(), file(b"new")), ("evil".to_string(), Entry::Symlink { target: "/".into() })];
        let sent = Sent { deletes: &deletes, chmods: &chmods, upserts };
        // Places: deletions 0-1 (`gone`, `kept`), the chmod 2, the upserts 3-4 (`new.txt`, `evil`).
        fold(&mut baseline, &mut refused, sent, &answer(&[1, 4]));

        assert!(!baseline.contains_key("gone"));
        assert_eq!(baseline["kept"], file(b"k"), "a refused deletion leaves the path in the baseline");
        assert_eq!(baseline["run.sh"], Entry::File { hash: Digest::of(b"r"), size: 1, exec: true });
        assert_eq!(baseline["new.txt"], file(b"new"));
        assert!(!baseline.contains_key("evil"));
        assert_eq!(refused.len(), 1, "new.txt was accepted this time: {refused:?}");
        assert_eq!(refused["evil"], Entry::Symlink { target: "/".into() });
    }

    #[test]
    fn a_refused_chmod_keeps_the_old_bit() {
        let mut baseline: Manifest = [("a".to_string(), file(b"a"))].into_iter().collect();
        let chmods = [Chmod { path: "a".into(), exec: true }];
        let sent = Sent { deletes: &[], chmods: &chmods, upserts: Vec::new() };
        fold(&mut baseline, &mut Refused::new(), sent, &answer(&[0]));
        assert_eq!(baseline["a"], file(b"a"));
    }
}
