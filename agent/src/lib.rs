//! devloop's agent: the process inside the dev container that applies synced batches atomically
//! and (later) supervises the app, plus the wire protocol the devloop CLI speaks to it.
//!
//! The CLI depends on this crate with `default-features = false, features = ["tree"]`: it gets the
//! protocol, the manifest types and the tree scanner, and none of the agent's runtime.

pub mod manifest;
pub mod protocol;
pub mod relpath;
pub mod units;

#[cfg(feature = "tree")]
pub mod beneath;
#[cfg(feature = "tree")]
pub mod filter;
#[cfg(feature = "tree")]
pub mod tree;
#[cfg(feature = "tree")]
pub mod walk;
#[cfg(feature = "tree")]
pub mod watch;

#[cfg(feature = "runtime")]
pub mod apply;
#[cfg(feature = "runtime")]
pub mod control;
#[cfg(feature = "runtime")]
pub mod index;
#[cfg(feature = "runtime")]
pub mod lock;
#[cfg(feature = "runtime")]
pub mod probe;
#[cfg(feature = "runtime")]
pub mod reap;
#[cfg(feature = "runtime")]
pub mod serve;
#[cfg(feature = "runtime")]
pub mod supervise;
#[cfg(feature = "runtime")]
pub mod targuard;

/// Returns freed heap pages to the OS. A big sync, rescan or walk leaves megabytes of freed
/// buffers that glibc's allocator would otherwise keep, so that a process's steady RSS would not
/// be its live data. (musl's allocator returns them by itself.)
#[cfg(feature = "tree")]
pub fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The reserved folder at the root of every synced tree: the agent's staging area and caches.
/// Never synced, never reported in a manifest.
pub const RESERVED_DIR: &str = ".devloop";
