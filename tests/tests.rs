//! Integration tests: one binary, a module per area. Each test works in a fresh temp folder.
//!
//! Tiers: `sync` runs the real `devloop` and `devloop-agent` binaries end to end with
//! `--target local:` on real trees.

mod support;

mod errors;
mod supervise;
mod sync;
