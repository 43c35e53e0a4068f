//! devloop: edit on your laptop, and the change is inside the running dev container within
//! milliseconds. See ARCHITECTURE.md for the map.
//!
//! The rooms: `sync` (the core: watch ─► scan ─► diff ─► classify ─► pack ─► client ─► agent),
//! `kubernetes` (the edge: cluster access, the exec transport, release, tunnels, lists, `up`),
//! `prep` (project files), `cli` (flags, settings), and what all share: `config`, `report`,
//! `error`, `commands`.

pub mod cli;
pub mod commands;
pub mod config;
pub mod error;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod prep;
pub mod report;
pub mod sync;
