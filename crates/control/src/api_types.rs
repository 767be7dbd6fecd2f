//! The JSON of the control plane's HTTP API as types: the server serializes them and the CLI
//! deserializes the same ones, so a renamed or retyped field fails to compile on both sides
//! instead of reading as 0 or "?". Rows defined beside the code that computes them are
//! re-exported here, so this module lists the whole contract. The wire format is what the
//! dashboard's JavaScript and outside scripts read:
//! `dashboard::api_answers_round_trip_through_the_shared_types` (crates/cli/tests) reads a live
//! control plane's answers into these types and checks that they write back the same JSON.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::apply_log::{ApplyOutcome, ApplyResponse, ApplyResult};
pub use crate::bench_results::{RunSummary, StoredRun};
pub use crate::grpc_tls::ServingCertificate;
pub use crate::identity::{
    CertOrigin, CertSummary, ChainStatus, IdentityStatus, ProxyCertStatus, Rotated, RotationStatus,
};
pub use crate::proxies::{Health, ProxiesResponse, ProxyCertificate, ProxyRecord, ProxyStatus};
pub use crate::tokens::{CreatedToken, TokenInfo, TokenList};
pub use crate::traffic::StatRow;
pub use plexus_core::ValidationError;

/// Every error answer: `{"error": "..."}`; a refused apply (422) adds one row per problem.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ValidationError>,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>) -> ErrorBody {
        ErrorBody { error: error.into(), errors: Vec::new() }
    }
}

/// `GET /api/v1/version`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: String,
}

/// `GET /api/v1/resources/{kind}`: the resources as stored (a Gateway with its `status`). The
/// server sends [`plexus_core::Resource`]s; readers take them as JSON (`T = Value`) and parse
/// each with `plexus_core::resource_from_value`, which validates it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceList<T = Value> {
    /// `v1`.
    pub api_version: String,
    /// `List`.
    pub kind: String,
    pub items: Vec<T>,
}

impl<T> ResourceList<T> {
    pub fn new(items: Vec<T>) -> ResourceList<T> {
        ResourceList { api_version: "v1".into(), kind: "List".into(), items }
    }
}

/// `DELETE /api/v1/resources/...` and `DELETE /api/v1/bench/results/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deleted {
    pub deleted: bool,
}

/// One object of `POST /api/v1/delete`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteResult {
    pub kind: plexus_core::Kind,
    pub namespace: String,
    pub name: String,
    /// Whether it existed.
    pub deleted: bool,
}

/// `POST /api/v1/delete`: one row per object asked for, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteResults {
    pub results: Vec<DeleteResult>,
}

/// `GET /api/v1/stat`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatAnswer {
    /// The window asked for, e.g. `1m`.
    pub window: String,
    pub rows: Vec<StatRow>,
}

/// `GET /api/v1/bench/results`: newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunList {
    pub items: Vec<RunSummary>,
}

/// `POST /api/v1/tokens`: the token and the trust anchor (PEM) it pins.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenCreated {
    #[serde(flatten)]
    pub token: CreatedToken,
    pub anchor_pem: String,
}

/// `DELETE /api/v1/tokens/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRevoked {
    /// The token's id.
    pub revoked: String,
}
