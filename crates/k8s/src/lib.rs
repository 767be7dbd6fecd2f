//! Kubernetes mode (SPEC §2, §11): the Plexus kinds as CRDs, the Kubernetes API as the
//! control plane's store, identity from ServiceAccount tokens, and sidecar injection.
//!
//! Everything that depends on `kube` / `k8s-openapi` lives in this one leaf crate, so the rest
//! of the workspace compiles without them.

pub mod access;
pub mod crd;
pub mod identity;
pub mod inject;
pub mod install;
pub mod leader;
pub mod secrets;
pub mod status;
pub mod store;
pub mod translate;
pub mod webhook;
