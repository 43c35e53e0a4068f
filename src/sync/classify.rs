//! What a set of local changes calls for. Pure: no IO.

use crate::config::Globs;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    Nothing,
    /// Sync the changes; restart the app unless every changed path is a `no_restart` one.
    Sync {
        restart: bool,
    },
    /// A build or deploy input changed: the image is stale. `path` is the first such path.
    Rebuild {
        path: String,
        pattern: String,
    },
}

#[derive(Clone, Debug)]
pub struct Rules {
    pub rebuild: Globs,
    pub no_restart: Globs,
}

/// One changed path, and whether it is (or was) a folder.
pub type Changed<'a> = (&'a str, bool);

/// Classifies the paths that changed locally. A folder alone never calls for a restart or a
/// rebuild: what matters is the files in it, which are listed on their own.
pub fn classify<'a>(changed: impl IntoIterator<Item = Changed<'a>>, rules: &Rules) -> Plan {
    plan(changed, rules, true)
}

/// The plan for a sync that brings a target up to date (initial sync, resync after reconnect):
/// rebuild rules do not apply, the image was built for this source.
pub fn classify_resync<'a>(changed: impl IntoIterator<Item = Changed<'a>>, rules: &Rules) -> Plan {
    plan(changed, rules, false)
}

fn plan<'a>(changed: impl IntoIterator<Item = Changed<'a>>, rules: &Rules, rebuild: bool) -> Plan {
    let mut any = false;
    let mut restart = false;
    for (path, is_dir) in changed {
        if is_dir {
            any = true;
            continue;
        }
        if rebuild {
            if let Some(pattern) = rules.rebuild.first_match(path) {
                return Plan::Rebuild { path: path.to_owned(), pattern: pattern.to_owned() };
            }
        }
        any = true;
        restart |= !rules.no_restart.is_match(path);
    }
    match (any, restart) {
        (false, _) => Plan::Nothing,
        (true, restart) => Plan::Sync { restart },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            rebuild: Globs::new(&["Dockerfile*".into(), "charts/**".into(), "devloop.yaml".into()]),
            no_restart: Globs::new(&["wwwroot/**".into()]),
        }
    }

    #[test]
    fn nothing_changed() {
        assert_eq!(classify([], &rules()), Plan::Nothing);
    }

    #[test]
    fn folders_alone_sync_without_restart() {
        assert_eq!(classify([("wwwroot", true), ("wwwroot/site.css", false)], &rules()), Plan::Sync { restart: false });
        assert_eq!(classify([("src/new", true)], &rules()), Plan::Sync { restart: false });
        assert_eq!(classify([("charts", true)], &rules()), Plan::Sync { restart: false });
    }

    #[test]
    fn code_change_restarts() {
        assert_eq!(
            classify([("Program.cs", false), ("wwwroot/site.css", false)], &rules()),
            Plan::Sync { restart: true }
        );
    }

    #[test]
    fn static_files_only_sync_without_restart() {
        assert_eq!(
            classify([("wwwroot/site.css", false), ("wwwroot/js/app.js", false)], &rules()),
            Plan::Sync { restart: false }
        );
    }

    #[test]
    fn build_inputs_need_a_rebuild_naming_the_file() {
        assert_eq!(
            classify([("Program.cs", false), ("charts/web/values.yaml", false)], &rules()),
            Plan::Rebuild { path: "charts/web/values.yaml".into(), pattern: "charts/**".into() }
        );
        assert!(matches!(classify([("Dockerfile.develop", false)], &rules()), Plan::Rebuild { .. }));
    }

    #[test]
    fn resync_ignores_rebuild_rules() {
        assert_eq!(classify_resync([("Dockerfile", false)], &rules()), Plan::Sync { restart: true });
        assert_eq!(classify_resync([], &rules()), Plan::Nothing);
    }
}
