//! The OTLP/gRPC trace protocol (`opentelemetry.proto.*`), generated at build time from the
//! vendored OpenTelemetry .proto files (`crates/proxy/proto/opentelemetry`). The server side
//! is generated too: tests run a collector with it.
#![allow(missing_docs, clippy::all)]

pub mod opentelemetry {
    pub mod proto {
        pub mod common {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.common.v1");
            }
        }
        pub mod resource {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.resource.v1");
            }
        }
        pub mod trace {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.trace.v1");
            }
        }
        pub mod collector {
            pub mod trace {
                pub mod v1 {
                    tonic::include_proto!("opentelemetry.proto.collector.trace.v1");
                }
            }
        }
    }
}

pub use self::opentelemetry::proto::collector::trace::v1 as collector;
pub use self::opentelemetry::proto::common::v1 as common;
pub use self::opentelemetry::proto::resource::v1 as resource;
pub use self::opentelemetry::proto::trace::v1 as trace;
