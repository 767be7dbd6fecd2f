//! The proxy ↔ control plane protocol (gRPC), generated from `proto/`.

/// `plexus.discovery.v1`: the discovery watch stream.
pub mod discovery {
    tonic::include_proto!("plexus.discovery.v1");
}
