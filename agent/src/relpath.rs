//! Relative paths as they travel on the wire, and the checks that keep the agent inside its root.
//!
//! Architecture invariant: every path the agent touches has passed [`check`]; every symlink it
//! creates has passed [`link_is_contained`].

use crate::RESERVED_DIR;

/// Longest path accepted on the wire (Linux's PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("absolute path")]
    Absolute,
    #[error("path climbs out with `..`")]
    ParentDir,
    #[error("path has an empty or `.` component")]
    NotNormal,
    #[error("path holds a NUL byte")]
    Nul,
    #[error("path is inside the reserved `{RESERVED_DIR}` folder")]
    Reserved,
    #[error("path is longer than {MAX_PATH_LEN} bytes")]
    TooLong,
}

/// Accepts `a/b/c`; refuses `/a`, `a/../b`, `a//b`, `./a`, `a/`, NUL bytes and the reserved folder.
pub fn check(path: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute);
    }
    if path.contains('\0') {
        return Err(PathError::Nul);
    }
    for (i, part) in path.split('/').enumerate() {
        match part {
            ".." => return Err(PathError::ParentDir),
            "" | "." => return Err(PathError::NotNormal),
            _ if i == 0 && part == RESERVED_DIR => return Err(PathError::Reserved),
            _ => {}
        }
    }
    Ok(())
}

/// Whether a symlink at `link` (a checked relative path) pointing at `target` can only ever
/// resolve inside the root, whatever other symlinks the root holds.
///
/// A lexical check is not enough: with `b -> .`, the target `b/..` of a link at the top climbs
/// above the root, because `..` applies to where `b` leads, not to `b`. So a target must be in
/// the form `../../name/name`: its `..`s first (no more of them than the link is deep), then only
/// names (`.` components are skipped). Its `..`s then climb real folders of the root, and every
/// name is looked up inside the root, where every symlink obeys the same rule. Absolute targets
/// never pass: the root sits at different places on the two ends.
pub fn link_is_contained(link: &str, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') || target.contains('\0') || target.len() > MAX_PATH_LEN {
        return false;
    }
    // Depth of the folder holding the link.
    let depth = link.split('/').count() - 1;
    let mut ups = 0;
    let mut named = false;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." if named => return false,
            ".." => ups += 1,
            _ => named = true,
        }
    }
    ups <= depth
}

/// The paths of `paths` that are not below another of them ("" is the root, above all): a
/// rescan of a folder reads everything under it. Sorted.
pub fn outermost(paths: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut paths: Vec<String> = paths.into_iter().collect();
    paths.sort_unstable();
    let mut kept: Vec<String> = Vec::new();
    for path in paths {
        let covered = kept.last().is_some_and(|last| {
            last.is_empty() || path.strip_prefix(last.as_str()).is_some_and(|rest| rest.starts_with('/'))
        });
        if !covered {
            kept.push(path);
        }
    }
    kept
}

/// The parent folders of a relative path, outermost first: `a/b/c` → `a`, `a/b`.
pub fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_relative_paths() {
        for ok in ["a", "a/b/c", ".env", "dir/.gitignore", "a..b", "...", "x/..y"] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_escapes_and_oddities() {
        assert_eq!(check(""), Err(PathError::Empty));
        assert_eq!(check("/etc/passwd"), Err(PathError::Absolute));
        assert_eq!(check("../x"), Err(PathError::ParentDir));
        assert_eq!(check("a/../../x"), Err(PathError::ParentDir));
        assert_eq!(check("a//b"), Err(PathError::NotNormal));
        assert_eq!(check("./a"), Err(PathError::NotNormal));
        assert_eq!(check("a/"), Err(PathError::NotNormal));
        assert_eq!(check("a\0b"), Err(PathError::Nul));
        assert_eq!(check(".devloop/staging/x"), Err(PathError::Reserved));
        assert_eq!(check("sub/.devloop"), Ok(()));
        assert_eq!(check(&"a/".repeat(3000)), Err(PathError::TooLong));
    }

    #[test]
    fn symlinks_must_resolve_inside_the_root() {
        assert!(link_is_contained("a", "b"));
        assert!(link_is_contained("a", "."));
        assert!(link_is_contained("dir/link", "../file"));
        assert!(link_is_contained("dir/link", "./x/y"));
        assert!(link_is_contained("node_modules/.bin/tsc", "../typescript/bin/tsc"));
        assert!(!link_is_contained("link", "../outside"));
        assert!(!link_is_contained("dir/link", "../../outside"));
        assert!(!link_is_contained("dir/link", "x/../../../etc"));
        assert!(!link_is_contained("link", "/etc/passwd"));
        assert!(!link_is_contained("link", "//tmp"));
        assert!(!link_is_contained("link", ""));
    }

    /// The attack's chains: each link passes a lexical check, together they climb out.
    #[test]
    fn a_dotdot_after_a_name_is_refused() {
        // `b -> .` then `l -> b/..`: `..` of wherever `b` leads.
        assert!(link_is_contained("b", "."));
        assert!(!link_is_contained("l", "b/.."));
        // `d/up -> ..` then `x -> d/up/..`.
        assert!(link_is_contained("d/up", ".."));
        assert!(!link_is_contained("x", "d/up/.."));
        // `k -> b/b/b/../../..`.
        assert!(!link_is_contained("k", "b/b/b/../../.."));
        assert!(!link_is_contained("dir/link", "./x/../y"));
    }

    #[test]
    fn ancestors_are_outermost_first() {
        assert_eq!(ancestors("a/b/c").collect::<Vec<_>>(), ["a", "a/b"]);
        assert_eq!(ancestors("a").count(), 0);
    }
}
