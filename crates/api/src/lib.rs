//! The proxy ↔ control plane protocol (gRPC), generated from `proto/`.

pub mod codec;

/// `plexus.discovery.v1`: the discovery watch stream.
pub mod discovery {
    tonic::include_proto!("plexus.discovery.v1");
}

/// `plexus.identity.v1`: workload certificate signing.
pub mod identity {
    tonic::include_proto!("plexus.identity.v1");
}
