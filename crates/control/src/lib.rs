//! The Plexus control plane: the resource store (behind one [`store::Store`] trait: an
//! embedded redb file today, etcd and Kubernetes as further backends), the data dir with its
//! tokens, and the HTTP resource API the CLI uses.
//!
//! It never touches application traffic.

pub mod api;
pub mod api_types;
pub mod apply_log;
pub mod bench_results;
pub mod certify;
pub mod dashboard;
pub mod datadir;
pub mod discovery;
pub mod graph;
pub mod grpc_tls;
pub mod identity;
pub mod index;
pub mod node_agent;
pub mod proxies;
pub mod proxy_admin;
pub mod store;
pub mod tap;
pub mod tokens;
pub mod traffic;
pub mod views;
