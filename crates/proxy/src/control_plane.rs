//! The control-plane source of configuration: a gRPC Watch stream (see the .proto in
//! `plexus-api`). The proxy sends the destinations it needs (and, when started by
//! `plexus run`, the Workload to register) and compiles every answer with the same code as
//! `--resources` mode. The proxy asks for incremental responses: the whole view once per
//! stream, then only what changed, applied to the view kept here. While the control plane is
//! unreachable the proxy keeps serving with the last view and reconnects with capped
//! exponential backoff.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use plexus_api::discovery::discovery_client::DiscoveryClient;
use plexus_api::discovery::{ProxyInfo, WatchRequest, WatchResponse};
use plexus_core::{MeshSnapshot, Resource, ServiceName, resource_from_value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::discovery::Discovery;

/// How often a proxy talks to the control plane when nothing changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A message (heartbeat) at least this often: the control plane removes a registered
    /// workload whose sidecar is silent for its registration TTL (15 s by default).
    pub heartbeat: Duration,
    /// The longest wait between attempts to reach the control plane (the wait starts at
    /// 100 ms and doubles).
    pub retry_max: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing { heartbeat: Duration::from_secs(5), retry_max: Duration::from_secs(5) }
    }
}

/// How a proxy talks to the control plane.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// `http://HOST:PORT` of the control plane's gRPC port.
    pub address: String,
    /// Heartbeat and reconnection intervals.
    pub timing: Timing,
    pub workload: String,
    pub namespace: String,
    pub service: String,
    pub version: String,
    pub mode: String,
    /// Filled in once the admin listener is bound.
    pub admin_address: String,
    /// The workload token (bootstraps the certificate; needed to register).
    pub token: String,
    /// A file holding the token, re-read at every bootstrap (a pod's projected ServiceAccount
    /// token rotates); `token` is its content at start.
    pub token_file: Option<std::path::PathBuf>,
    /// A Workload resource (JSON) to register while connected.
    pub register: Option<Vec<u8>>,
    /// The workload's service account (its SPIFFE identity).
    pub service_account: String,
    /// The workload identity: trust bundles from the control plane are installed into it, and
    /// its certificate is reported (so the control plane knows who still needs a rotation).
    pub identity: Option<Arc<crate::identity::WorkloadIdentity>>,
    /// When set, [`ControlPlaneConfig::register`] is held back until the application answers
    /// there, so no peer is sent traffic before the app listens.
    pub app_readiness: Option<AppReadiness>,
    /// Trust anchors (PEM) to verify the control plane with besides the one the token pins
    /// (`--anchor FILE`).
    pub anchors_pem: Option<String>,
    /// How the control plane is verified and authenticated to (set up from the token).
    pub tls: Option<Arc<crate::cp_tls::ControlPlaneTls>>,
    /// FOR BENCHMARKS: the workload certificate is used with the control plane only, never
    /// with peers (a plaintext baseline that is still an authenticated proxy).
    pub plaintext_peers: bool,
}

/// Where the local application is probed before its Workload is registered.
#[derive(Debug, Clone)]
pub struct AppReadiness {
    /// The app's own listener (a TCP connect must succeed).
    pub addr: std::net::SocketAddr,
    /// Optionally, an HTTP path that must answer 2xx as well.
    pub http_path: Option<String>,
    /// Time between probes.
    pub interval: Duration,
}

impl AppReadiness {
    /// Probes until the app is ready, then turns the returned switch on (and stops).
    fn spawn_probe(self) -> tokio::sync::watch::Receiver<bool> {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut waiting_since = tokio::time::Instant::now();
            loop {
                if self.ready_once().await {
                    tracing::info!(app = %self.addr, "the application is ready; registering the workload");
                    let _ = tx.send(true);
                    return;
                }
                if waiting_since.elapsed() >= Duration::from_secs(10) {
                    tracing::warn!(app = %self.addr, path = ?self.http_path, "the application is not ready yet; the workload stays unregistered until it is");
                    waiting_since = tokio::time::Instant::now();
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(self.interval).await;
            }
        });
        rx
    }

    async fn ready_once(&self) -> bool {
        let probe = async {
            let stream = tokio::net::TcpStream::connect(self.addr).await.ok()?;
            let Some(path) = &self.http_path else { return Some(true) };
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.ok()?;
            tokio::spawn(conn);
            let req = http::Request::get(path.as_str())
                .header(http::header::HOST, self.addr.to_string())
                .header(http::header::USER_AGENT, "plexus-readiness")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .ok()?;
            Some(sender.send_request(req).await.ok()?.status().is_success())
        };
        tokio::time::timeout(Duration::from_secs(1), probe).await.ok().flatten().unwrap_or(false)
    }
}

/// Why a discovery session ended without an error.
enum Ended {
    /// The control plane closed the stream.
    Closed,
    /// The application became ready: a new session carries the registration.
    AppReady,
}

/// Runs the watch loop until `leave` turns true: then the registered workload is
/// deregistered (best effort, within 2 s) and the function returns.
pub async fn run(discovery: Arc<Discovery>, config: ControlPlaneConfig, mut leave: tokio::sync::watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100).min(config.timing.retry_max);
    let app_ready = config.app_readiness.clone().map(AppReadiness::spawn_probe);
    loop {
        let result = session(&discovery, &config, app_ready.clone(), &mut leave).await;
        let leaving = *leave.borrow();
        if leaving {
            return;
        }
        match result {
            Ok(Ended::AppReady) => continue,
            Ok(Ended::Closed) => tracing::warn!(address = %config.address, "control plane closed the discovery stream"),
            Err(e) => {
                tracing::warn!(address = %config.address, error = %e, retry_in = ?backoff, "control plane unreachable; serving with the last config")
            }
        }
        discovery.set_control_plane_connected(false);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = crate::proxy::drained(&mut leave) => return,
        }
        backoff = (backoff * 2).min(config.timing.retry_max);
    }
}

fn request(
    discovery: &Discovery,
    identity: Option<&Arc<crate::identity::WorkloadIdentity>>,
    applied: u64,
    proxy: Option<ProxyInfo>,
) -> WatchRequest {
    let destinations = discovery.wanted().borrow().iter().map(ToString::to_string).collect();
    let cert = identity.and_then(|i| i.info()).unwrap_or_default();
    WatchRequest {
        proxy,
        destinations,
        applied_revision: applied,
        leaving: false,
        certificate_serial: cert.serial,
        certificate_issuer_sha256: cert.issuer_sha256,
        certificate_not_after_unix: cert.not_after_unix,
        spiffe_id: cert.spiffe_id,
        incremental: true,
    }
}

/// The resources of this stream's view, by id (`Kind/namespace/name`).
#[derive(Default)]
struct View {
    resources: BTreeMap<String, Resource>,
    /// A trust bundle received and not yet installed (installed once a change is complete).
    new_bundle: Option<String>,
}

impl View {
    /// Applies a response: a whole view replaces this one, an incremental one changes it.
    fn apply(&mut self, response: &WatchResponse) -> anyhow::Result<()> {
        let mut changed = Vec::with_capacity(response.resources.len());
        for bytes in &response.resources {
            let value: serde_json::Value = serde_json::from_slice(bytes)?;
            let resource =
                resource_from_value(value).map_err(|e| anyhow::anyhow!("bad resource from the control plane: {e}"))?;
            changed.push((resource.id(), resource));
        }
        if !response.incremental {
            self.resources.clear();
        }
        for id in &response.removed {
            self.resources.remove(id);
        }
        self.resources.extend(changed);
        // An incremental response leaves an unchanged bundle out.
        if !(response.incremental && response.trust_bundle_pem.is_empty()) {
            self.new_bundle = Some(response.trust_bundle_pem.clone());
        }
        Ok(())
    }

    fn compile(&self, revision: u64) -> MeshSnapshot {
        let resources: Vec<Resource> = self.resources.values().cloned().collect();
        MeshSnapshot::compile(&resources, revision.to_string())
    }
}

async fn session(
    discovery: &Arc<Discovery>,
    config: &ControlPlaneConfig,
    mut app_ready: Option<tokio::sync::watch::Receiver<bool>>,
    leave: &mut tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Ended> {
    // Registered in this session only once the app is ready; until then a change of readiness
    // ends the session so the next one carries the registration.
    let registering = app_ready.as_ref().is_none_or(|r| *r.borrow());
    if registering {
        app_ready = None;
    }
    let Some(tls) = &config.tls else {
        anyhow::bail!(
            "no workload token: the control plane serves only authenticated proxies (create one with `plexus token create`)"
        );
    };
    // Discovery is authenticated by the workload certificate: wait for it.
    if let Some(identity) = &config.identity {
        let mut certs = identity.subscribe();
        while !tls.has_certificate() {
            tokio::select! {
                changed = certs.changed() => changed?,
                _ = crate::proxy::drained(leave) => return Ok(Ended::Closed),
            }
        }
    }
    let channel = tls
        .channel(&config.address, |e| {
            e.connect_timeout(Duration::from_secs(2))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
        })
        .await?;
    let mut client = DiscoveryClient::new(channel);
    let info = ProxyInfo {
        workload: config.workload.clone(),
        namespace: config.namespace.clone(),
        service: config.service.clone(),
        version: config.version.clone(),
        admin_address: config.admin_address.clone(),
        mode: config.mode.clone(),
        token: config.token.clone(),
        register_workload: config.register.clone().filter(|_| registering).unwrap_or_default().into(),
    };
    let (tx, rx) = mpsc::channel(8);
    let mut applied = 0;
    let mut view = View::default();
    tx.send(request(discovery, config.identity.as_ref(), applied, Some(info))).await?;
    let mut stream = client.watch(ReceiverStream::new(rx)).await?.into_inner();
    let mut wanted = discovery.wanted();
    wanted.borrow_and_update();
    let mut heartbeat = tokio::time::interval(config.timing.heartbeat);
    heartbeat.tick().await;
    // A new certificate is reported at once (anchor rotations wait for every proxy's).
    let mut cert_changes = config.identity.as_ref().map(|i| i.subscribe());
    loop {
        tokio::select! {
            msg = stream.message() => {
                let Some(resp) = msg? else { return Ok(Ended::Closed) };
                if resp.workload_finished {
                    // Not a view: the pod's app containers have exited for good.
                    tracing::info!("the control plane says this workload has finished: draining and exiting");
                    discovery.set_workload_finished();
                    continue;
                }
                view.apply(&resp)?;
                if resp.more {
                    // A piece of a larger change: act on the whole change at its last piece.
                    continue;
                }
                let covered: BTreeSet<ServiceName> = resp.destinations.iter().filter_map(|d| ServiceName::candidates(d).into_iter().next()).collect();
                discovery.set_namespaces(&resp.namespaces);
                // Connected first: whoever wakes on the new snapshot sees the connection too.
                discovery.set_control_plane_connected(true);
                discovery.publish_covering(view.compile(resp.revision), covered);
                if let (Some(identity), Some(bundle)) = (&config.identity, view.new_bundle.take()) {
                    identity.update_bundle(&bundle);
                }
                applied = resp.revision;
                tx.send(request(discovery, config.identity.as_ref(), applied, None)).await?;
            }
            changed = wanted.changed() => {
                changed?;
                tx.send(request(discovery, config.identity.as_ref(), applied, None)).await?;
            }
            _ = heartbeat.tick() => {
                discovery.forget_unused();
                tx.send(request(discovery, config.identity.as_ref(), applied, None)).await?;
            }
            Some(Ok(())) = async { match cert_changes.as_mut() { Some(c) => Some(c.changed().await), None => None } } => {
                tx.send(request(discovery, config.identity.as_ref(), applied, None)).await?;
            }
            Some(Ok(())) = async { match app_ready.as_mut() { Some(r) => Some(r.wait_for(|ready| *ready).await.map(drop)), None => None } } => {
                // Leaving this stream ends nothing else: the control plane keeps the view, and
                // the next stream (at once, no backoff) registers the workload.
                return Ok(Ended::AppReady);
            }
            _ = crate::proxy::drained(leave) => {
                let bye = WatchRequest { leaving: true, ..request(discovery, config.identity.as_ref(), applied, None) };
                tx.send(bye).await?;
                // The control plane ends the stream once the workload is removed.
                let _ = tokio::time::timeout(Duration::from_secs(2), async { while let Ok(Some(_)) = stream.message().await {} }).await;
                return Ok(Ended::Closed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, port: u16) -> bytes::Bytes {
        let json = format!(
            r#"{{"apiVersion":"plexus.dev/v1alpha1","kind":"Workload","metadata":{{"name":"{name}","labels":{{"app":"a"}}}},"spec":{{"address":"127.0.0.1","ports":[{{"port":{port}}}]}}}}"#
        );
        json.into_bytes().into()
    }

    fn ports(view: &View) -> Vec<(String, u16)> {
        view.resources
            .values()
            .filter_map(|r| match &r.spec {
                plexus_core::Spec::Workload(w) => Some((r.metadata.name.clone(), w.ports[0].port)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn increments_change_the_view_and_a_whole_view_replaces_it() {
        let mut view = View::default();
        let whole = |resources| WatchResponse { revision: 1, resources, ..WatchResponse::default() };
        view.apply(&whole(vec![workload("w1", 1), workload("w2", 2)])).expect("valid");
        assert_eq!(ports(&view), [("w1".into(), 1), ("w2".into(), 2)]);

        let delta = WatchResponse {
            revision: 2,
            resources: vec![workload("w2", 20), workload("w3", 3)],
            removed: vec!["Workload/default/w1".into()],
            incremental: true,
            ..WatchResponse::default()
        };
        view.apply(&delta).expect("valid");
        assert_eq!(ports(&view), [("w2".into(), 20), ("w3".into(), 3)]);

        view.apply(&whole(vec![workload("w9", 9)])).expect("valid");
        assert_eq!(ports(&view), [("w9".into(), 9)]);
        assert!(view.apply(&whole(vec![b"{not json".as_slice().into()])).is_err());
        assert_eq!(ports(&view), [("w9".into(), 9)], "a bad response changes nothing");
    }
}
