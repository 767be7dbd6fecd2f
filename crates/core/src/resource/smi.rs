//! SMI kinds (v1alpha4), accepted for SMI users and mapped to the same model as the Gateway
//! API: TrafficSplit → weighted route rules, HTTPRouteGroup → their matches, TrafficTarget →
//! authorization.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `split.smi-spec.io/v1alpha4 TrafficSplit`: requests to the root `service` (optionally only
/// those matching the named HTTPRouteGroup matches) are split over `backends` by weight.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficSplitSpec {
    pub service: String,
    pub backends: Vec<TrafficSplitBackend>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<SmiRouteRef>,
}

/// A weighted backend Service of a TrafficSplit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficSplitBackend {
    pub service: String,
    pub weight: u32,
}

/// A reference to an HTTPRouteGroup (optionally to some of its named matches).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SmiRouteRef {
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_group: Option<String>,
    /// Names of matches in the group (all when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<String>,
}

/// `specs.smi-spec.io/v1alpha4 HTTPRouteGroup`: named request matches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteGroupSpec {
    pub matches: Vec<SmiHttpMatch>,
}

/// One named match: all given conditions must hold. `pathRegex` and header values are regular
/// expressions; `methods` may contain `*`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SmiHttpMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// `access.smi-spec.io/v1alpha4 TrafficTarget`: which service accounts may call a destination
/// service account (on which routes).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficTargetSpec {
    pub destination: IdentityBinding,
    pub sources: Vec<IdentityBinding>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<SmiRouteRef>,
}

/// `{kind: ServiceAccount, name, namespace}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityBinding {
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}
