//! The control plane's calls to a proxy's admin server: `/tap` (see [`crate::tap`]) and
//! `/config` (`GET /api/v1/proxies/{workload}/config`, what `plexus proxy-config` shows).
//!
//! One way for both (SPEC §5 Admin): the address the proxy reported when it connected, over
//! mTLS with the control plane's own certificate, the proxy's certificate verified to be the
//! identity it connected as. A proxy's admin server answers `/config` and `/tap` off loopback
//! only to that, so the CLI goes through the control plane in every mode (`--netns` included)
//! instead of dialling admin addresses itself.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::api::ApiState;
use crate::proxies::ProxyRecord;

/// How long connecting and the TLS handshake to a proxy's admin server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest `/config` answer relayed.
const MAX_CONFIG: usize = 16 * 1024 * 1024;

/// A response from a proxy's admin server; the connection lives as long as this does.
pub struct AdminResponse {
    pub response: http::Response<Incoming>,
    _conn: AbortOnDrop,
}

/// `GET path_and_query` on `proxy`'s admin server over mTLS (see the module documentation).
pub async fn get(state: &ApiState, proxy: &ProxyRecord, path_and_query: &str) -> Result<AdminResponse, String> {
    get_with(&state.serving, proxy, path_and_query).await
}

/// [`get`] with the control plane's own certificate given directly.
pub async fn get_with(
    serving: &Arc<crate::grpc_tls::ServingIdentity>,
    proxy: &ProxyRecord,
    path_and_query: &str,
) -> Result<AdminResponse, String> {
    let admin = proxy.admin_address.as_str();
    if admin.is_empty() {
        return Err(format!("proxy {} reported no admin address", proxy.workload));
    }
    let tls = serving.admin_client_config(&proxy.identity).map_err(|e| format!("TLS client config: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from("admin.plexus.internal").map_err(|e| e.to_string())?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let tcp = tokio::net::TcpStream::connect(admin).await.map_err(|e| format!("connect to {admin}: {e}"))?;
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| format!("TLS with {admin}: {e}"))
    })
    .await
    .map_err(|_| format!("{admin}: connect and TLS handshake timed out"))??;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| format!("{admin}: HTTP handshake: {e}"))?;
    let conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let req = http::Request::get(path_and_query)
        .header(header::HOST, admin)
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(req).await.map_err(|e| format!("{admin}: request: {e}"))?;
    Ok(AdminResponse { response, _conn: conn })
}

/// The connection's task, ended when its response (or a failed request) is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `proxy`'s admin `/config` (at most [`MAX_CONFIG`] bytes, within 10 s).
pub async fn config_of(serving: &Arc<crate::grpc_tls::ServingIdentity>, proxy: &ProxyRecord) -> Result<Bytes, String> {
    let fetched = async {
        let answer = get_with(serving, proxy, "/config").await?;
        let status = answer.response.status();
        if !status.is_success() {
            return Err(format!("the admin server of {} answered {status}", proxy.workload));
        }
        let body = http_body_util::Limited::new(answer.response.into_body(), MAX_CONFIG)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        Ok(body.to_bytes())
    };
    tokio::time::timeout(Duration::from_secs(10), fetched)
        .await
        .map_err(|_| format!("the admin server of {} did not answer within 10s", proxy.workload))?
}

#[derive(serde::Deserialize)]
pub struct ConfigQuery {
    namespace: Option<String>,
}

/// `GET /api/v1/proxies/{workload}/config[?namespace=N]`: the `/config` of the connected proxy
/// of that workload (or gateway), relayed as the proxy answered it. 404 when no such proxy is
/// connected; 502 when its admin server cannot be reached.
pub async fn config(
    State(s): State<Arc<ApiState>>,
    Path(workload): Path<String>,
    Query(q): Query<ConfigQuery>,
) -> Response {
    let failure = |status: StatusCode, message: String| (status, Json(serde_json::json!({ "error": message })));
    let proxies = s.proxies.list();
    let Some(proxy) = proxies
        .iter()
        .rev()
        .find(|p| p.workload == workload && q.namespace.as_deref().is_none_or(|n| n == p.namespace))
    else {
        return failure(StatusCode::NOT_FOUND, format!("no connected proxy for workload {workload:?}")).into_response();
    };
    let fetched = async {
        let answer = get(&s, proxy, "/config").await?;
        let status = answer.response.status();
        let body = http_body_util::Limited::new(answer.response.into_body(), MAX_CONFIG)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    match tokio::time::timeout(Duration::from_secs(10), fetched).await {
        Ok(Ok((status, body))) if status.is_success() => {
            let mut resp = body.into_response();
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        Ok(Ok((status, _))) => failure(
            StatusCode::BAD_GATEWAY,
            format!("the admin server of {workload} ({}) answered {status}", proxy.admin_address),
        )
        .into_response(),
        Ok(Err(e)) => failure(StatusCode::BAD_GATEWAY, format!("cannot reach the admin server of {workload}: {e}"))
            .into_response(),
        Err(_) => failure(
            StatusCode::GATEWAY_TIMEOUT,
            format!("the admin server of {workload} ({}) did not answer within 10s", proxy.admin_address),
        )
        .into_response(),
    }
}
