//! The mutating admission webhook that serves injection (SPEC §11): HTTPS (the
//! `plexus-webhook-tls` Secret's `tls.crt`/`tls.key`, mounted at `--webhook-tls-dir`),
//! AdmissionReview v1 on `POST /inject`, answered with a JSONPatch built by
//! [`crate::inject`]. Served by `plexus control --webhook-addr` whatever the store; the
//! `MutatingWebhookConfiguration` is rendered by [`crate::install::webhook_configuration`]
//! with two webhooks: pods of namespaces labelled `plexus.dev/inject=enabled` come to
//! [`NAMESPACE_PATH`] (`failurePolicy: Fail`: never admitted without their proxy, not even when
//! the webhook cannot build one — it refuses them and their controllers retry); pods of other
//! namespaces come to [`ANNOTATION_PATH`] (`failurePolicy: Ignore`: an outage never blocks pods
//! that did not opt in by namespace; an annotated pod admitted meanwhile starts without a
//! proxy, and `plexus check` reports it).
//!
//! The serving certificate is re-read from `--webhook-tls-dir` every [`CERTIFICATE_POLL`] (a
//! Secret volume is updated in place when the Secret changes), with the gateway's mechanism
//! (`plexus_proxy::gateway::certs::CertificateStore`): a changed pair is served to new
//! connections, a bad one keeps the last good one and is logged.
//!
//! Per request it reads the pod's namespace labels (opt-in), the mesh's trust anchor (the
//! data dir's `trust-anchor.pem`: it may rotate) and the `plexus-control` Service's ClusterIP
//! (the proxy's control-plane address: there is no cluster DNS to rely on). The server's
//! version, read once at start, picks native sidecars (≥ 1.29).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Namespace, PodSpec, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

use plexus_core::gateway::CertificateName;
use plexus_proxy::gateway::certs::{CertificateSource, CertificateStore, PemPair};

use crate::inject::{Decision, InjectConfig, decide, inject};

/// Largest AdmissionReview accepted (a pod with its managed fields is a few KiB).
const MAX_BODY: usize = 4 << 20;
/// How often the serving certificate's files are re-read (kubelet updates a Secret volume
/// within about a minute of the Secret's change).
pub const CERTIFICATE_POLL: std::time::Duration = std::time::Duration::from_secs(10);
/// Where the API server sends pods of namespaces labelled `plexus.dev/inject=enabled`.
pub const NAMESPACE_PATH: &str = "/inject/namespace";
/// Where the API server sends pods of other namespaces (opt-in by annotation).
pub const ANNOTATION_PATH: &str = "/inject";

/// How the reviewed pod reached the webhook (which of the two webhook entries sent it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptIn {
    /// Its namespace is labelled `plexus.dev/inject=enabled` (the API server selected it):
    /// a pod to inject that cannot be injected is refused.
    Namespace,
    /// Any other namespace: injected when annotated, else admitted unchanged; a pod that cannot
    /// be injected is admitted unchanged (as `failurePolicy: Ignore` would).
    Annotation,
}

/// How the webhook runs.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    pub addr: SocketAddr,
    /// Holds `tls.crt` (chain) and `tls.key`.
    pub tls_dir: PathBuf,
    /// The control plane's data dir (its `trust-anchor.pem`).
    pub data_dir: PathBuf,
    /// The image of the injected containers.
    pub image: String,
    /// The proxies' control-plane address; default: `https://<plexus-control ClusterIP>:7700`.
    pub control_plane: Option<String>,
    /// How often `tls_dir` is re-read ([`CERTIFICATE_POLL`]).
    pub certificate_poll: std::time::Duration,
}

/// The answer to one AdmissionReview (pure): `allowed` with a JSONPatch when the pod is
/// injected, `allowed` without a patch when it is not, refused with the reason when its
/// annotations are invalid. `config` is `None` when the injection settings are unavailable:
/// a pod to inject is then admitted unchanged on the annotation path, refused on the
/// namespace path ([`OptIn`]).
pub fn review(
    request: &Value,
    namespace_labels: &BTreeMap<String, String>,
    config: Option<&InjectConfig>,
    opt_in: OptIn,
) -> Value {
    let uid = request.pointer("/request/uid").cloned().unwrap_or(Value::String(String::new()));
    let respond = |response: Value| {
        let mut r = json!({"uid": uid});
        if let (Some(r), Some(extra)) = (r.as_object_mut(), response.as_object()) {
            r.extend(extra.clone());
        }
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": r})
    };
    match patch_for(request, namespace_labels, config, opt_in) {
        Ok(None) => respond(json!({"allowed": true})),
        Ok(Some(patch)) => respond(json!({"allowed": true, "patchType": "JSONPatch", "patch": base64(&patch)})),
        Err(Refusal::Invalid(message)) => {
            respond(json!({"allowed": false, "status": {"code": 400, "message": message}}))
        }
        Err(Refusal::Unavailable(message)) => {
            respond(json!({"allowed": false, "status": {"code": 503, "message": message}}))
        }
    }
}

/// Why a pod is not admitted.
enum Refusal {
    /// The pod's own settings are wrong (its annotations).
    Invalid(String),
    /// The pod must be injected and cannot be now.
    Unavailable(String),
}

impl From<String> for Refusal {
    fn from(message: String) -> Refusal {
        Refusal::Invalid(message)
    }
}

impl From<&str> for Refusal {
    fn from(message: &str) -> Refusal {
        Refusal::Invalid(message.to_string())
    }
}

/// The JSONPatch (serialized) that injects the reviewed pod, if it is to be injected.
fn patch_for(
    request: &Value,
    namespace_labels: &BTreeMap<String, String>,
    config: Option<&InjectConfig>,
    opt_in: OptIn,
) -> Result<Option<Vec<u8>>, Refusal> {
    let object = request.pointer("/request/object").ok_or("AdmissionReview without request.object")?;
    if object.get("kind").and_then(Value::as_str).is_some_and(|k| k != "Pod") {
        return Ok(None);
    }
    let mut meta: ObjectMeta = serde_json::from_value(object.get("metadata").cloned().unwrap_or(json!({})))
        .map_err(|e| format!("pod metadata: {e}"))?;
    let mut spec: PodSpec = serde_json::from_value(object.get("spec").cloned().unwrap_or(json!({})))
        .map_err(|e| format!("pod spec: {e}"))?;
    // The request names the namespace; a pod being created from a template may not carry it.
    if meta.namespace.is_none() {
        meta.namespace = request.pointer("/request/namespace").and_then(Value::as_str).map(str::to_string);
    }
    if decide(namespace_labels, &meta, &spec) != Decision::Inject {
        return Ok(None);
    }
    let Some(config) = config else {
        let pod = meta.generate_name.as_ref().or(meta.name.as_ref());
        if opt_in == OptIn::Namespace {
            tracing::warn!(?pod, "injection settings unavailable: pod refused (its namespace is in the mesh)");
            return Err(Refusal::Unavailable(format!(
                "plexus: cannot inject the proxy now (the trust anchor or the plexus-control Service is unavailable); namespace {} is labelled {}=enabled, so its pods are not admitted without one (the pod's controller retries)",
                meta.namespace.as_deref().unwrap_or("default"),
                crate::inject::INJECT_KEY
            )));
        }
        tracing::warn!(?pod, "injection settings unavailable: pod admitted without a proxy");
        return Ok(None);
    };
    // The patch is the difference of the typed pod before and after, so that fields the
    // typed model spells differently from the request are never touched.
    let before = json!({"metadata": meta, "spec": spec});
    inject(&mut meta, &mut spec, config)?;
    let after = json!({"metadata": meta, "spec": spec});
    let patch = json_patch::diff(&before, &after);
    serde_json::to_vec(&patch).map(Some).map_err(|e| Refusal::Invalid(e.to_string()))
}

/// Standard base64, as the API serializes bytes.
fn base64(bytes: &[u8]) -> String {
    match serde_json::to_value(k8s_openapi::ByteString(bytes.to_vec())) {
        Ok(Value::String(s)) => s,
        _ => String::new(),
    }
}

/// The webhook server's state: what each review needs.
struct Injector {
    client: Option<kube::Client>,
    options: WebhookOptions,
    native_sidecars: bool,
}

impl Injector {
    /// The namespace's labels; when they cannot be read, what the webhook entry that sent the
    /// pod selected on (on the namespace path: labelled `plexus.dev/inject=enabled`).
    async fn namespace_labels(&self, namespace: &str, opt_in: OptIn) -> BTreeMap<String, String> {
        let selected = || match opt_in {
            OptIn::Namespace => [(crate::inject::INJECT_KEY.to_string(), "enabled".to_string())].into(),
            OptIn::Annotation => BTreeMap::new(),
        };
        let Some(client) = &self.client else { return selected() };
        match kube::Api::<Namespace>::all(client.clone()).get(namespace).await {
            Ok(ns) => ns.metadata.labels.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(namespace, error = %e, ?opt_in, "cannot read the namespace's labels: going by the webhook entry that sent the pod");
                selected()
            }
        }
    }

    async fn config(&self) -> Option<InjectConfig> {
        let anchor_path = self.options.data_dir.join(plexus_control::identity::ANCHOR_CERT);
        let trust_anchor_pem = match std::fs::read_to_string(&anchor_path) {
            Ok(pem) => pem,
            Err(e) => {
                tracing::warn!(path = %anchor_path.display(), error = %e, "no trust anchor for injected proxies");
                return None;
            }
        };
        let control_plane = match &self.options.control_plane {
            Some(cp) => cp.clone(),
            None => {
                let client = self.client.as_ref()?;
                let api = kube::Api::<Service>::namespaced(client.clone(), crate::install::NAMESPACE);
                match api.get(crate::install::CONTROL).await {
                    Ok(svc) => {
                        let ip =
                            svc.spec.and_then(|s| s.cluster_ip).filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())?;
                        format!("https://{ip}:7700")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the plexus-control Service: no control-plane address for injected proxies");
                        return None;
                    }
                }
            }
        };
        Some(InjectConfig {
            image: self.options.image.clone(),
            image_pull_policy: "IfNotPresent".into(),
            control_plane,
            trust_anchor_pem,
            native_sidecars: self.native_sidecars,
        })
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let opt_in = match req.uri().path() {
            NAMESPACE_PATH => OptIn::Namespace,
            ANNOTATION_PATH => OptIn::Annotation,
            _ => {
                return reply(
                    StatusCode::NOT_FOUND,
                    format!("not found: POST {ANNOTATION_PATH} or {NAMESPACE_PATH}\n"),
                );
            }
        };
        if req.method() != Method::POST {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "POST /inject\n".into());
        }
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return reply(StatusCode::PAYLOAD_TOO_LARGE, format!("cannot read the request: {e}\n")),
        };
        let request: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return reply(StatusCode::BAD_REQUEST, format!("not an AdmissionReview (JSON): {e}\n")),
        };
        if request.pointer("/request/uid").is_none() {
            return reply(StatusCode::BAD_REQUEST, "not an AdmissionReview: no request.uid\n".into());
        }
        let namespace = request.pointer("/request/namespace").and_then(Value::as_str).unwrap_or("default");
        let labels = self.namespace_labels(namespace, opt_in).await;
        let config = self.config().await;
        let answer = review(&request, &labels, config.as_ref(), opt_in);
        let injected = answer.pointer("/response/patch").is_some();
        tracing::info!(namespace, injected, "admission review");
        let mut resp = reply(StatusCode::OK, answer.to_string());
        resp.headers_mut()
            .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
        resp
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// The webhook's one certificate: `tls.crt` and `tls.key` in `--webhook-tls-dir` (the
/// mounted `plexus-webhook-tls` Secret), whatever the name asked for.
#[derive(Debug)]
struct TlsDir(PathBuf);

impl CertificateSource for TlsDir {
    fn read(&self, _: &CertificateName) -> Result<PemPair, String> {
        let read = |file: &str| {
            let path = self.0.join(file);
            std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))
        };
        Ok(PemPair { chain: read("tls.crt")?, key: read("tls.key")? })
    }

    fn location(&self, _: &CertificateName) -> String {
        self.0.display().to_string()
    }
}

/// The serving certificate, re-read by [`Webhook::serve`]; every handshake takes the current one.
struct ServingCertificate {
    store: CertificateStore,
    name: CertificateName,
}

impl std::fmt::Debug for ServingCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCertificate").field("name", &self.name.to_string()).finish()
    }
}

impl ServingCertificate {
    /// Reads the files again; a changed good pair replaces the served one.
    fn refresh(&self) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        self.store.refresh(&std::collections::BTreeSet::from([self.name.clone()]), now);
    }
}

impl rustls::server::ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.store.key(&self.name)
    }
}

/// The TLS settings serving `dir`'s `tls.crt` and `tls.key` (an error naming the problem when
/// they cannot be loaded at start), and the certificate to refresh.
fn tls_config(dir: &Path) -> Result<(Arc<rustls::ServerConfig>, Arc<ServingCertificate>), String> {
    let name =
        CertificateName { namespace: crate::install::NAMESPACE.into(), name: crate::install::WEBHOOK_SECRET.into() };
    let serving =
        Arc::new(ServingCertificate { store: CertificateStore::new(Arc::new(TlsDir(dir.to_path_buf()))), name });
    serving.refresh();
    if serving.store.key(&serving.name).is_none() {
        let problem = serving.store.statuses().into_iter().find_map(|s| s.problem).unwrap_or_default();
        return Err(format!("--webhook-tls-dir {}: {problem}", dir.display()));
    }
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(serving.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(config), serving))
}

/// A bound webhook server.
pub struct Webhook {
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    serving: Arc<ServingCertificate>,
    injector: Arc<Injector>,
}

impl Webhook {
    /// Loads the TLS material, binds, and (with a client) reads the server's version.
    pub async fn bind(options: WebhookOptions, client: Option<kube::Client>) -> Result<Webhook, String> {
        let (tls, serving) = tls_config(&options.tls_dir)?;
        let listener = tokio::net::TcpListener::bind(options.addr)
            .await
            .map_err(|e| format!("cannot listen on {} (--webhook-addr): {e}", options.addr))?;
        let native_sidecars = match &client {
            Some(c) => match c.apiserver_version().await {
                Ok(v) => InjectConfig::native_sidecars_for(&v.major, &v.minor),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the API server's version: rendering classic sidecars");
                    false
                }
            },
            None => false,
        };
        Ok(Webhook {
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(tls),
            serving,
            injector: Arc::new(Injector { client, options, native_sidecars }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the task is aborted, re-reading the certificate every `certificate_poll`.
    pub async fn serve(self) {
        tracing::info!(addr = ?self.listener.local_addr().ok(), native_sidecars = self.injector.native_sidecars, "injection webhook ready");
        let mut poll = tokio::time::interval(self.injector.options.certificate_poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = poll.tick() => {
                    self.serving.refresh();
                    continue;
                }
            };
            let Ok((stream, peer)) = accepted else { continue };
            let (acceptor, injector) = (self.acceptor.clone(), self.injector.clone());
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream)).await;
                let Ok(Ok(tls)) = handshake else {
                    tracing::debug!(%peer, "webhook TLS handshake failed");
                    return;
                };
                let service = service_fn(move |req| {
                    let injector = injector.clone();
                    async move { Ok::<_, Infallible>(injector.handle(req).await) }
                });
                if let Err(e) =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await
                {
                    tracing::debug!(%peer, error = %e, "webhook connection ended");
                }
            });
        }
    }
}
