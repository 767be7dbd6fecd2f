//! `plexus bench`: the mesh's load generator, as a library.
//!
//! * Open model by default ([`Load::ConstantRate`]): request *i* has the intended send time
//!   `start + i / rate`, computed from one absolute start instant (no interval timer, so no
//!   drift), and its latency is measured from that intended time — a request held back because
//!   every connection was busy (a stalled target) is charged for the wait, which corrects
//!   coordinated omission the way wrk2 does.
//! * [`Load::MaxThroughput`] is a closed loop (each connection or stream sends its next request
//!   when the previous one completes): it measures capacity; its latencies are service times
//!   and hide stalls, and every output says so.
//! * HTTP/1.1 (keep-alive or a new connection per request), HTTP/2 with N streams per
//!   connection, gRPC unary with a raw protobuf payload — all over hyper's client connections.
//! * Few tasks (one per connection, on `threads` single-threaded runtimes) and no per-request
//!   locking: every connection records into its own HDR histograms, merged at the end.
//!
//! Results: [`RunResult`] (histograms and counts), [`smp`] (the Service Mesh Performance
//! `PerformanceTestResult` / `PerformanceTestConfig` documents), [`summary`] (the human
//! summary), [`compare`] (two results side by side).

pub mod compare;
mod config;
mod conn;
pub mod env;
mod error;
pub mod overhead;
pub mod profile;
mod recorder;
mod request;
mod result;
mod run;
mod schedule;
pub mod smp;
pub mod summary;
mod target;
mod worker;

pub use config::{BenchConfig, Load, Protocol};
pub use error::{BenchError, ErrorKind};
pub use result::RunResult;
pub use run::{Progress, run};
pub use target::Target;
