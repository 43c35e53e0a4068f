//! Which paths of a tree take part in sync: what the image's build context would hold.
//!
//! Dotfiles are in; `.git/` and the reserved `.devloop/` never are; `.gitignore` files (at every
//! level), the root `.dockerignore` and the configured excludes (gitignore syntax) leave paths out.
//! The same [`Filter`] drives the full walk, the targeted rescans of the watcher and the CLI's
//! reading of the agent's manifest, so the three always agree.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use ignore::Match;

use crate::relpath;
use crate::RESERVED_DIR;

pub const GITIGNORE: &str = ".gitignore";
pub const DOCKERIGNORE: &str = ".dockerignore";

#[derive(Debug, thiserror::Error)]
#[error("bad exclude pattern `{pattern}`: {source}")]
pub struct FilterError {
    pattern: String,
    source: ignore::Error,
}

pub struct Filter {
    root: PathBuf,
    /// The configured excludes by the depth of the paths they can match: `excludes[d - 1]`
    /// holds those that can match a path of `d` components (every pattern that matches at any
    /// depth, and the anchored ones of exactly that depth), the last one serves every deeper
    /// path. An anchored pattern such as `/values.dev.yaml` costs nothing below the root.
    excludes: Vec<Gitignore>,
    /// Reading the tree as docker's build context for this Dockerfile: only the root
    /// `.dockerignore` applies (not `.gitignore`), and the Dockerfile itself is always in, as
    /// `docker build` sends it whatever `.dockerignore` says.
    docker_context: Option<String>,
    /// Per folder (relative path, "" for the root): its ignore rules, read lazily.
    folders: RwLock<HashMap<String, Option<Arc<Gitignore>>>>,
}

impl Filter {
    pub fn new(root: &Path, excludes: &[String]) -> Result<Filter, FilterError> {
        Filter::with(root, excludes, None)
    }

    /// A filter for the build context of `dockerfile` (see [`Filter::docker_context`]) when it
    /// is named, else the sync's filter.
    pub fn with(root: &Path, excludes: &[String], docker_context: Option<&str>) -> Result<Filter, FilterError> {
        let depths: Vec<Option<usize>> = excludes.iter().map(|pattern| fixed_depth(pattern)).collect();
        let deepest = depths.iter().flatten().copied().max().unwrap_or(0);
        // Each set keeps the patterns' order: of the patterns that match a path, the last wins.
        let excludes = (1..=deepest + 1)
            .map(|depth| {
                let mut builder = GitignoreBuilder::new(root);
                for (pattern, fixed) in excludes.iter().zip(&depths) {
                    if fixed.is_none_or(|fixed| fixed == depth) {
                        let line = builder.add_line(None, pattern);
                        line.map_err(|source| FilterError { pattern: pattern.clone(), source })?;
                    }
                }
                builder.build().map_err(|source| FilterError { pattern: excludes.join(" "), source })
            })
            .collect::<Result<_, _>>()?;
        Ok(Filter {
            root: root.to_path_buf(),
            excludes,
            docker_context: docker_context.map(str::to_owned),
            folders: RwLock::new(HashMap::new()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether `rel` is left out, checking every parent folder too (a path under an excluded
    /// folder is excluded, as git and docker do).
    pub fn is_excluded(&self, rel: &str, is_dir: bool) -> bool {
        relpath::ancestors(rel).any(|dir| self.excluded_here(dir, true)) || self.excluded_here(rel, is_dir)
    }

    /// Whether `rel` is left out by its own name, given that its parent folders are not.
    pub fn excluded_here(&self, rel: &str, is_dir: bool) -> bool {
        let folder = rel.rfind('/').map_or("", |cut| &rel[..cut]);
        self.in_folder(folder).excluded(rel, is_dir)
    }

    /// The rules that decide the entries of `folder`, looked up once for all of them (a walk
    /// asks for every entry of a folder in a row).
    pub fn in_folder(&self, folder: &str) -> InFolder<'_> {
        let mut rules = Vec::new();
        let mut at = folder;
        loop {
            if let Some(found) = self.rules(at) {
                rules.push((at.len(), found));
            }
            if at.is_empty() {
                break;
            }
            at = at.rfind('/').map_or("", |cut| &at[..cut]);
        }
        // An entry's name follows the folder's path and a `/`; its depth is the folder's slashes.
        let (name_at, depth) =
            if folder.is_empty() { (0, 0) } else { (folder.len() + 1, folder.matches('/').count() + 1) };
        InFolder { filter: self, rules, name_at, depth }
    }

    fn rules(&self, folder: &str) -> Option<Arc<Gitignore>> {
        if let Some(found) = self.folders.read().expect("filter cache poisoned").get(folder) {
            return found.clone();
        }
        let loaded = self.load(folder);
        self.folders.write().expect("filter cache poisoned").insert(folder.to_owned(), loaded.clone());
        loaded
    }

    fn load(&self, folder: &str) -> Option<Arc<Gitignore>> {
        let dir = if folder.is_empty() { self.root.clone() } else { self.root.join(folder) };
        let mut builder = GitignoreBuilder::new(&dir);
        let mut any = false;
        let mut names = Vec::new();
        if self.docker_context.is_none() {
            names.push(GITIGNORE);
        }
        if folder.is_empty() {
            // Docker reads only the build context's own .dockerignore.
            names.push(DOCKERIGNORE);
        }
        for name in names {
            let file = dir.join(name);
            if file.is_file() {
                // A broken line is skipped by the builder's error; the rest still applies.
                let _ = builder.add(&file);
                any = true;
            }
        }
        if !any {
            return None;
        }
        builder.build().ok().filter(|g| !g.is_empty()).map(Arc::new)
    }

    /// Forgets the rules read so far (an ignore file changed).
    pub fn reload(&self) {
        self.folders.write().expect("filter cache poisoned").clear();
    }

    /// Whether a change at `rel` changes the rules themselves.
    pub fn is_rule_file(rel: &str) -> bool {
        let name = rel.rsplit('/').next().unwrap_or(rel);
        name == GITIGNORE || rel == DOCKERIGNORE
    }
}

/// What decides the entries of one folder: the exclude patterns, and the rule files of the
/// folder and of every folder above it.
/// How many components every path that the gitignore `pattern` can match has, when that is
/// fixed: a pattern anchored where it is read (a `/` at its start or in its middle) whose every
/// wildcard stays within one component (`*` and `?` never match a `/` in gitignore). `None`
/// for any depth: no `/` but a trailing one, a `**`, or a class, alternation, escape or space
/// (whatever could stand for a `/` or change how the line reads).
fn fixed_depth(pattern: &str) -> Option<usize> {
    let line = pattern.strip_prefix('!').unwrap_or(pattern);
    let line = line.strip_suffix('/').unwrap_or(line);
    if line.contains("**") || line.contains(['[', ']', '{', '}', '\\', ' ', '\t', '#']) {
        return None;
    }
    let anchored = line.strip_prefix('/');
    let body = anchored.unwrap_or(line);
    if anchored.is_none() && !body.contains('/') {
        return None;
    }
    let components: Vec<&str> = body.split('/').collect();
    (!components.iter().any(|c| c.is_empty())).then_some(components.len())
}

pub struct InFolder<'a> {
    filter: &'a Filter,
    /// The folders that have rules, nearest first: the length of the folder's path, its rules.
    rules: Vec<(usize, Arc<Gitignore>)>,
    /// Where an entry's name begins in its path, and how many `/` the path holds (the same for
    /// every entry of the folder: worked out once, not per entry).
    name_at: usize,
    depth: usize,
}

impl InFolder<'_> {
    /// Whether `rel`, an entry of this folder, is left out by its own name.
    pub fn excluded(&self, rel: &str, is_dir: bool) -> bool {
        let filter = self.filter;
        let name = rel.get(self.name_at..).unwrap_or(rel);
        if name == ".git" || rel == RESERVED_DIR {
            return true;
        }
        if filter.docker_context.as_deref() == Some(rel) {
            return false;
        }
        let excludes = &filter.excludes[self.depth.min(filter.excludes.len() - 1)];
        if excludes.matched(rel, is_dir).is_ignore() {
            return true;
        }
        // The deepest folder with a rule about this path decides.
        for (len, rules) in &self.rules {
            let below = if *len == 0 { rel } else { &rel[len + 1..] };
            match rules.matched(below, is_dir) {
                Match::None => {}
                Match::Ignore(_) => return true,
                Match::Whitelist(_) => return false,
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, body) in files {
            let p = dir.path().join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, body).unwrap();
        }
        dir
    }

    #[test]
    fn git_folder_and_reserved_folder_never_sync() {
        let dir = tree(&[]);
        let f = Filter::new(dir.path(), &[]).unwrap();
        assert!(f.is_excluded(".git", true));
        assert!(f.is_excluded(".git/config", false));
        assert!(f.is_excluded("sub/.git/HEAD", false));
        assert!(f.is_excluded(".devloop/staging", true));
        assert!(!f.is_excluded(".env", false));
        assert!(!f.is_excluded(".gitignore", false));
    }

    #[test]
    fn nested_gitignore_and_whitelist() {
        let dir = tree(&[
            (".gitignore", "*.log\nbin/\n"),
            ("sub/.gitignore", "!keep.log\nlocal.txt\n"),
            (".dockerignore", "secrets\n"),
        ]);
        let f = Filter::new(dir.path(), &["docs/**".into()]).unwrap();
        assert!(f.is_excluded("a.log", false));
        assert!(f.is_excluded("x/a.log", false));
        assert!(!f.is_excluded("sub/keep.log", false));
        assert!(f.is_excluded("sub/other.log", false));
        assert!(f.is_excluded("sub/local.txt", false));
        assert!(!f.is_excluded("local.txt", false));
        assert!(f.is_excluded("bin", true));
        assert!(f.is_excluded("bin/app.dll", false));
        assert!(f.is_excluded("secrets", false));
        assert!(f.is_excluded("docs/readme.md", false));
        assert!(!f.is_excluded("src/main.rs", false));
    }

    /// The excludes split by depth decide every path as the whole list does, whitelists and
    /// their order included.
    #[test]
    fn excludes_split_by_depth_decide_as_the_whole_list() {
        let dir = tree(&[]);
        let lists: [&[&str]; 5] = [
            &["/values.dev.yaml", "/devloop-agent"],
            &["/a/*.log", "!/a/keep.log", "*.log", "!b/c/keep.log"],
            &["a/b/", "/x", "!a/b", "**/deep/*", "a/b/c/d", "c?/[d]/e"],
            &["/a", "!/a", "a/*/c", "/*/b/", "!x/b"],
            &["a/**/b", "/z/y", "!/z/y", "z/y", "/top/", "# not/a/path", "q/r\\ ", "{a,b}/c"],
        ];
        let paths = [
            "values.dev.yaml",
            "a/values.dev.yaml",
            "devloop-agent",
            "a",
            "a/b",
            "a/b/c",
            "a/b/c/d",
            "a/x.log",
            "a/keep.log",
            "b/c/keep.log",
            "a/b/c/keep.log",
            "x",
            "x/b",
            "y/b",
            "z/y",
            "z/y/w",
            "top",
            "a/deep/f",
            "c1/d/e",
            "q/r ",
            "b/c",
            "a/q/b",
        ];
        for list in lists {
            let list: Vec<String> = list.iter().map(|p| p.to_string()).collect();
            let split = Filter::new(dir.path(), &list).unwrap();
            let mut builder = GitignoreBuilder::new(dir.path());
            for pattern in &list {
                builder.add_line(None, pattern).unwrap();
            }
            let whole = builder.build().unwrap();
            for path in paths {
                for is_dir in [false, true] {
                    let depth = path.matches('/').count();
                    let at = &split.excludes[depth.min(split.excludes.len() - 1)];
                    assert_eq!(
                        at.matched(path, is_dir).is_ignore(),
                        whole.matched(path, is_dir).is_ignore(),
                        "{path} (dir: {is_dir}) under {list:?}"
                    );
                }
            }
        }
        assert_eq!(fixed_depth("/values.dev.yaml"), Some(1));
        assert_eq!(fixed_depth("!a/*/c/"), Some(3));
        assert_eq!(fixed_depth("*.log"), None);
        assert_eq!(fixed_depth("a/**/b"), None);
        assert_eq!(fixed_depth("[/]x/y"), None);
    }

    #[test]
    fn dockerignore_only_counts_at_the_root() {
        let dir = tree(&[("sub/.dockerignore", "*\n")]);
        let f = Filter::new(dir.path(), &[]).unwrap();
        assert!(!f.is_excluded("sub/file", false));
    }

    #[test]
    fn bad_exclude_pattern_is_an_error() {
        let dir = tree(&[]);
        let err = Filter::new(dir.path(), &["src/{a".into()]).err().unwrap();
        assert!(err.to_string().contains("src/{a"), "{err}");
    }

    /// Docker's build context: `.dockerignore` only (Visual Studio's lists `**/Dockerfile*` and
    /// `**/charts`), the Dockerfile always sent.
    #[test]
    fn the_build_context_is_what_docker_sends() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".dockerignore"), "**/Dockerfile*\n**/charts\n").unwrap();
        std::fs::write(dir.path().join(".gitignore"), "bin/\n").unwrap();
        let context = Filter::with(dir.path(), &[], Some("Dockerfile.develop")).unwrap();
        assert!(!context.is_excluded("Dockerfile.develop", false), "the Dockerfile is always sent");
        assert!(context.is_excluded("Dockerfile", false));
        assert!(context.is_excluded("charts/web/values.yaml", false));
        assert!(!context.is_excluded("bin/app.dll", false), ".gitignore does not shape the build context");
        let sync = Filter::new(dir.path(), &[]).unwrap();
        assert!(sync.is_excluded("Dockerfile.develop", false));
        assert!(sync.is_excluded("bin/app.dll", false));
    }
}
