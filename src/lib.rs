//! devloop: edit on your laptop, and the change is inside the running dev container within
//! milliseconds. See ARCHITECTURE.md for the map.
//!
//! One round: `watch ─► scan ─► diff ─► classify ─► pack ─► transport ─► agent`.

pub mod classify;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod diff;
pub mod list;
pub mod pack;
pub mod prep;
pub mod report;
pub mod scan;
pub mod session;
pub mod settings;
pub mod transport;
pub mod tunnel;
pub mod up;
pub mod watch;
