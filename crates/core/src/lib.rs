//! Plexus core: the resource kinds users write, their validation, and the pure decisions the
//! proxy and control plane share (name resolution, route matching, config compilation).
//!
//! Nothing here does I/O or depends on an async runtime, so every decision is unit-testable
//! synchronously (see `docs/ARCHITECTURE.md`, "Decisions are pure functions").

pub mod authz;
pub mod check;
pub mod decide;
pub mod duration;
pub mod explain;
pub mod external;
pub mod gateway;
pub mod latency;
pub mod load;
pub mod model;
pub mod names;
pub mod normalize;
pub mod policy;
pub mod resource;
pub mod route;
pub mod tap;
pub mod time;
mod validate;

pub use load::{LoadError, ValidationError, parse_documents, resource_from_value};
pub use model::{AppProtocol, CompiledPort, CompiledService, Endpoint, EndpointSet, MeshSnapshot};
pub use names::ServiceName;
pub use resource::{Kind, ObjectMeta, Resource, Spec};
pub use validate::dns_name;
