//! The gRPC discovery service: one Watch stream per proxy (see the .proto for the protocol).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use plexus_api::discovery::discovery_server::Discovery;
use plexus_api::discovery::{ProxyInfo, ReportAck, TelemetryReport, WatchRequest, WatchResponse};
use plexus_core::{Kind, ServiceName, Spec, parse_documents};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::index::{Encoded, Views};
use crate::proxies::{Proxies, ProxyCertificate, ProxyRecord};
use crate::store::{ObjectKey, Store};

/// Annotation marking a Workload registered by a proxy (removed when the proxy goes away).
pub const REGISTERED_ANNOTATION: &str = plexus_core::model::REGISTERED_ANNOTATION;

/// Serves Watch streams from the shared index.
pub struct DiscoveryService {
    pub views: watch::Receiver<Arc<Views>>,
    pub store: Arc<dyn Store>,
    pub proxies: Arc<Proxies>,
    pub traffic: Arc<crate::traffic::TrafficWindow>,
    /// The certificate authority: its trust bundle goes in every response.
    pub ca: Arc<crate::identity::Ca>,
}

/// The certificate a proxy reports in a message (`None` before it has one).
fn reported_certificate(m: &WatchRequest) -> Option<ProxyCertificate> {
    (!m.certificate_serial.is_empty() || !m.certificate_issuer_sha256.is_empty()).then(|| ProxyCertificate {
        serial: m.certificate_serial.clone(),
        issuer_sha256: m.certificate_issuer_sha256.clone(),
        not_after_unix: m.certificate_not_after_unix,
        spiffe_id: m.spiffe_id.clone(),
    })
}

/// Whether a message reports the certificate already on record (compared in place: most
/// messages are acknowledgements repeating it).
fn same_certificate(known: Option<&ProxyCertificate>, m: &WatchRequest) -> bool {
    match known {
        None => m.certificate_serial.is_empty() && m.certificate_issuer_sha256.is_empty(),
        Some(c) => {
            c.serial == m.certificate_serial
                && c.issuer_sha256 == m.certificate_issuer_sha256
                && c.not_after_unix == m.certificate_not_after_unix
                && c.spiffe_id == m.spiffe_id
        }
    }
}

fn parse_destinations(names: &[String]) -> BTreeSet<ServiceName> {
    names.iter().filter_map(|n| ServiceName::candidates(n).into_iter().next()).collect()
}

impl DiscoveryService {
    /// Checks what a proxy says about itself against the identity it proved: its namespace,
    /// the service it acts as (its own service account's name, or a Service whose
    /// `spec.serviceAccounts` lists it), a workload name no other identity holds, and an admin
    /// address on the host its connection comes from (tap requests and Prometheus targets go
    /// there).
    async fn admit(&self, caller: &Caller, info: &mut ProxyInfo, peer_ip: Option<IpAddr>) -> Result<(), Status> {
        let who = &caller.spiffe_id;
        if info.namespace.is_empty() {
            info.namespace.clone_from(&caller.namespace);
        }
        if info.namespace != caller.namespace {
            return Err(Status::permission_denied(format!(
                "{who} cannot act in namespace {:?}: only in {:?}",
                info.namespace, caller.namespace
            )));
        }
        if !info.service.is_empty() && info.service != caller.service_account {
            let key =
                ObjectKey { kind: Kind::Service, namespace: caller.namespace.clone(), name: info.service.clone() };
            let store = self.store.clone();
            let service = tokio::task::spawn_blocking(move || store.get(&key))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(e.to_string()))?;
            let listed = matches!(&service.map(|s| s.spec), Some(Spec::Service(s)) if s.service_accounts.contains(&caller.service_account));
            if !listed {
                return Err(Status::permission_denied(format!(
                    "{who} cannot act as service {:?}: its service account is {:?}, and Service {}/{} does not list it in spec.serviceAccounts",
                    info.service, caller.service_account, caller.namespace, info.service
                )));
            }
        }
        if !info.workload.is_empty() && self.proxies.workload_taken(who, &info.namespace, &info.workload) {
            return Err(Status::already_exists(format!(
                "workload {}/{} is connected as another identity",
                info.namespace, info.workload
            )));
        }
        if !info.admin_address.is_empty() {
            let admin: std::net::SocketAddr = info.admin_address.parse().map_err(|_| {
                Status::invalid_argument(format!("admin address {:?} is not IP:PORT", info.admin_address))
            })?;
            if let Some(peer) = peer_ip
                && admin.ip().is_unspecified()
            {
                // Listening on every address: reached where the proxy connects from.
                info.admin_address = std::net::SocketAddr::new(peer, admin.port()).to_string();
            } else if let Some(peer) = peer_ip
                && !same_host(admin.ip(), peer)
            {
                return Err(Status::permission_denied(format!(
                    "admin address {admin} is not on the host this proxy connects from ({peer})"
                )));
            }
        }
        Ok(())
    }

    /// Validates and stores the workload a proxy registers, as `identity` (the namespace and
    /// service account its credential is bound to): only in that namespace, only with that
    /// service account, only for Services that admit it (`spec.serviceAccounts`), and never
    /// over a resource an operator applied or another identity registered.
    async fn register(&self, json: &[u8], identity: &Caller) -> Result<ObjectKey, Status> {
        let text = String::from_utf8_lossy(json);
        let mut resources =
            parse_documents("registration", &text).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let [mut workload] = <[_; 1]>::try_from(std::mem::take(&mut resources))
            .map_err(|_| Status::invalid_argument("register exactly one Workload"))?;
        let key = ObjectKey::of(&workload);
        let Spec::Workload(spec) = &mut workload.spec else {
            return Err(Status::invalid_argument("only a Workload can be registered"));
        };
        let who = &identity.spiffe_id;
        if key.namespace != identity.namespace {
            return Err(Status::permission_denied(format!(
                "{who} cannot register a Workload in namespace {:?}: only in {:?}",
                key.namespace, identity.namespace
            )));
        }
        match spec.service_account.as_deref() {
            None => spec.service_account = Some(identity.service_account.clone()),
            Some(sa) if sa == identity.service_account => {}
            Some(sa) => {
                return Err(Status::permission_denied(format!(
                    "{who} cannot register a Workload running as service account {sa:?}: only as {:?}",
                    identity.service_account
                )));
            }
        }
        let labels = workload.metadata.labels.clone();
        workload.metadata.annotations.insert(REGISTERED_ANNOTATION.into(), "true".into());
        let store = self.store.clone();
        let (sa, ns, who) = (identity.service_account.clone(), identity.namespace.clone(), who.clone());
        let checked_key = key.clone();
        tokio::task::spawn_blocking(move || -> Result<(), Status> {
            let services = store.list(Some(Kind::Service), Some(&ns)).map_err(|e| Status::internal(e.to_string()))?;
            for svc in &services {
                let Spec::Service(s) = &svc.spec else { continue };
                let selected = !s.selector.is_empty() && s.selector.iter().all(|(k, v)| labels.get(k) == Some(v));
                if selected && !s.admits(Some(&sa)) {
                    return Err(Status::permission_denied(format!(
                        "Service {ns}/{} admits only the service accounts {:?} (spec.serviceAccounts); {who} cannot back it",
                        svc.metadata.name, s.service_accounts
                    )));
                }
            }
            if let Some(existing) = store.get(&checked_key).map_err(|e| Status::internal(e.to_string()))? {
                if !existing.metadata.annotations.contains_key(REGISTERED_ANNOTATION) {
                    return Err(Status::already_exists(format!(
                        "{checked_key} was applied by an operator; a registration never replaces it (choose another workload name)"
                    )));
                }
                let owner = match &existing.spec {
                    Spec::Workload(w) => w.service_account.clone(),
                    _ => None,
                };
                if owner.as_deref() != Some(sa.as_str()) {
                    return Err(Status::already_exists(format!(
                        "{checked_key} is registered by another identity; {who} cannot replace it"
                    )));
                }
            }
            store.apply(&[workload]).map_err(|e| Status::internal(e.to_string()))?;
            Ok(())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(key)
    }
}

/// The identity of a call: its verified client certificate. Everything but certificate
/// signing needs one.
fn caller_of<T>(request: &Request<T>) -> Result<Caller, Status> {
    let identity = crate::grpc_tls::Peer::of(request).and_then(|p| p.identity.clone()).ok_or_else(|| {
        Status::unauthenticated(
            "this call needs mutual TLS with a workload certificate (bootstrap one with a workload token: plexus token create)",
        )
    })?;
    Ok(Caller {
        namespace: identity.namespace.clone(),
        service_account: identity.service_account.clone(),
        spiffe_id: identity.spiffe_id.clone(),
    })
}

/// A reported certificate, with the SPIFFE ID the connection proved (a proxy cannot report
/// itself as someone else).
fn attributed(mut c: ProxyCertificate, caller: &Caller) -> ProxyCertificate {
    c.spiffe_id.clone_from(&caller.spiffe_id);
    c
}

/// Whether `admin` (a proxy's admin address) is on the host its connection came from (`peer`):
/// the same address, or both addresses of this machine (a proxy beside the control plane
/// reaching it over loopback or a bridge, as the demo's ingress does in `--netns` mode).
fn same_host(admin: IpAddr, peer: IpAddr) -> bool {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    let (admin, peer) = (canonical(admin), canonical(peer));
    // An address this machine holds can be bound to.
    let local = |ip: IpAddr| ip.is_loopback() || std::net::UdpSocket::bind((ip, 0)).is_ok();
    admin == peer || (local(admin) && local(peer))
}

/// Who a proxy is, from its credential: the identity its calls are attributed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    pub spiffe_id: String,
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = WatchStream;

    async fn report(&self, request: Request<TelemetryReport>) -> Result<Response<ReportAck>, Status> {
        let caller = caller_of(&request)?;
        let report = request.into_inner();
        let namespace = if report.namespace.is_empty() { caller.namespace.as_str() } else { report.namespace.as_str() };
        // Attributed to the reporter alone: its own connected proxy, whose side of every
        // summary (the destination of inbound, the source of outbound) the control plane fills in.
        let Some(me) = self.proxies.find(&caller.spiffe_id, namespace, &report.workload) else {
            return Err(Status::permission_denied(format!(
                "{} has no connected proxy named {namespace}/{}: a proxy reports only for itself",
                caller.spiffe_id, report.workload
            )));
        };
        let mut summaries = report.summaries;
        for s in &mut summaries {
            match s.direction.as_str() {
                "inbound" => {
                    s.destination_workload.clone_from(&me.workload);
                    s.destination_service.clone_from(&me.service);
                    s.destination_version.clone_from(&me.version);
                }
                "outbound" => {
                    s.source_workload.clone_from(&me.workload);
                    s.source_service.clone_from(&me.service);
                }
                other => return Err(Status::invalid_argument(format!("direction {other:?}: inbound or outbound"))),
            }
        }
        self.traffic.add(summaries);
        Ok(Response::new(ReportAck {}))
    }

    async fn watch(&self, request: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        let caller = caller_of(&request)?;
        let peer_ip = crate::grpc_tls::Peer::of(&request).and_then(|p| p.addr).map(|a| a.ip());
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("empty stream"))?;
        let mut info =
            first.proxy.clone().ok_or_else(|| Status::invalid_argument("the first message must carry ProxyInfo"))?;
        self.admit(&caller, &mut info, peer_ip).await?;
        let registered = if info.register_workload.is_empty() {
            None
        } else {
            Some(self.register(&info.register_workload, &caller).await?)
        };
        let id = self.proxies.connect(ProxyRecord {
            identity: caller.spiffe_id.clone(),
            id: 0,
            workload: info.workload.clone(),
            namespace: info.namespace.clone(),
            service: info.service.clone(),
            version: info.version.clone(),
            mode: if info.mode.is_empty() { "sidecar".into() } else { info.mode.clone() },
            admin_address: info.admin_address.clone(),
            sent_revision: 0,
            applied_revision: 0,
            last_seen: None,
            registered,
        });
        let mut certificate = reported_certificate(&first).map(|c| attributed(c, &caller));
        self.proxies.report_certificate(id, certificate.clone());
        tracing::info!(id, workload = %info.workload, service = %info.service, "proxy connected");
        // Boxed: a channel allocates its slots up front, and a response is large.
        let (tx, rx) = mpsc::channel::<Box<WatchResponse>>(4);
        let mut views = self.views.clone();
        let mut bundle = self.ca.subscribe_bundle();
        let proxies = self.proxies.clone();
        let store = self.store.clone();
        // Kubernetes: told once when this proxy's pod has finished (its app containers exited).
        let mut finished = store.finished_workloads();
        let mut check_finished = finished.is_some();
        tokio::spawn(async move {
            // Shared with what was last sent; `wanted_as_sent` is the proxy's own list, so an
            // acknowledgement repeating it (nearly all of them) is recognised without parsing.
            let mut wanted = Arc::new(parse_destinations(&first.destinations));
            let mut wanted_as_sent = first.destinations.clone();
            let mut last_sent: Option<Sent> = None;
            // Set by whatever may change the response (a new index, trust bundle or
            // destination set); acknowledgements and heartbeats leave it alone.
            let mut dirty = true;
            let mut silence = tokio::time::interval(check_interval(proxies.ttl()));
            let mut last_heard = std::time::Instant::now();
            'stream: loop {
                if dirty {
                    dirty = false;
                    let current = views.borrow_and_update().clone();
                    let trust_bundle = bundle.borrow_and_update().clone();
                    let union = current.union(wanted.iter());
                    let next = Sent {
                        revision: current.revision,
                        wanted: wanted.clone(),
                        resources: union,
                        trust_bundle,
                        namespaces: current.namespaces.clone(),
                    };
                    if let Some(response) = next.response_after(last_sent.as_ref(), first.incremental) {
                        let pieces = if first.incremental { pieces(response) } else { vec![response] };
                        for piece in pieces {
                            if tx.send(Box::new(piece)).await.is_err() {
                                break 'stream;
                            }
                        }
                        proxies.sent(id, current.revision);
                        last_sent = Some(next);
                    }
                }
                if check_finished {
                    check_finished = false;
                    let done = finished.as_mut().is_some_and(|f| has_finished(&f.borrow_and_update(), &caller, &info));
                    if done {
                        tracing::info!(id, workload = %info.workload, namespace = %info.namespace, "workload finished: telling its proxy to exit");
                        let revision = last_sent.as_ref().map_or(0, |s| s.revision);
                        let told = WatchResponse {
                            revision,
                            incremental: true,
                            workload_finished: true,
                            ..WatchResponse::default()
                        };
                        if tx.send(Box::new(told)).await.is_err() {
                            break 'stream;
                        }
                        finished = None;
                    }
                }
                tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(m)) if m.leaving => {
                            if let Some(key) = proxies.leave(id) {
                                tracing::info!(workload = %key, "workload deregistered");
                                if let Err(e) = crate::store::write(&store, move |s| s.delete(&[key])).await {
                                    tracing::error!(error = %e, "cannot delete a deregistered workload");
                                }
                            }
                            break;
                        }
                        Ok(Some(m)) => {
                            last_heard = std::time::Instant::now();
                            proxies.heard_from(id, Some(m.applied_revision));
                            if !same_certificate(certificate.as_ref(), &m) {
                                certificate = reported_certificate(&m).map(|c| attributed(c, &caller));
                                proxies.report_certificate(id, certificate.clone());
                            }
                            if m.destinations != wanted_as_sent {
                                let destinations = parse_destinations(&m.destinations);
                                wanted_as_sent = m.destinations;
                                if destinations != *wanted {
                                    wanted = Arc::new(destinations);
                                    dirty = true;
                                }
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                    changed = views.changed() => if changed.is_err() { break } else { dirty = true },
                    changed = bundle.changed() => if changed.is_err() { break } else { dirty = true },
                    Some(changed) = async { match finished.as_mut() { Some(f) => Some(f.changed().await), None => None } } => {
                        if changed.is_err() { finished = None } else { check_finished = true }
                    }
                    _ = silence.tick() => {
                        if last_heard.elapsed() >= proxies.ttl() {
                            tracing::warn!(id, silent = ?proxies.ttl(), "proxy silent for the registration TTL; closing its stream");
                            break;
                        }
                    }
                }
            }
            proxies.disconnect(id);
            tracing::info!(id, "proxy disconnected");
        });
        Ok(Response::new(ReceiverStream::new(rx).map(|r| Ok(*r))))
    }
}

/// Whether `finished` holds the workload a proxy connected as: its name in its namespace, run
/// as the service account the proxy authenticated with (a proxy is told only of its own pod).
fn has_finished(finished: &crate::store::FinishedWorkloads, caller: &Caller, info: &ProxyInfo) -> bool {
    !info.workload.is_empty()
        && info.namespace == caller.namespace
        && finished.get(&(info.namespace.clone(), info.workload.clone())) == Some(&caller.service_account)
}

/// The responses of a Watch stream.
pub type WatchStream = tokio_stream::adapters::Map<
    ReceiverStream<Box<WatchResponse>>,
    fn(Box<WatchResponse>) -> Result<WatchResponse, Status>,
>;

/// Resource bytes per message when a change is split ([`pieces`]). Every stream keeps an
/// encode buffer as large as the largest message it sent; a view of 9 KiB sent whole kept
/// 16 KiB per stream for the stream's life.
const PIECE_BYTES: usize = 2048;

/// Splits a response into messages of about [`PIECE_BYTES`] of resources (a larger resource
/// travels alone): the first as given, the rest incremental, all but the last with `more`.
fn pieces(mut response: WatchResponse) -> Vec<WatchResponse> {
    let total: usize = response.resources.iter().map(bytes::Bytes::len).sum();
    if total <= PIECE_BYTES {
        return vec![response];
    }
    let mut groups: Vec<Vec<bytes::Bytes>> = vec![Vec::new()];
    let mut size = 0;
    for r in std::mem::take(&mut response.resources) {
        if size + r.len() > PIECE_BYTES && groups.last().is_some_and(|g| !g.is_empty()) {
            groups.push(Vec::new());
            size = 0;
        }
        size += r.len();
        if let Some(g) = groups.last_mut() {
            g.push(r);
        }
    }
    let last = groups.len() - 1;
    groups
        .into_iter()
        .enumerate()
        .map(|(i, resources)| {
            if i == 0 {
                WatchResponse { resources, more: last > 0, ..response.clone() }
            } else {
                WatchResponse {
                    revision: response.revision,
                    resources,
                    destinations: response.destinations.clone(),
                    trust_bundle_pem: String::new(),
                    incremental: true,
                    removed: Vec::new(),
                    more: i < last,
                    namespaces: response.namespaces.clone(),
                    workload_finished: false,
                }
            }
        })
        .collect()
}

/// What a stream sent last (or would send next): the view of its destinations at a revision.
struct Sent {
    revision: u64,
    wanted: Arc<BTreeSet<ServiceName>>,
    /// Sorted by key (as [`Views::union`] returns them).
    resources: Vec<Arc<Encoded>>,
    trust_bundle: Arc<str>,
    namespaces: Arc<[String]>,
}

impl Sent {
    /// The response that takes a proxy from `previous` to `self`, `None` when nothing it
    /// would see changed. Unchanged resources are the same shared encodings, so changes are
    /// found by comparing pointers, not bytes.
    fn response_after(&self, previous: Option<&Sent>, incremental: bool) -> Option<WatchResponse> {
        let bundle_changed = previous.is_none_or(|p| !Arc::ptr_eq(&p.trust_bundle, &self.trust_bundle));
        let full = || WatchResponse {
            revision: self.revision,
            resources: self.resources.iter().map(|e| e.json.clone()).collect(),
            destinations: self.wanted.iter().map(ToString::to_string).collect(),
            trust_bundle_pem: self.trust_bundle.to_string(),
            incremental: false,
            removed: Vec::new(),
            more: false,
            namespaces: self.namespaces.to_vec(),
            workload_finished: false,
        };
        let Some(previous) = previous else { return Some(full()) };
        let (changed, removed) = difference(&previous.resources, &self.resources);
        if changed.is_empty()
            && removed.is_empty()
            && previous.wanted == self.wanted
            && !bundle_changed
            && previous.namespaces == self.namespaces
        {
            return None;
        }
        if !incremental {
            return Some(full());
        }
        Some(WatchResponse {
            revision: self.revision,
            resources: changed.iter().map(|e| e.json.clone()).collect(),
            destinations: self.wanted.iter().map(ToString::to_string).collect(),
            trust_bundle_pem: if bundle_changed { self.trust_bundle.to_string() } else { String::new() },
            incremental: true,
            removed: removed.iter().map(|e| e.key.storage_key()).collect(),
            more: false,
            namespaces: self.namespaces.to_vec(),
            workload_finished: false,
        })
    }
}

/// What is new or changed in `new` and what is gone from `old`; both sorted by key.
fn difference<'a>(old: &'a [Arc<Encoded>], new: &'a [Arc<Encoded>]) -> (Vec<&'a Encoded>, Vec<&'a Encoded>) {
    use std::cmp::Ordering;
    let (mut changed, mut removed) = (Vec::new(), Vec::new());
    let (mut o, mut n) = (0, 0);
    while o < old.len() || n < new.len() {
        let order = match (old.get(o), new.get(n)) {
            (Some(a), Some(b)) => a.key.cmp(&b.key),
            (Some(_), None) => Ordering::Less,
            _ => Ordering::Greater,
        };
        match order {
            Ordering::Less => {
                removed.push(old[o].as_ref());
                o += 1;
            }
            Ordering::Greater => {
                changed.push(new[n].as_ref());
                n += 1;
            }
            Ordering::Equal => {
                if !Arc::ptr_eq(&old[o], &new[n]) {
                    changed.push(new[n].as_ref());
                }
                o += 1;
                n += 1;
            }
        }
    }
    (changed, removed)
}

/// Rebuilds the index on every store change.
pub async fn maintain_index(store: Arc<dyn Store>, views: watch::Sender<Arc<Views>>) {
    let mut changes = store.subscribe();
    let cache = Arc::new(std::sync::Mutex::new(crate::index::EncodeCache::default()));
    loop {
        let revision = *changes.borrow_and_update();
        let s = store.clone();
        let c = cache.clone();
        // Reading the store and compiling the views is CPU work: keep it off the workers
        // that serve the streams.
        match tokio::task::spawn_blocking(move || {
            let mut cache = c.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            s.list_shared().map(|resources| Views::build(revision, &resources, &mut cache))
        })
        .await
        {
            Ok(Ok(built)) => {
                views.send_replace(Arc::new(built));
            }
            Ok(Err(e)) => tracing::error!(error = %e, "cannot read the store to rebuild the index"),
            Err(e) => tracing::error!(error = %e, "index rebuild failed"),
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Removes registered workloads whose proxy has been silent for the registration TTL (checked
/// every second, or every TTL/4 when that is shorter).
pub async fn expire_registrations(store: Arc<dyn Store>, proxies: Arc<Proxies>) {
    // Workloads registered before a restart get a fresh grace period.
    if let Ok(existing) = store.list(Some(Kind::Workload), None) {
        proxies.adopt(
            existing.iter().filter(|w| w.metadata.annotations.contains_key(REGISTERED_ANNOTATION)).map(ObjectKey::of),
        );
    }
    let mut tick = tokio::time::interval(check_interval(proxies.ttl()));
    loop {
        tick.tick().await;
        let gone = proxies.expired();
        if gone.is_empty() {
            continue;
        }
        tracing::info!(workloads = ?gone.iter().map(ToString::to_string).collect::<Vec<_>>(), "registered workloads expired");
        if let Err(e) = crate::store::write(&store, move |s| s.delete(&gone)).await {
            tracing::error!(error = %e, "cannot delete expired workloads");
        }
    }
}

/// How often to look for what has been silent for `ttl`: every second, or every `ttl`/4 when
/// that is shorter (at least 50 ms), so a short TTL is kept to within a quarter.
pub fn check_interval(ttl: Duration) -> Duration {
    (ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ObjectKey;
    use plexus_core::Kind;

    fn encoded(name: &str, json: &str) -> Arc<Encoded> {
        let key = ObjectKey { kind: Kind::Workload, namespace: "default".into(), name: name.into() };
        Arc::new(Encoded { key, json: bytes::Bytes::copy_from_slice(json.as_bytes()) })
    }

    fn sent(resources: Vec<Arc<Encoded>>, bundle: &Arc<str>) -> Sent {
        let wanted = Arc::new([ServiceName::new("a", "default")].into_iter().collect());
        Sent {
            revision: 1,
            wanted,
            resources,
            trust_bundle: bundle.clone(),
            namespaces: Arc::from(["default".to_string()]),
        }
    }

    /// A proxy is told that its workload finished only for the pod it connected as, run as
    /// the service account it authenticated with.
    #[test]
    fn a_proxy_is_told_only_of_its_own_finished_workload() {
        let finished: crate::store::FinishedWorkloads =
            [(("jobs".to_string(), "fetch-x1".to_string()), "fetcher".to_string())].into();
        let caller = |ns: &str, sa: &str| Caller {
            namespace: ns.into(),
            service_account: sa.into(),
            spiffe_id: format!("spiffe://plexus.local/ns/{ns}/sa/{sa}"),
        };
        let info = |ns: &str, workload: &str| ProxyInfo {
            workload: workload.into(),
            namespace: ns.into(),
            ..ProxyInfo::default()
        };
        assert!(has_finished(&finished, &caller("jobs", "fetcher"), &info("jobs", "fetch-x1")));
        // Variants: another pod, another service account, another namespace, no workload name.
        assert!(!has_finished(&finished, &caller("jobs", "fetcher"), &info("jobs", "fetch-x2")));
        assert!(!has_finished(&finished, &caller("jobs", "default"), &info("jobs", "fetch-x1")));
        assert!(!has_finished(&finished, &caller("other", "fetcher"), &info("jobs", "fetch-x1")));
        assert!(!has_finished(&finished, &caller("other", "fetcher"), &info("other", "fetch-x1")));
        assert!(!has_finished(&finished, &caller("jobs", "fetcher"), &info("jobs", "")));
    }

    /// Every response names the mesh's namespaces (proxies read `name.ns` hosts only in
    /// them), and a new namespace alone is a change to send.
    #[test]
    fn responses_carry_the_namespaces_and_a_new_namespace_is_sent() {
        let bundle: Arc<str> = Arc::from("PEM");
        let a = encoded("a", "A1");
        let first = sent(vec![a.clone()], &bundle);
        assert_eq!(first.response_after(None, true).expect("first").namespaces, ["default"]);
        let same = sent(vec![a.clone()], &bundle);
        assert!(same.response_after(Some(&first), true).is_none(), "unchanged: nothing sent");
        let more =
            Sent { namespaces: Arc::from(["default".to_string(), "prod".to_string()]), ..sent(vec![a], &bundle) };
        let delta = more.response_after(Some(&first), true).expect("a new namespace is a change");
        assert_eq!(delta.namespaces, ["default", "prod"]);
        assert!(delta.resources.is_empty() && delta.removed.is_empty());
    }

    #[test]
    fn views_list_the_namespaces_that_have_a_service() {
        let yaml = "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: a, namespace: prod}\nspec: {ports: [{port: 80}]}\n---\napiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: b}\nspec: {ports: [{port: 80}]}\n---\napiVersion: plexus.dev/v1alpha1\nkind: Workload\nmetadata: {name: w, namespace: lonely, labels: {app: x}}\nspec: {address: 127.0.0.1, ports: [{port: 1}]}\n";
        let resources: Vec<Arc<plexus_core::Resource>> =
            plexus_core::parse_documents("t", yaml).expect("valid").into_iter().map(Arc::new).collect();
        let views = Views::build(1, &resources, &mut crate::index::EncodeCache::default());
        assert_eq!(&*views.namespaces, ["default".to_string(), "prod".to_string()]);
    }

    #[test]
    fn incremental_responses_carry_only_what_changed() {
        let bundle: Arc<str> = Arc::from("PEM");
        let (a, b, c) = (encoded("a", "A1"), encoded("b", "B1"), encoded("c", "C1"));
        let first = sent(vec![a.clone(), b.clone(), c.clone()], &bundle);
        let whole = first.response_after(None, true).expect("the first response");
        assert!(!whole.incremental);
        assert_eq!(whole.resources.len(), 3);
        assert_eq!(whole.trust_bundle_pem, "PEM");

        // Same shared encodings: nothing to send.
        assert!(sent(vec![a.clone(), b.clone(), c.clone()], &bundle).response_after(Some(&first), true).is_none());

        // b changed, c removed, d added; the bundle is unchanged, so it is left out.
        let next = sent(vec![a.clone(), encoded("b", "B2"), encoded("d", "D1")], &bundle);
        let delta = next.response_after(Some(&first), true).expect("a change");
        assert!(delta.incremental);
        assert_eq!(delta.resources, [&b"B2"[..], &b"D1"[..]]);
        assert_eq!(delta.removed, ["Workload/default/c"]);
        assert!(delta.trust_bundle_pem.is_empty());

        // A proxy that did not ask for increments gets the whole view again.
        let whole = next.response_after(Some(&first), false).expect("a change");
        assert!(!whole.incremental);
        assert_eq!(whole.resources.len(), 3);

        // A large change is split into pieces of about PIECE_BYTES, only the last without `more`.
        let big: Vec<Arc<Encoded>> = (0..10).map(|i| encoded(&format!("w{i}"), &"x".repeat(700))).collect();
        let whole = sent(big, &bundle).response_after(None, true).expect("the first response");
        let parts = pieces(whole);
        assert_eq!(
            parts.iter().map(|p| p.resources.len()).collect::<Vec<_>>(),
            [2; 5],
            "700-byte resources, 2 per piece"
        );
        assert!(!parts[0].incremental && parts[0].trust_bundle_pem == "PEM");
        assert!(parts[1..].iter().all(|p| p.incremental && p.trust_bundle_pem.is_empty() && p.removed.is_empty()));
        assert_eq!(parts.iter().map(|p| p.more).collect::<Vec<_>>(), [true, true, true, true, false]);

        // A new bundle alone is a change, and it is sent.
        let rotated: Arc<str> = Arc::from("PEM2");
        let delta = sent(vec![a, b, c], &rotated).response_after(Some(&first), true).expect("a new bundle");
        assert!(delta.resources.is_empty() && delta.removed.is_empty());
        assert_eq!(delta.trust_bundle_pem, "PEM2");
    }
}
