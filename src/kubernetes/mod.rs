//! The Kubernetes edge: reaching a cluster as kubectl does, the service's pods, the exec
//! transport, the Helm release, localhost tunnels, the `list-*` views, and the `up` / `down`
//! flows that tie them to the sync core.
//!
//! Architecture invariant: this is the only room that imports `kube` and `k8s-openapi`; it is
//! built only with the `kubernetes` feature (on by default).

pub mod access;
pub mod build;
pub mod doctor;
pub mod exec;
pub mod list;
pub mod pods;
pub mod registry;
pub mod release;
pub mod tunnel;
pub mod up;

pub use access::{ClusterError, Selection};
pub use exec::KubeTransport;
pub use release::UpError;
