//! Kubernetes mode (SPEC §2, §11): the Plexus kinds as CRDs, the Kubernetes API as the
//! control plane's store, identity from ServiceAccount tokens, and sidecar injection.
//!
//! Everything that depends on `kube` / `k8s-openapi` lives in this one leaf crate, so the rest
//! of the workspace compiles without them.
