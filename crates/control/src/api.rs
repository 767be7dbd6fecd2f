//! The control plane's HTTP API (`/api/v1/...`), used by the CLI; JSON in and out.
//!
//! Reads need no token; writes need `Authorization: Bearer <admin token>`. Every request must
//! name this machine by address or as `localhost` in its `Host` ([`local_host_only`]).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use plexus_core::{Kind, LoadError, parse_documents};
use serde_json::{Value, json};

use crate::api_types::{
    DeleteResult, DeleteResults, Deleted, ErrorBody, ResourceList, StatAnswer, TokenCreated, TokenRevoked, VersionInfo,
};
use crate::store::{ObjectKey, Store};

/// What the handlers share.
pub struct ApiState {
    pub store: Arc<dyn Store>,
    pub admin_token: String,
    pub proxies: Arc<crate::proxies::Proxies>,
    pub traffic: Arc<crate::traffic::TrafficWindow>,
    /// Where the certificate authority files live.
    pub data_dir: std::path::PathBuf,
    /// The certificate authority the control plane signs with.
    pub ca: Arc<crate::identity::Ca>,
    /// Performance runs sent by `plexus bench`.
    pub bench: Arc<crate::bench_results::BenchResults>,
    /// Workload tokens (`plexus token`).
    pub tokens: Arc<crate::tokens::Tokens>,
    /// The control plane's own certificate (it calls proxies' `/tap` over mTLS with it).
    pub serving: Arc<crate::grpc_tls::ServingIdentity>,
    /// Outcomes of recent applies that carried an id.
    pub applies: Arc<crate::apply_log::ApplyLog>,
    /// DNS names the API and dashboard answer to besides addresses and `localhost`
    /// (`plexus control --allowed-host`; see [`local_host_only`]).
    pub allowed_hosts: Vec<String>,
}

type Shared = Arc<ApiState>;

/// The HTTP API router.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/version", get(version))
        .route("/api/v1/apply", post(apply))
        .route("/api/v1/apply/{id}", get(apply_outcome))
        .route("/api/v1/delete", post(delete_many))
        .route("/api/v1/resources/{kind}", get(list))
        .route("/api/v1/resources/{kind}/{namespace}/{name}", get(get_one).delete(delete_one))
        .route("/api/v1/prometheus/targets", get(prometheus_targets))
        .route("/api/v1/proxies", get(proxies))
        .route("/api/v1/proxies/{workload}/config", get(crate::proxy_admin::config))
        .route("/api/v1/stat", get(stat))
        .route("/api/v1/graph", get(graph))
        .route("/api/v1/findings", get(crate::views::findings))
        .route("/api/v1/overview", get(crate::views::overview))
        .route("/api/v1/stat/series", get(crate::views::stat_series))
        .route("/api/v1/identity", get(identity))
        .route("/api/v1/identity/rotate", post(rotate_identity))
        .route("/api/v1/tap", get(crate::tap::tap))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/api/v1/bench/results", get(crate::bench_results::list).post(crate::bench_results::create))
        .route("/api/v1/bench/results/{id}", get(crate::bench_results::get).delete(crate::bench_results::delete))
        .merge(crate::dashboard::router())
        .layer(axum::middleware::from_fn_with_state(state.clone(), local_host_only))
        .with_state(state)
}

/// Refuses (403) a request whose `Host` is a name rather than an address or `localhost`: a web
/// page of a name its author controls, rebound by DNS to this address, would otherwise read
/// the configuration, the traffic and the tap with the page's own origin (DNS rebinding).
/// Reach the API by IP address (the CLI's default `http://127.0.0.1:7701`), `localhost`, or a
/// name the operator allowed (`--allowed-host`, e.g. an ingress in front of the dashboard).
async fn local_host_only(
    State(s): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let hosts = req.headers().get_all(header::HOST).into_iter().map(|h| h.as_bytes());
    let target = req.uri().authority().map(|a| a.as_str());
    if !plexus_core::names::names_this_machine(hosts, target, &s.allowed_hosts) {
        return error(
            StatusCode::FORBIDDEN,
            "Host must be this machine's IP address, localhost or a name given to `plexus control \
             --allowed-host` (another name could be DNS rebinding)",
        )
        .into_response();
    }
    next.run(req).await
}

/// An API failure: a status and a message, answered as `{"error": message}`.
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody::new(self.message))).into_response()
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError { status, message: message.into() }
}

pub(crate) fn authorized(state: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if constant_time_eq(t.trim().as_bytes(), state.admin_token.as_bytes()) => Ok(()),
        Some(_) => Err(error(StatusCode::FORBIDDEN, "invalid admin token")),
        None => Err(error(
            StatusCode::UNAUTHORIZED,
            "writes need the admin token (Authorization: Bearer ...); the CLI reads it from the data dir",
        )),
    }
}

/// Compares secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse_kind(kind: &str) -> Result<Kind, ApiError> {
    Kind::from_cli(kind).ok_or_else(|| error(StatusCode::NOT_FOUND, format!("unknown kind {kind:?}")))
}

fn store_failure(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "store failure");
    error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// `200 {"status": "ok"}`, or `503 {"status": "unhealthy"}` while store writes fail.
async fn healthz(State(s): State<Shared>) -> Response {
    use crate::proxies::Health;
    let revision = s.store.revision();
    match s.store.health() {
        Ok(()) => Json(Health { status: "ok".into(), revision, store: None, error: None }).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "unhealthy".into(),
                revision,
                error: Some(format!("store writes fail: {e}")),
                store: Some(e),
            }),
        )
            .into_response(),
    }
}

async fn version() -> Json<VersionInfo> {
    Json(VersionInfo { version: env!("CARGO_PKG_VERSION").into() })
}

fn validation_errors(e: &LoadError) -> Response {
    let body = ErrorBody { error: "validation failed".into(), errors: e.errors.clone() };
    (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
}

/// `POST /api/v1/apply` with `{"source": "file name", "items": [resources...]}`: validates
/// everything, then stores all or nothing.
async fn apply(State(s): State<Shared>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    use crate::apply_log::{APPLY_ID_HEADER, ApplyOutcome, valid_id};
    if let Err(e) = authorized(&s, &headers) {
        return e.into_response();
    }
    let id = match headers.get(APPLY_ID_HEADER).map(|v| v.to_str().map(str::to_string)) {
        None => None,
        Some(Ok(id)) if valid_id(&id) => Some(id),
        Some(_) => {
            return error(StatusCode::BAD_REQUEST, format!("{APPLY_ID_HEADER}: 1-64 of A-Z a-z 0-9 - _"))
                .into_response();
        }
    };
    // The same id again: what it did, never a second apply.
    if let Some(id) = &id
        && let Err(known) = s.applies.begin(id)
    {
        return match known {
            ApplyOutcome::Committed(done) => Json(done).into_response(),
            ApplyOutcome::Pending => error(StatusCode::CONFLICT, format!("apply {id} is in progress")).into_response(),
            ApplyOutcome::Failed { error: e } => {
                error(StatusCode::CONFLICT, format!("apply {id} failed: {e}")).into_response()
            }
        };
    }
    let (response, outcome) = apply_now(&s, &body).await;
    if let Some(id) = &id {
        s.applies.finish(id, outcome);
    }
    response
}

/// Validates and commits one apply: the answer, and the outcome to remember.
async fn apply_now(s: &ApiState, body: &Value) -> (Response, crate::apply_log::ApplyOutcome) {
    use crate::apply_log::{ApplyOutcome, ApplyResponse, ApplyResult};
    let source = body.get("source").and_then(Value::as_str).unwrap_or("request").to_string();
    let items = body.get("items").cloned().unwrap_or(Value::Array(Vec::new()));
    let resources = match parse_documents(&source, &items.to_string()) {
        Ok(r) => r,
        Err(e) => {
            let failed = ApplyOutcome::Failed { error: format!("validation failed ({} errors)", e.errors.len()) };
            return (validation_errors(&e), failed);
        }
    };
    match crate::store::write(&s.store, move |store| store.apply(&resources)).await {
        Ok(results) => {
            let results = results
                .into_iter()
                .map(|(r, outcome)| ApplyResult {
                    kind: r.kind,
                    namespace: r.metadata.namespace().to_string(),
                    name: r.metadata.name.clone(),
                    outcome,
                    resource_version: r.metadata.resource_version.clone(),
                })
                .collect();
            let done = ApplyResponse { results };
            (Json(done.clone()).into_response(), ApplyOutcome::Committed(done))
        }
        Err(e) => {
            let failed = ApplyOutcome::Failed { error: e.to_string() };
            (store_failure(e).into_response(), failed)
        }
    }
}

/// `GET /api/v1/apply/{id}`: what became of the apply that carried that id —
/// `{"state": "committed", "results": [...]}`, `{"state": "pending"}` or
/// `{"state": "failed", "error"}`; 404 when the control plane has no record of it (never
/// received, or forgotten: the most recent 1,024 are kept, in memory).
async fn apply_outcome(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    match s.applies.get(&id) {
        Some(outcome) => Json(outcome).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no record of apply {id}")).into_response(),
    }
}

#[derive(serde::Deserialize)]
struct ListQuery {
    namespace: Option<String>,
}

async fn list(State(s): State<Shared>, Path(kind): Path<String>, Query(q): Query<ListQuery>) -> Response {
    let kind = match parse_kind(&kind) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let ns = q.namespace.filter(|n| n != "all" && !n.is_empty());
    match s.store.list(Some(kind), ns.as_deref()) {
        Ok(items) if kind == Kind::Gateway => {
            let items: Vec<serde_json::Value> = items.iter().map(|r| with_status(&s, r)).collect();
            Json(ResourceList::new(items)).into_response()
        }
        Ok(items) => Json(ResourceList::new(items)).into_response(),
        Err(e) => store_failure(e).into_response(),
    }
}

/// A Gateway with the `status` the control plane computes for it (Gateway API conditions).
fn with_status(s: &Shared, r: &plexus_core::Resource) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    let all = s.store.list(None, None).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("status".into(), plexus_core::gateway::status(&all, r));
    }
    v
}

async fn get_one(State(s): State<Shared>, Path((kind, namespace, name)): Path<(String, String, String)>) -> Response {
    let kind = match parse_kind(&kind) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let key = ObjectKey { kind, namespace, name };
    match s.store.get(&key) {
        Ok(Some(r)) if key.kind == Kind::Gateway => Json(with_status(&s, &r)).into_response(),
        Ok(Some(r)) => Json(r).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("{} {}/{} not found", key.kind.as_str().to_ascii_lowercase(), key.namespace, key.name),
        )
        .into_response(),
        Err(e) => store_failure(e).into_response(),
    }
}

async fn delete_one(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path((kind, namespace, name)): Path<(String, String, String)>,
) -> Response {
    if let Err(e) = authorized(&s, &headers) {
        return e.into_response();
    }
    let kind = match parse_kind(&kind) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let key = ObjectKey { kind, namespace, name };
    let k = key.clone();
    match crate::store::write(&s.store, move |store| store.delete(&[k])).await {
        Ok(existed) if existed.first() == Some(&true) => Json(Deleted { deleted: true }).into_response(),
        Ok(_) => error(
            StatusCode::NOT_FOUND,
            format!("{} {}/{} not found", key.kind.as_str().to_ascii_lowercase(), key.namespace, key.name),
        )
        .into_response(),
        Err(e) => store_failure(e).into_response(),
    }
}

/// `POST /api/v1/delete` with `{"items": [{kind, namespace, name}...]}`: one transaction.
async fn delete_many(State(s): State<Shared>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if let Err(e) = authorized(&s, &headers) {
        return e.into_response();
    }
    let mut keys = Vec::new();
    for item in body.get("items").and_then(Value::as_array).cloned().unwrap_or_default() {
        let field = |f: &str| item.get(f).and_then(Value::as_str).map(str::to_string);
        let (Some(kind), Some(name)) = (field("kind").and_then(|k| Kind::from_cli(&k)), field("name")) else {
            return error(StatusCode::BAD_REQUEST, format!("invalid item {item}")).into_response();
        };
        keys.push(ObjectKey { kind, namespace: field("namespace").unwrap_or_else(|| "default".into()), name });
    }
    let k = keys.clone();
    match crate::store::write(&s.store, move |store| store.delete(&k)).await {
        Ok(existed) => {
            let results = keys
                .into_iter()
                .zip(existed)
                .map(|(k, deleted)| DeleteResult { kind: k.kind, namespace: k.namespace, name: k.name, deleted })
                .collect();
            Json(DeleteResults { results }).into_response()
        }
        Err(e) => store_failure(e).into_response(),
    }
}

/// Prometheus HTTP service discovery (SPEC §10): one target group per connected proxy,
/// scraped at its admin address.
async fn prometheus_targets(State(s): State<Shared>) -> Response {
    let groups: Vec<Value> = s
        .proxies
        .list()
        .into_iter()
        .filter(|p| !p.admin_address.is_empty())
        .map(|p| {
            json!({
                "targets": [p.admin_address],
                "labels": {"service": p.service, "workload": p.workload, "version": p.version, "namespace": p.namespace},
            })
        })
        .collect();
    ([(header::CONTENT_TYPE, "application/json")], Value::Array(groups).to_string()).into_response()
}

#[derive(serde::Deserialize)]
struct StatQuery {
    kind: Option<String>,
    window: Option<String>,
}

/// `GET /api/v1/stat?kind=service|workload|route&window=1m`: golden metrics.
async fn stat(State(s): State<Shared>, Query(q): Query<StatQuery>) -> Response {
    use crate::traffic::StatKind;
    let kind = match q.kind.as_deref().unwrap_or("service") {
        "service" | "services" | "svc" => StatKind::Service,
        "workload" | "workloads" => StatKind::Workload,
        "route" | "routes" | "httproute" | "httproutes" => StatKind::Route,
        other => {
            return error(StatusCode::BAD_REQUEST, format!("cannot stat {other:?}: use service, workload or route"))
                .into_response();
        }
    };
    let window = match q.window.as_deref().map(plexus_core::duration::parse).transpose() {
        Ok(w) => w.unwrap_or(std::time::Duration::from_secs(60)),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("window: {e}")).into_response(),
    };
    if window > crate::traffic::RETENTION {
        return error(StatusCode::BAD_REQUEST, "window: at most 10m of history is kept").into_response();
    }
    Json(StatAnswer { window: plexus_core::duration::format(window), rows: s.traffic.stat(kind, window) })
        .into_response()
}

#[derive(serde::Deserialize)]
struct GraphQuery {
    window: Option<String>,
    group: Option<String>,
}

/// `GET /api/v1/graph?window=1m&group=version|service`: the live service graph
/// ([`crate::graph`]); no token needed.
async fn graph(State(s): State<Shared>, Query(q): Query<GraphQuery>) -> Response {
    use crate::graph::{Directory, Graph, Grouping, NodeKind, Placement};
    let window = match q.window.as_deref().map(plexus_core::duration::parse).transpose() {
        Ok(w) => w.unwrap_or(std::time::Duration::from_secs(60)),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("window: {e}")).into_response(),
    };
    if window < std::time::Duration::from_secs(1) || window > crate::traffic::RETENTION {
        return error(StatusCode::BAD_REQUEST, "window: between 1s and 10m (10m of history is kept)").into_response();
    }
    let Some(grouping) = Grouping::parse(q.group.as_deref().unwrap_or("version")) else {
        return error(StatusCode::BAD_REQUEST, "group: version or service").into_response();
    };
    let mut directory = Directory::default();
    for p in s.proxies.list() {
        let placement = Placement {
            service: p.service,
            version: Some(p.version).filter(|v| !v.is_empty()),
            namespace: p.namespace,
            kind: NodeKind::of_mode(&p.mode),
        };
        directory.add_workload(&p.workload, placement);
    }
    // Services without a connected proxy still place their callers' summaries in a namespace;
    // without the store the graph is only less precise, so a failure is logged, not answered.
    match s.store.list(Some(Kind::Service), None) {
        Ok(services) => {
            for svc in services {
                directory.add_service(&svc.metadata.name, svc.metadata.namespace());
            }
        }
        Err(e) => tracing::warn!(error = %e, "graph: cannot list Services"),
    }
    let (nodes, edges) = s
        .traffic
        .with_recent(window, |summaries, seconds| crate::graph::build(summaries, seconds, &directory, grouping));
    Json(Graph { window: plexus_core::duration::format(window), group: grouping.as_str(), nodes, edges })
        .into_response()
}

/// The trust bundle and issuer as the data dir holds them (never their keys), the rotation in
/// progress and each connected proxy's certificate.
async fn identity(State(s): State<Shared>) -> Response {
    let settings = crate::identity::IdentitySettings::from_store(s.store.as_ref());
    match s.ca.status(&settings, s.proxies.statuses()) {
        Ok(mut status) => {
            status.control_plane = s.serving.certificate();
            Json(status).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

/// `POST /api/v1/identity/rotate` with `{"anchor": bool}` (admin token): rotates the issuer,
/// or starts a trust anchor rotation.
async fn rotate_identity(State(s): State<Shared>, headers: HeaderMap, body: bytes::Bytes) -> Response {
    if let Err(e) = authorized(&s, &headers) {
        return e.into_response();
    }
    let anchor = if body.is_empty() {
        false
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(v) => match v.get("anchor") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return error(StatusCode::BAD_REQUEST, format!("anchor: expected true or false, got {other}"))
                        .into_response();
                }
            },
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")).into_response(),
        }
    };
    let settings = crate::identity::IdentitySettings::from_store(s.store.as_ref());
    let ca = s.ca.clone();
    match tokio::task::spawn_blocking(move || ca.rotate(anchor, &settings)).await {
        Ok(Ok(rotated)) => Json(rotated).into_response(),
        Ok(Err(crate::identity::RotateError::Conflict(m))) => error(StatusCode::CONFLICT, m).into_response(),
        Ok(Err(crate::identity::RotateError::Failed(m))) => {
            tracing::error!(error = %m, "rotation failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, m).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The connected proxies with their sync state and certificates (`plexus check`).
async fn proxies(State(s): State<Shared>) -> Json<crate::proxies::ProxiesResponse> {
    Json(crate::proxies::ProxiesResponse { revision: s.store.revision(), proxies: s.proxies.statuses() })
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateToken {
    service_account: String,
    namespace: Option<String>,
    ttl: Option<String>,
}

/// `POST /api/v1/tokens` with `{"serviceAccount", "namespace"?, "ttl"?}` (admin token): a
/// workload token bound to that identity, with the trust anchor it pins.
async fn create_token(State(s): State<Shared>, headers: HeaderMap, body: bytes::Bytes) -> Response {
    if let Err(e) = authorized(&s, &headers) {
        return e.into_response();
    }
    let req: CreateToken = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid request: {e}")).into_response(),
    };
    let ttl = match req.ttl.as_deref().map(plexus_core::duration::parse).transpose() {
        Ok(t) => t.unwrap_or(crate::tokens::DEFAULT_TTL),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("ttl: {e}")).into_response(),
    };
    let td = crate::identity::IdentitySettings::from_store(s.store.as_ref()).trust_domain;
    let anchor = s.ca.state().anchor.clone();
    let namespace = req.namespace.unwrap_or_else(|| "default".into());
    let tokens = s.tokens.clone();
    let sha = anchor.summary.sha256.clone();
    let created =
        tokio::task::spawn_blocking(move || tokens.create(&td, &namespace, &req.service_account, ttl, &sha)).await;
    match created {
        Ok(Ok(t)) => {
            tracing::info!(id = %t.id, identity = %t.identity, "workload token created");
            Json(TokenCreated { token: t, anchor_pem: anchor.pem() }).into_response()
        }
        Ok(Err(e @ crate::tokens::TokenError::Invalid(_))) => {
            error(StatusCode::BAD_REQUEST, e.to_string()).into_response()
        }
        Ok(Err(e)) => store_failure(e).into_response(),
        Err(e) => store_failure(e).into_response(),
    }
}

/// `GET /api/v1/tokens` (admin token): ids, identities, expiry; never secrets.
async fn list_tokens(State(s): State<Shared>, headers: HeaderMap) -> Response {
    if let Err(e) = authorized(&s, &headers) {
        return e.into_response();
    }
    let td = crate::identity::IdentitySettings::from_store(s.store.as_ref()).trust_domain;
    Json(crate::tokens::TokenList { items: s.tokens.list(&td) }).into_response()
}

/// `DELETE /api/v1/tokens/{id}` (admin token): revokes a token (and the renewals of the
/// certificates it bootstrapped).
async fn revoke_token(State(s): State<Shared>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(e) = authorized(&s, &headers) {
        return e.into_response();
    }
    match s.tokens.revoke(&id) {
        Ok(true) => {
            tracing::info!(%id, "workload token revoked");
            Json(TokenRevoked { revoked: id }).into_response()
        }
        Ok(false) => error(StatusCode::NOT_FOUND, format!("token {id} not found")).into_response(),
        Err(e) => store_failure(e).into_response(),
    }
}
