//! Integration tests: one binary, a module per area. Each test works in a fresh temp folder.
//!
//! Tiers: `sync`, `supervise` and `errors` run the real `devloop` and `devloop-agent` binaries
//! end to end with `--target local:` on real trees; `container` drives a real podman container
//! through `--target cmd:podman exec -i …` (needs the image `tests/run` builds).

mod support;

#[cfg(feature = "kubernetes")]
mod article;

mod container;
mod ecosystem;
#[cfg(feature = "kubernetes")]
mod edge;
mod errors;
mod hardening;
mod index;
#[cfg(feature = "kubernetes")]
mod kubernetes;
#[cfg(feature = "kubernetes")]
mod node;
mod prep;
mod supervise;
mod sync;
