//! Plexus's own kinds: mesh-wide settings, policies attached to Services, faults and external
//! services.

use serde::{Deserialize, Serialize};

use crate::duration::Dur;

/// The Service (port, route) a policy applies to. `kind` is `Service`; `group` `""`, absent or
/// `plexus.dev`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// An HTTPRoute or GRPCRoute name (AuthorizationPolicy only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
}

/// `plexus.dev/v1alpha1 MeshConfig` (one, named `default`, mesh-wide).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfigSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates: Option<CertificateSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_authorization: Option<DefaultAuthorization>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLogSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSettings>,
}

/// `http`: how the proxies read requests (SPEC §5).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSettings {
    /// Accept `%2F` in paths and forward it undecoded (default: answered 400), for
    /// applications that need encoded slashes. Such an application must not decode `%2F`
    /// before routing, or a path rule can be walked around.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_encoded_slashes: Option<bool>,
}

/// `mtls.mode`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsSettings {
    #[serde(default)]
    pub mode: MtlsMode,
}

/// `permissive` accepts plaintext from outside the mesh too; `strict` refuses it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum MtlsMode {
    #[default]
    Permissive,
    Strict,
}

/// Certificate lifetimes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateSettings {
    /// Workload (leaf) certificates, default 24h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaf_lifetime: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_lifetime: Option<Dur>,
}

/// What happens to a request no AuthorizationPolicy decides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum DefaultAuthorization {
    #[default]
    Allow,
    Authenticated,
    Deny,
}

/// Whether meshed workloads may reach hosts that are neither Services nor ExternalServices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum OutboundTrafficPolicy {
    #[default]
    AllowAny,
    RegistryOnly,
}

/// Distributed tracing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingSettings {
    /// Percent of new traces sampled, 0–100 (default 100 when an exporter is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<f64>,
    /// OTLP/gRPC collector, `host:port` or `http://host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
}

/// Access logs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogSettings {
    /// `json` (default), `text` or `off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// `plexus.dev/v1alpha1 AuthorizationPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    pub target_ref: PolicyTargetRef,
    pub action: AuthorizationAction,
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum AuthorizationAction {
    #[default]
    Allow,
    Deny,
    Audit,
}

/// `from` and `to` are ANDed; entries within a list are ORed; an absent part matches all.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<AuthorizationFrom>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<AuthorizationTo>,
}

/// Who sends the request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationFrom {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unauthenticated: Option<bool>,
}

/// What the request asks for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationTo {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// `plexus.dev/v1alpha1 ResiliencePolicy`: how clients call the target Service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResiliencePolicySpec {
    pub target_ref: PolicyTargetRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<ResilienceTimeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetrySettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudgetSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_limits: Option<ConnectionLimitSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSettings>,
}

/// Timeouts: `connect` (TCP connect), `request` (whole request incl. retries), `idle`
/// (connection without traffic), `endpointWait` (how long a request waits for an endpoint when
/// its Service has none, e.g. while its one replica restarts; default 3s, `0s` fails at once).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResilienceTimeouts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_wait: Option<Dur>,
}

/// Retries: `attempts` is the total number of tries (first included).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySettings {
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Dur>,
    /// Conditions: `5xx`, `gateway-error`, `connect-failure`, `reset`, a status code (`503`),
    /// or a gRPC status name (`unavailable`, `cancelled`, `deadline-exceeded`, `internal`,
    /// `resource-exhausted`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<String>,
    /// Base interval between tries; it doubles per try (up to 10×) with full jitter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Dur>,
    /// Retry methods that are not idempotent (POST, PATCH) too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_non_idempotent: Option<bool>,
}

/// Retries allowed = `ratio` × requests + `minPerSecond` × `ttl`, over a sliding `ttl`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudgetSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_per_second: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Dur>,
}

/// Passive health checking.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionSettings {
    /// Consecutive gateway failures (connection failures, 502, 503, 504) that eject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// Consecutive 5xx answers (any 5xx, and connection failures) that eject; off unless set.
    #[serde(default, rename = "consecutive5xx", skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx: Option<u32>,
    /// How often ejections are reconsidered (an ejected endpoint returns after its ejection
    /// time, checked at most this often).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

/// Circuit breaking: limits per client proxy and destination Service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionLimitSettings {
    /// Concurrent requests (and so HTTP/1 connections) in flight to the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a slot; beyond it a request is refused with 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests per upstream HTTP/1 connection before it is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
}

/// The load-balancing algorithm.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSettings {
    pub algorithm: LbAlgorithm,
    /// For `ringHash`: what the hash key is taken from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
}

/// `ewma` (default), `roundRobin`, `leastRequest`, `ringHash`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum LbAlgorithm {
    #[default]
    Ewma,
    RoundRobin,
    LeastRequest,
    RingHash,
}

/// Exactly one of: a header, a cookie, a query parameter, or the client's address.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HashOn {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_param: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<bool>,
}

/// `plexus.dev/v1alpha1 RateLimitPolicy`: a local token bucket at each destination sidecar.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitPolicySpec {
    pub target_ref: PolicyTargetRef,
    pub requests_per_second: u32,
    /// Bucket size (default: `requestsPerSecond`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<RateLimitOverride>,
}

/// A separate bucket for requests from these sources.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitOverride {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// `NAME` (policy's namespace) or `NS/NAME`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    pub requests_per_second: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// `plexus.dev/v1alpha1 FaultInjection`, used by routes through an `ExtensionRef` filter.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultInjectionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// Delay a share of requests before forwarding them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    pub fixed: Dur,
    /// 0–100, default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
}

/// Answer a share of requests with an error instead of forwarding them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<crate::resource::GrpcCode>,
    /// 0–100, default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
}

/// `plexus.dev/v1alpha1 ExternalService`: hosts outside the mesh that workloads may reach
/// (what `outboundTrafficPolicy: registryOnly` allows).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalServiceSpec {
    pub hosts: Vec<String>,
    pub ports: Vec<ExternalPort>,
    /// `http`, `https`, `tls`, `tcp` or `grpc` (default `tcp`), for ports that do not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// TLS origination: the application speaks plaintext, its sidecar speaks TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ExternalTls>,
    /// `NAME` or `NAME.NAMESPACE` (default: this one's namespace) of the mesh Service whose
    /// workloads run `plexus proxy --mode egress`: calls to these hosts leave through it only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_gateway: Option<String>,
}

/// `spec.tls` of an ExternalService.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalTls {
    /// The sidecar opens TLS to the host (SNI = the host) on the `https` and `tls` ports,
    /// for applications that send plaintext; verified against the system roots or `caFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub originate: Option<bool>,
    /// PEM file of the CA certificates to verify the host with, instead of the system roots
    /// (a path on the sidecar's machine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// A port of an ExternalService: a number, or `{port, name, protocol}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum ExternalPort {
    Number(u16),
    Detailed(ExternalPortSpec),
}

/// A port with its own protocol.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalPortSpec {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

impl ExternalPort {
    pub fn number(&self) -> u16 {
        match self {
            ExternalPort::Number(n) => *n,
            ExternalPort::Detailed(d) => d.port,
        }
    }
}
