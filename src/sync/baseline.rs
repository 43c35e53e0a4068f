//! What the target holds, as far as the CLI knows: the baseline. It changes only by what the agent
//! acknowledged — a batch's deletions, exec-bit changes and entries, minus what it refused.
//! Pure: no IO.
//!
//! Kept as a delta over the local tree: only the paths where the target holds something else
//! (or nothing) are stored. Once the trees are equal it is empty, so a session holds every path
//! once. The price is one rule: before the local tree changes at a path, [`Baseline::pin`] keeps
//! there what the target holds (the local entry until then).
//!
//! Architecture invariant: the baseline advances on `Applied`, never on "sent".

use std::collections::{BTreeMap, HashMap, HashSet};
use std::iter::Peekable;

use devloop_agent::filter::Filter;
use devloop_agent::manifest::{Entry, Manifest};
use devloop_agent::protocol::{Applied, Chmod};
use devloop_agent::tree;
use devloop_agent::walk::Tree;

use super::diff::{diff_paths, Change, Entries};

/// Paths the agent refused, with the local entry it refused: not sent again until it changes.
pub type Refused = HashMap<String, Entry>;

/// What the target holds, as its differences from the local tree.
#[derive(Debug, Default)]
pub struct Baseline {
    /// Path → what the target holds there (`None`: nothing), where it differs from the base.
    differs: BTreeMap<String, Option<Entry>>,
    /// What the paths not in `differs` hold.
    base: Base,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
enum Base {
    /// What the local tree holds.
    #[default]
    Local,
    /// What the local tree holds up to this path (included), nothing after it (`None`: nothing
    /// at all): an empty target, as an initial sync fills it in path order. So the delta
    /// neither starts as every local path saying "nothing there" nor grows with each path sent.
    Upto(Option<String>),
}

impl Base {
    /// What the base says `path` holds.
    fn entry<'a>(&self, local: &'a Tree, path: &str) -> Option<&'a Entry> {
        self.covers(path).then(|| local.get(path).map(|s| &s.entry)).flatten()
    }

    /// Whether the base follows the local tree at `path`.
    fn covers(&self, path: &str) -> bool {
        match self {
            Base::Local => true,
            Base::Upto(bound) => bound.as_deref().is_some_and(|bound| path <= bound),
        }
    }
}

impl Baseline {
    /// The target holds `manifest`.
    pub fn of(manifest: Manifest, local: &Tree) -> Baseline {
        let mut builder = Builder::new(local);
        for (path, entry) in manifest {
            builder.held(path, entry);
        }
        builder.finish()
    }

    /// Kept over the whole local tree once an initial sync went past its last path. (A sync
    /// cut short keeps its bound: the next one goes on from there.)
    pub fn rebase(&mut self, local: &Tree) {
        if let Base::Upto(bound) = &self.base {
            let last = local.keys().last();
            if last.is_none_or(|last| bound.as_deref().is_some_and(|bound| last <= bound)) {
                self.base = Base::Local;
            }
        }
    }

    /// An initial sync's batch reached `last` (its upserts sent in path order), of which the
    /// agent took `applied`: the base follows the local tree up to `last`, and the paths it
    /// passed that the target did not get (refused, too large, vanished) hold nothing there.
    fn advance(&mut self, local: &Tree, last: &str, applied: &HashSet<&str>) {
        let Base::Upto(bound) = &self.base else { return };
        if self.base.covers(last) {
            return;
        }
        // The local paths after the bound, up to `last`.
        let passed = local.from(bound.as_deref().unwrap_or("")).skip_while(|(path, _)| self.base.covers(path));
        let missed: Vec<String> = passed
            .take_while(|(path, _)| *path <= last)
            .filter(|(path, _)| !applied.contains(path) && !self.differs.contains_key(*path))
            .map(|(path, _)| path.to_owned())
            .collect();
        for path in missed {
            self.differs.insert(path, None);
        }
        self.base = Base::Upto(Some(last.to_owned()));
    }

    /// What the target holds at `path`.
    pub fn entry<'a>(&'a self, local: &'a Tree, path: &str) -> Option<&'a Entry> {
        match self.differs.get(path) {
            Some(held) => held.as_ref(),
            None => self.base.entry(local, path),
        }
    }

    /// How many paths differ from the local tree.
    pub fn differing(&self) -> usize {
        self.differs.len()
    }

    /// Before the local tree changes at `path`, where it held `old`: the target still holds
    /// `old` there, unless the baseline already says otherwise.
    pub fn pin(&mut self, path: &str, old: Option<&Entry>) {
        if self.base.covers(path) && !self.differs.contains_key(path) {
            self.differs.insert(path.to_owned(), old.cloned());
        }
    }

    /// The target holds `held` at `path` now.
    fn set(&mut self, local: &Tree, path: String, held: Option<Entry>) {
        if self.base.entry(local, &path) == held.as_ref() {
            self.differs.remove(&path);
        } else {
            self.differs.insert(path, held);
        }
    }

    /// What must change in the target so that it equals `local`, in path order.
    pub fn diff(&self, local: &Tree) -> Vec<Change> {
        match self.base {
            Base::Local => diff_paths(&self.view(local), local, self.differs.keys().map(String::as_str)),
            Base::Upto(_) => super::diff::diff(&self.view(local), local),
        }
    }

    /// The target as an [`Entries`], for [`diff_paths`].
    pub fn view<'a>(&'a self, local: &'a Tree) -> Held<'a> {
        Held { baseline: self, local }
    }

    /// Forgets what it knows of paths `filter` excludes (they are left alone in the target):
    /// where the local tree has nothing, the target counts as holding nothing either.
    pub fn forget_excluded(&mut self, filter: &Filter) {
        self.differs.retain(|path, held| !filter.is_excluded(path, held.as_ref().is_some_and(Entry::is_dir)));
    }
}

/// A [`Baseline`] built from an agent's manifest record by record, as they arrive: only where
/// the target differs from the local tree is kept, never the whole manifest. The agent sends its
/// records in path order; a record out of order is still taken right (it only costs a lookup).
pub struct Builder<'a> {
    local: &'a Tree,
    /// The local paths no record has reached yet.
    ahead: Peekable<tree::Iter<'a>>,
    differs: BTreeMap<String, Option<Entry>>,
    any: bool,
}

impl<'a> Builder<'a> {
    pub fn new(local: &'a Tree) -> Builder<'a> {
        Builder { local, ahead: local.iter().peekable(), differs: BTreeMap::new(), any: false }
    }

    /// The target holds `entry` at `path`.
    pub fn held(&mut self, path: String, entry: Entry) {
        self.any = true;
        // Local paths before this one that no record named: the target lacks them.
        while let Some(&(here, _)) = self.ahead.peek() {
            if here >= path.as_str() {
                break;
            }
            self.differs.insert(here.to_owned(), None);
            self.ahead.next();
        }
        // In order, the local entry is the one ahead; out of order, it is looked up.
        let local = match self.ahead.next_if(|&(here, _)| here == path) {
            Some((_, scanned)) => Some(scanned),
            None => self.local.get(&path),
        };
        if local.is_some_and(|s| s.entry == entry) {
            self.differs.remove(&path);
        } else {
            self.differs.insert(path, Some(entry));
        }
    }

    pub fn finish(self) -> Baseline {
        // An empty target: nothing stored until a sync fills it.
        if !self.any && !self.local.is_empty() {
            return Baseline { differs: BTreeMap::new(), base: Base::Upto(None) };
        }
        let mut differs = self.differs;
        differs.extend(self.ahead.map(|(here, _)| (here.to_owned(), None)));
        Baseline { differs, base: Base::Local }
    }
}

/// The baseline seen whole: the local tree, where the target differs what it holds.
pub struct Held<'a> {
    baseline: &'a Baseline,
    local: &'a Tree,
}

impl Entries for Held<'_> {
    fn entry(&self, path: &str) -> Option<&Entry> {
        self.baseline.entry(self.local, path)
    }

    fn sorted(&self) -> Box<dyn Iterator<Item = (&str, &Entry)> + '_> {
        let mut differs = self.baseline.differs.iter().peekable();
        let base = &self.baseline.base;
        let mut local = self.local.iter().take_while(|(path, _)| base.covers(path)).peekable();
        Box::new(std::iter::from_fn(move || loop {
            let order = match (differs.peek(), local.peek()) {
                (None, None) => return None,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some((d, _)), Some((l, _))) => d.as_str().cmp(l),
            };
            let (path, held) = match order {
                std::cmp::Ordering::Greater => {
                    let (path, scanned) = local.next().expect("peeked");
                    return Some((path, &scanned.entry));
                }
                std::cmp::Ordering::Equal => {
                    local.next();
                    differs.next().expect("peeked")
                }
                std::cmp::Ordering::Less => differs.next().expect("peeked"),
            };
            if let Some(entry) = held {
                return Some((path.as_str(), entry));
            }
        }))
    }
}

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
pub fn fold(baseline: &mut Baseline, local: &Tree, refused: &mut Refused, sent: Sent<'_>, answer: &Applied) {
    let no: HashSet<usize> = answer.refused_at.iter().map(|&at| at as usize).collect();
    let (deletes, chmods) = (sent.deletes.len(), sent.chmods.len());
    // An initial sync's base follows the local tree up to the last path sent.
    if let (Base::Upto(_), Some(last)) = (&baseline.base, sent.upserts.iter().map(|(path, _)| path.as_str()).max()) {
        let applied = sent.upserts.iter().enumerate().filter(|(i, _)| !no.contains(&(deletes + chmods + i)));
        let applied: HashSet<&str> = applied.map(|(_, (path, _))| path.as_str()).collect();
        baseline.advance(local, last, &applied);
    }
    for (at, path) in sent.deletes.iter().enumerate() {
        if !no.contains(&at) {
            baseline.set(local, path.clone(), None);
        }
    }
    for (i, chmod) in sent.chmods.iter().enumerate() {
        if no.contains(&(deletes + i)) {
            continue;
        }
        if let Some(Entry::File { hash, size, .. }) = baseline.entry(local, &chmod.path) {
            let held = Entry::File { hash: *hash, size: *size, exec: chmod.exec };
            baseline.set(local, chmod.path.clone(), Some(held));
        }
    }
    for (i, (path, entry)) in sent.upserts.into_iter().enumerate() {
        if no.contains(&(deletes + chmods + i)) {
            refused.insert(path, entry);
        } else {
            refused.remove(&path);
            baseline.set(local, path, Some(entry));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devloop_agent::manifest::Digest;
    use devloop_agent::protocol::Problem;
    use devloop_agent::walk::{self, Scanned};

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
        let held: Manifest =
            [("gone".to_string(), file(b"g")), ("kept".to_string(), file(b"k")), ("run.sh".to_string(), file(b"r"))]
                .into_iter()
                .collect();
        let local = Tree::new();
        let mut baseline = Baseline::of(held, &local);
        let mut refused = Refused::from([("new.txt".to_string(), file(b"old attempt"))]);
        let deletes = ["gone".to_string(), "kept".to_string()];
        let chmods = [Chmod { path: "run.sh".into(), exec: true }];
        let upserts =
            vec![("new.txt".to_string(), file(b"new")), ("evil".to_string(), Entry::Symlink { target: "/".into() })];
        let sent = Sent { deletes: &deletes, chmods: &chmods, upserts };
        // Places: deletions 0-1 (`gone`, `kept`), the chmod 2, the upserts 3-4 (`new.txt`, `evil`).
        fold(&mut baseline, &local, &mut refused, sent, &answer(&[1, 4]));

        let at = |path| baseline.entry(&local, path);
        assert_eq!(at("gone"), None);
        assert_eq!(at("kept"), Some(&file(b"k")), "a refused deletion leaves the path in the baseline");
        assert_eq!(at("run.sh"), Some(&Entry::File { hash: Digest::of(b"r"), size: 1, exec: true }));
        assert_eq!(at("new.txt"), Some(&file(b"new")));
        assert_eq!(at("evil"), None);
        assert_eq!(refused.len(), 1, "new.txt was accepted this time: {refused:?}");
        assert_eq!(refused["evil"], Entry::Symlink { target: "/".into() });
    }

    #[test]
    fn a_refused_chmod_keeps_the_old_bit() {
        let local = Tree::new();
        let mut baseline = Baseline::of([("a".to_string(), file(b"a"))].into_iter().collect(), &local);
        let chmods = [Chmod { path: "a".into(), exec: true }];
        let sent = Sent { deletes: &[], chmods: &chmods, upserts: Vec::new() };
        fold(&mut baseline, &local, &mut Refused::new(), sent, &answer(&[0]));
        assert_eq!(baseline.entry(&local, "a"), Some(&file(b"a")));
    }

    fn scanned(entry: Entry) -> Scanned {
        Scanned { entry, stat: None }
    }

    /// A local tree of a file `a`, a folder `d` and a file `d/x` in it.
    fn a_d_x() -> Tree {
        [("a", file(b"a")), ("d", Entry::Dir), ("d/x", file(b"x"))]
            .into_iter()
            .map(|(p, e)| (p.to_string(), scanned(e)))
            .collect()
    }

    #[test]
    fn equal_trees_keep_no_delta_and_the_view_is_what_the_target_holds() {
        let local = a_d_x();
        let same = Baseline::of(walk::manifest_of(&local), &local);
        assert_eq!(same.differing(), 0);
        assert!(same.diff(&local).is_empty());

        // The target holds an older `a`, no `d/x`, and a `gone` the local tree does not have.
        let held: Manifest = [("a", file(b"old")), ("d", Entry::Dir), ("gone", file(b"g"))]
            .into_iter()
            .map(|(p, e)| (p.to_string(), e))
            .collect();
        let baseline = Baseline::of(held.clone(), &local);
        assert_eq!(baseline.differing(), 3);
        let whole: Manifest = baseline.view(&local).sorted().map(|(p, e)| (p.to_string(), e.clone())).collect();
        assert_eq!(whole, held, "the view is the target's manifest");
        assert_eq!(
            baseline.diff(&local),
            super::super::diff::diff(&held, &local),
            "the delta's diff is the whole diff"
        );
    }

    #[test]
    fn records_taken_one_by_one_in_any_order_build_the_same_baseline() {
        let local = a_d_x();
        // The target: an older `a`, `d`, no `d/x`, and a `gone` the local tree lacks.
        let held = [("a", file(b"old")), ("d", Entry::Dir), ("gone", file(b"g"))];
        let whole = |baseline: &Baseline| -> Manifest {
            baseline.view(&local).sorted().map(|(p, e)| (p.to_string(), e.clone())).collect()
        };
        let sorted = Baseline::of(held.iter().map(|(p, e)| (p.to_string(), e.clone())).collect(), &local);
        for order in [[2, 0, 1], [1, 2, 0], [0, 2, 1]] {
            let mut builder = Builder::new(&local);
            for i in order {
                builder.held(held[i].0.to_string(), held[i].1.clone());
            }
            let built = builder.finish();
            assert_eq!(whole(&built), whole(&sorted), "order {order:?}");
            assert_eq!(built.differing(), 3, "a, d/x and gone differ");
        }
    }

    #[test]
    fn an_empty_target_keeps_no_delta_while_it_is_filled_in_order() {
        let local = a_d_x();
        let mut baseline = Baseline::of(Manifest::new(), &local);
        assert_eq!(baseline.differing(), 0, "nothing stored for an empty target");
        assert_eq!(baseline.diff(&local), super::super::diff::diff(&Manifest::new(), &local));
        assert_eq!(baseline.entry(&local, "a"), None);
        let upserts = vec![("a".to_string(), file(b"a")), ("d".to_string(), Entry::Dir)];
        fold(&mut baseline, &local, &mut Refused::new(), Sent { deletes: &[], chmods: &[], upserts }, &answer(&[]));
        assert_eq!(baseline.differing(), 0, "the base follows the local tree up to `d`");
        assert_eq!(baseline.entry(&local, "a"), Some(&file(b"a")));
        assert_eq!(baseline.entry(&local, "d/x"), None);
        assert_eq!(baseline.diff(&local), [Change::Upsert { path: "d/x".into(), entry: file(b"x") }]);
        baseline.rebase(&local);
        assert_eq!(
            baseline.diff(&local),
            [Change::Upsert { path: "d/x".into(), entry: file(b"x") }],
            "cut short: d/x still to send"
        );
        let upserts = vec![("d/x".to_string(), file(b"x"))];
        fold(&mut baseline, &local, &mut Refused::new(), Sent { deletes: &[], chmods: &[], upserts }, &answer(&[]));
        baseline.rebase(&local);
        assert_eq!(baseline.differing(), 0);
        assert!(baseline.diff(&local).is_empty());
        assert_eq!(baseline.base, Base::Local, "past the last path, the base is the whole local tree");
    }

    #[test]
    fn an_empty_target_filled_in_order_keeps_only_the_paths_it_did_not_get() {
        let local = a_d_x();
        let mut baseline = Baseline::of(Manifest::new(), &local);
        let mut refused = Refused::new();
        // `a` refused by the agent, `d` not sent at all (it vanished while packing), `d/x` taken.
        let upserts = vec![("a".to_string(), file(b"a")), ("d/x".to_string(), file(b"x"))];
        fold(&mut baseline, &local, &mut refused, Sent { deletes: &[], chmods: &[], upserts }, &answer(&[0]));
        assert_eq!(baseline.differing(), 2, "a and d hold nothing in the target");
        assert_eq!(baseline.entry(&local, "a"), None);
        assert_eq!(baseline.entry(&local, "d"), None);
        assert_eq!(baseline.entry(&local, "d/x"), Some(&file(b"x")));
        assert!(refused.contains_key("a"));
        assert_eq!(
            baseline.diff(&local),
            [
                Change::Upsert { path: "a".into(), entry: file(b"a") },
                Change::Upsert { path: "d".into(), entry: Entry::Dir }
            ]
        );
        // Past the bound the local tree is not the base: nothing to pin there.
        let mut tail = Baseline::of(Manifest::new(), &local);
        let upserts = vec![("a".to_string(), file(b"a"))];
        fold(&mut tail, &local, &mut Refused::new(), Sent { deletes: &[], chmods: &[], upserts }, &answer(&[]));
        tail.pin("a", Some(&file(b"a")));
        tail.pin("d/x", Some(&file(b"x")));
        assert_eq!(tail.differing(), 1, "only `a`, within the bound, is pinned");
        assert_eq!(tail.entry(&local, "d/x"), None);
    }

    #[test]
    fn a_pinned_path_keeps_what_the_target_holds_while_the_local_tree_moves_on() {
        let mut local: Tree = [("a".to_string(), scanned(file(b"1")))].into_iter().collect();
        let mut baseline = Baseline::default();
        // The local tree changes `a` and gains `b`: pinned first, the target still holds `1`.
        baseline.pin("a", Some(&file(b"1")));
        baseline.pin("b", None);
        local.insert("a".into(), scanned(file(b"2")));
        local.insert("b".into(), scanned(file(b"b")));
        assert_eq!(
            baseline.diff(&local),
            [
                Change::Upsert { path: "a".into(), entry: file(b"2") },
                Change::Upsert { path: "b".into(), entry: file(b"b") }
            ]
        );
        // A second pin of a pinned path changes nothing.
        baseline.pin("a", Some(&file(b"2")));
        assert_eq!(baseline.entry(&local, "a"), Some(&file(b"1")));
        // Both applied: the delta is empty again.
        let sent =
            Sent { deletes: &[], chmods: &[], upserts: vec![("a".into(), file(b"2")), ("b".into(), file(b"b"))] };
        fold(&mut baseline, &local, &mut Refused::new(), sent, &answer(&[]));
        assert_eq!(baseline.differing(), 0);
    }
}
