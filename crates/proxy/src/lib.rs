//! The Plexus data plane: the proxy that runs beside every workload (sidecar) and at the mesh
//! edge (gateway).
//!
//! Layout (see `docs/ARCHITECTURE.md`):
//! - [`transport`]: listeners, original destination, protocol detection, TCP forwarding.
//! - [`http`]: the HTTP server side, routing, forwarding through pooled upstream connections,
//!   and the one place errors become responses.
//! - [`clock`]: the time of a server's poll, read once per wake-up, and the `Date` of responses.
//! - [`balance`]: endpoint choice (P2C over peak-EWMA, round robin, least request, ring hash)
//!   and outlier detection.
//! - [`resilience`]: connection limits (circuit breaking) and local rate limiting.
//! - [`discovery`]: the configuration a proxy works from, fed by a resources file (or, later,
//!   the control plane) and swapped atomically.
//! - [`metrics`], [`admin`]: observability and the admin server.
//! - [`trace`]: trace context propagation (W3C, B3) and span export over OTLP/gRPC.
//! - [`proxy`]: wiring it all together and graceful drain.

pub mod admin;
pub mod balance;
pub mod clock;
pub mod control_plane;
pub mod cp_tls;
pub mod discovery;
pub mod dns;
pub mod egress;
pub mod error;
pub mod gateway;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod proxy;
pub mod resilience;
pub mod settings;
pub mod tap;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod transport;

pub use proxy::{Proxy, ProxyHandle};
pub use settings::{LoadBalancer, Settings, UpstreamBind};

/// Errors flowing through boxed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
