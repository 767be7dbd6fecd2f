//! The resource kinds users write (SPEC §4), as typed serde structs.
//!
//! Every struct denies unknown fields: a typo in a resource is a validation error, never a
//! silently ignored setting. Only `metadata.resourceVersion`, `uid`, `creationTimestamp` and the
//! top-level `status` are accepted and ignored (SPEC §1).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

mod gateway;
mod policy;
mod smi;

pub use gateway::*;
pub use policy::*;
pub use smi::*;

/// The group of Plexus's own kinds.
pub const PLEXUS_GROUP: &str = "plexus.dev";
/// The Gateway API group.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// A kind of resource this version understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum Kind {
    MeshConfig,
    Service,
    Workload,
    ExternalService,
    #[serde(rename = "HTTPRouteGroup")]
    HttpRouteGroup,
    FaultInjection,
    Gateway,
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
    #[serde(rename = "GRPCRoute")]
    GrpcRoute,
    TrafficSplit,
    TrafficTarget,
    AuthorizationPolicy,
    ResiliencePolicy,
    RateLimitPolicy,
}

impl Kind {
    /// Every kind, in apply order (what is referenced before what references it).
    pub const ALL: [Kind; 14] = [
        Kind::MeshConfig,
        Kind::Service,
        Kind::Workload,
        Kind::ExternalService,
        Kind::HttpRouteGroup,
        Kind::FaultInjection,
        Kind::Gateway,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::TrafficSplit,
        Kind::TrafficTarget,
        Kind::AuthorizationPolicy,
        Kind::ResiliencePolicy,
        Kind::RateLimitPolicy,
    ];

    /// The kind's name as written in `kind:`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::MeshConfig => "MeshConfig",
            Kind::Service => "Service",
            Kind::Workload => "Workload",
            Kind::ExternalService => "ExternalService",
            Kind::HttpRouteGroup => "HTTPRouteGroup",
            Kind::FaultInjection => "FaultInjection",
            Kind::Gateway => "Gateway",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::TrafficSplit => "TrafficSplit",
            Kind::TrafficTarget => "TrafficTarget",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::ResiliencePolicy => "ResiliencePolicy",
            Kind::RateLimitPolicy => "RateLimitPolicy",
        }
    }

    /// The `apiVersion` this kind is written with.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::HttpRoute | Kind::GrpcRoute | Kind::Gateway => "gateway.networking.k8s.io/v1",
            Kind::TrafficSplit => "split.smi-spec.io/v1alpha4",
            Kind::TrafficTarget => "access.smi-spec.io/v1alpha4",
            Kind::HttpRouteGroup => "specs.smi-spec.io/v1alpha4",
            _ => "plexus.dev/v1alpha1",
        }
    }

    /// Resolves a kind from `kind:` (case-sensitive, as in manifests).
    pub fn from_manifest(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == kind)
    }

    /// Resolves a kind as the CLI accepts it: case-insensitive, singular or plural, or a short
    /// name (`svc`, `wl`).
    pub fn from_cli(text: &str) -> Option<Kind> {
        let t = text.to_ascii_lowercase();
        let short = match t.as_str() {
            "svc" => Some(Kind::Service),
            "wl" => Some(Kind::Workload),
            "gtw" => Some(Kind::Gateway),
            _ => None,
        };
        short.or_else(|| {
            Kind::ALL.into_iter().find(|k| {
                let name = k.as_str().to_ascii_lowercase();
                t == name
                    || t == format!("{name}s")
                    || (name.ends_with("y") && t == format!("{}ies", &name[..name.len() - 1]))
            })
        })
    }

    /// Whether objects of this kind live in a namespace (MeshConfig is mesh-wide).
    pub fn namespaced(self) -> bool {
        self != Kind::MeshConfig
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Object metadata (SPEC §1).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Set by the store; ignored on apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// Set by the store; ignored on apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Set by the store; ignored on apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

impl ObjectMeta {
    /// The namespace, `default` when omitted.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

/// One resource: envelope plus typed spec.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Resource {
    pub api_version: String,
    pub kind: Kind,
    pub metadata: ObjectMeta,
    pub spec: Spec,
}

impl Resource {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace(), self.metadata.name)
    }

    /// `Kind/namespace/name`: what identifies an object across kinds (the store's key, and
    /// the id incremental discovery responses remove by).
    pub fn id(&self) -> String {
        object_id(self.kind, self.metadata.namespace(), &self.metadata.name)
    }
}

/// `Kind/namespace/name` (see [`Resource::id`]).
pub fn object_id(kind: Kind, namespace: &str, name: &str) -> String {
    format!("{}/{namespace}/{name}", kind.as_str())
}

/// The typed `spec` of each kind (sizes differ; resources are few and long-lived, so no boxing).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Spec {
    MeshConfig(MeshConfigSpec),
    Service(ServiceSpec),
    Workload(WorkloadSpec),
    ExternalService(ExternalServiceSpec),
    HttpRouteGroup(HttpRouteGroupSpec),
    FaultInjection(FaultInjectionSpec),
    Gateway(GatewaySpec),
    HttpRoute(HttpRouteSpec),
    GrpcRoute(GrpcRouteSpec),
    TrafficSplit(TrafficSplitSpec),
    TrafficTarget(TrafficTargetSpec),
    AuthorizationPolicy(AuthorizationPolicySpec),
    ResiliencePolicy(ResiliencePolicySpec),
    RateLimitPolicy(RateLimitPolicySpec),
}

/// `plexus.dev/v1alpha1 Service`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// The only service accounts (of the Service's namespace) whose workloads may back it;
    /// empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
}

impl ServiceSpec {
    /// Whether a workload running as `service_account` (`None`: `default`) may back this
    /// Service (`spec.serviceAccounts`).
    pub fn admits(&self, service_account: Option<&str>) -> bool {
        self.service_accounts.is_empty()
            || self.service_accounts.iter().any(|sa| sa == service_account.unwrap_or("default"))
    }
}

/// A port of a Service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    /// A workload port number (the application's port) or a workload port name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<PortRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// A port given by number or by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

/// `plexus.dev/v1alpha1 Workload`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    pub address: String,
    #[serde(default)]
    pub ports: Vec<WorkloadPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default)]
    pub meshed: bool,
}

/// A port of a Workload: `port` is where peers connect, `targetPort` the application's own port.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
}
