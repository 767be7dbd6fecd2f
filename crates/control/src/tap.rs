//! `GET /api/v1/tap`: the live requests of the proxies a target names, merged into one
//! stream of JSON lines ([`plexus_core::tap::TapEvent`]).
//!
//! The control plane opens each selected proxy's admin `/tap` (the address the proxy reported
//! when it connected, the one Prometheus scrapes) with the same filter, and forwards every
//! line as it arrives. Proxies that connect later are picked up within a second; a proxy
//! that goes away just stops contributing. When the client goes, every proxy stream is
//! closed, so the proxies stop describing requests.
//!
//! Like Linkerd's tap, this reaches the proxies' admin listeners ([`crate::proxy_admin`]): they
//! must be reachable from the control plane (loopback in universal mode, the namespace's
//! address with `--netns`).

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use plexus_core::tap::{FILTER_PARAMS, TapFilter, TapTarget};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;

use crate::api::ApiState;
use crate::proxies::ProxyRecord;

/// How often the proxies a target names are looked up again.
const RESCAN: Duration = Duration::from_secs(1);

/// The longest line forwarded from a proxy (a longer one is dropped).
const MAX_LINE: usize = 64 * 1024;

/// `GET /api/v1/tap?target=service/NAME|workload/NAME|namespace/NAME|all&namespace=N&max=N`
/// plus the filter parameters of [`TapFilter`]; no token needed (it is a read, as the
/// dashboard's tap page is).
pub async fn tap(State(s): State<Arc<ApiState>>, Query(params): Query<Vec<(String, String)>>) -> Response {
    let request = match TapRequest::parse(&params) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, axum::Json(serde_json::json!({ "error": e }))).into_response(),
    };
    let selected = request.selected(&s.proxies.list()).len();
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    tokio::spawn(merge(s, request, tx));
    let mut resp = Body::from_stream(ReceiverStream::new(rx)).into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("x-plexus-tap-proxies", HeaderValue::from(selected));
    resp
}

/// A parsed tap request.
struct TapRequest {
    target: TapTarget,
    namespace: Option<String>,
    max: Option<u64>,
    /// The query sent on to each proxy (the filter, re-encoded).
    proxy_query: String,
}

impl TapRequest {
    fn parse(params: &[(String, String)]) -> Result<TapRequest, String> {
        let mut target = None;
        let mut namespace = None;
        let mut max = None;
        for (k, v) in params {
            match k.as_str() {
                "target" => target = Some(TapTarget::parse(v)?),
                "namespace" if !v.is_empty() => namespace = Some(v.clone()),
                "namespace" => {}
                "max" => match v.parse::<u64>() {
                    Ok(n) if n > 0 => max = Some(n),
                    _ => return Err(format!("max: a positive number of events, got {v:?}")),
                },
                k if FILTER_PARAMS.contains(&k) => {}
                other => return Err(format!("unknown parameter {other:?}")),
            }
        }
        let filter = TapFilter::from_pairs(params.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
        let proxy_query = form_urlencoded::Serializer::new(String::new()).extend_pairs(filter.to_pairs()).finish();
        Ok(TapRequest { target: target.unwrap_or(TapTarget::All), namespace, max, proxy_query })
    }

    fn selects(&self, p: &ProxyRecord) -> bool {
        !p.admin_address.is_empty()
            && self.namespace.as_deref().is_none_or(|n| n == p.namespace)
            && self.target.selects(&p.workload, &p.service, &p.namespace)
    }

    fn selected<'a>(&self, proxies: &'a [ProxyRecord]) -> Vec<&'a ProxyRecord> {
        proxies.iter().filter(|p| self.selects(p)).collect()
    }
}

/// Streams the selected proxies' lines into `out` until the client goes or `max` were sent.
async fn merge(s: Arc<ApiState>, request: TapRequest, out: mpsc::Sender<Result<Bytes, Infallible>>) {
    let (lines_tx, mut lines) = mpsc::channel::<Bytes>(256);
    let mut streams: JoinSet<u64> = JoinSet::new();
    let mut tapped: HashSet<u64> = HashSet::new();
    let mut rescan = tokio::time::interval(RESCAN);
    let mut sent = 0u64;
    loop {
        tokio::select! {
            _ = rescan.tick() => {
                for p in request.selected(&s.proxies.list()) {
                    if tapped.insert(p.id) {
                        let (id, proxy, query, tx) = (p.id, p.clone(), request.proxy_query.clone(), lines_tx.clone());
                        let s = s.clone();
                        streams.spawn(async move {
                            if let Err(e) = stream_from(&s, &proxy, &query, tx).await {
                                tracing::debug!(admin = %proxy.admin_address, error = %e, "tap stream from a proxy ended");
                            }
                            id
                        });
                    }
                }
            }
            Some(done) = streams.join_next() => {
                if let Ok(id) = done {
                    tapped.remove(&id);
                }
            }
            Some(line) = lines.recv() => {
                if out.send(Ok(line)).await.is_err() {
                    return;
                }
                sent += 1;
                if request.max.is_some_and(|m| sent >= m) {
                    return;
                }
            }
            _ = out.closed() => return,
        }
    }
    // Leaving drops `streams`, which aborts every proxy stream.
}

/// Reads one proxy's `/tap` ([`crate::proxy_admin::get`]: over mTLS, the proxy's certificate
/// verified to be the identity it connected as) and sends each complete line to `out`.
async fn stream_from(s: &ApiState, proxy: &ProxyRecord, query: &str, out: mpsc::Sender<Bytes>) -> Result<(), String> {
    // The connection lives as long as `answer`'s rest, to the end of this function.
    let answer = crate::proxy_admin::get(s, proxy, &format!("/tap?{query}")).await?;
    if !answer.response.status().is_success() {
        return Err(format!("status {}", answer.response.status()));
    }
    let mut body = answer.response.into_body();
    let mut pending = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        let Some(data) = frame.data_ref() else { continue };
        pending.extend_from_slice(data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line = pending.split_to(end + 1).freeze();
            if out.send(line).await.is_err() {
                return Ok(());
            }
        }
        if pending.len() > MAX_LINE {
            pending.clear();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn proxy(id: u64, workload: &str, service: &str, admin: &str) -> ProxyRecord {
        ProxyRecord {
            identity: String::new(),
            id,
            workload: workload.into(),
            namespace: "default".into(),
            service: service.into(),
            version: String::new(),
            mode: "sidecar".into(),
            admin_address: admin.into(),
            sent_revision: 0,
            applied_revision: 0,
            last_seen: None,
            registered: None,
        }
    }

    #[test]
    fn targets_select_proxies_with_an_admin_address() {
        let r = TapRequest::parse(&params(&[("target", "service/reviews"), ("status", "5xx")])).expect("valid");
        assert_eq!(r.proxy_query, "status=5xx");
        let proxies = [
            proxy(1, "reviews-v1", "reviews", "127.0.0.1:1"),
            proxy(2, "reviews-v2", "reviews", ""),
            proxy(3, "ratings-v1", "ratings", "127.0.0.1:3"),
        ];
        let ids: Vec<u64> = r.selected(&proxies).iter().map(|p| p.id).collect();
        assert_eq!(ids, [1]);
        let all = TapRequest::parse(&[]).expect("valid");
        assert_eq!(all.selected(&proxies).len(), 2);
    }

    #[test]
    fn bad_requests_say_why() {
        for (pairs, says) in [
            (vec![("target", "pod/x")], "target"),
            (vec![("max", "-1")], "max"),
            (vec![("status", "7xx")], "status"),
            (vec![("colour", "red")], "unknown parameter"),
        ] {
            let e = TapRequest::parse(&params(&pairs)).err().expect("invalid");
            assert!(e.contains(says), "{e}");
        }
    }
}
