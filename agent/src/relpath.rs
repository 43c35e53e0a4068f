//! Relative paths as they travel on the wire, and the checks that keep the agent inside its root.
//!
//! Architecture invariant: every path the agent touches has passed [`check`]; every symlink it
//! creates has passed [`link_stays_inside`].

use std::fmt;

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

/// Whether a symlink at `link` (a checked relative path) pointing at `target` resolves, lexically,
/// to a path inside the root. Absolute targets never do: the root sits at different places on the
/// two ends.
pub fn link_stays_inside(link: &str, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return false;
    }
    // Depth of the folder holding the link.
    let mut depth = link.split('/').count() as isize - 1;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => depth += 1,
        }
    }
    true
}

/// The parent folders of a relative path, outermost first: `a/b/c` → `a`, `a/b`.
pub fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

/// Display helper: a relative path, or `.` for the root.
pub struct Shown<'a>(pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str(".")
        } else {
            f.write_str(self.0)
        }
    }
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
        assert!(link_stays_inside("a", "b"));
        assert!(link_stays_inside("dir/link", "../file"));
        assert!(link_stays_inside("dir/link", "./x/../y"));
        assert!(!link_stays_inside("link", "../outside"));
        assert!(!link_stays_inside("dir/link", "../../outside"));
        assert!(!link_stays_inside("dir/link", "x/../../../etc"));
        assert!(!link_stays_inside("link", "/etc/passwd"));
        assert!(!link_stays_inside("link", ""));
    }

    #[test]
    fn ancestors_are_outermost_first() {
        assert_eq!(ancestors("a/b/c").collect::<Vec<_>>(), ["a", "a/b"]);
        assert_eq!(ancestors("a").count(), 0);
    }
}
