//! The admin server (SPEC §5): `/ready`, `/live`, `/metrics`, `/config`, `/tap` (JSON lines,
//! see [`crate::tap`]), `POST /shutdown`.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::http::body::{self, Body};
use crate::proxy::State;

/// Serves the admin endpoints until aborted.
pub async fn serve(state: Arc<State>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn text(status: StatusCode, content_type: &'static str, body_text: String) -> Response<Body> {
    let mut r = Response::new(body::full(body_text));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r
}

fn route(state: &Arc<State>, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "text/plain", "live\n".into()),
        (&Method::GET, "/ready") if state.draining() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n".into())
        }
        (&Method::GET, "/ready") => text(StatusCode::OK, "text/plain", "ready\n".into()),
        (&Method::GET, "/metrics") => {
            refresh_gauges(state);
            // OpenMetrics for scrapers that ask for it (Prometheus does), else the classic format.
            let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
            if accept.contains("application/openmetrics-text") {
                text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    state.metrics.encode(),
                )
            } else {
                text(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", state.metrics.encode_classic())
            }
        }
        (&Method::GET, "/config") => {
            let snapshot = state.discovery.current();
            let config = serde_json::json!({
                "version": snapshot.version,
                "generation": state.discovery.generation(),
                "controlPlaneConnected": state.discovery.control_plane_connected(),
                "settings": state.settings,
                "services": snapshot.services.values().collect::<Vec<_>>(),
                "certificate": state.settings.identity.as_ref().and_then(|i| i.info()),
            });
            text(StatusCode::OK, "application/json", format!("{config:#}\n"))
        }
        (&Method::GET, "/tap") => state.tap.serve(req.uri().query()),
        (&Method::POST, "/shutdown") => {
            state.start_drain();
            text(StatusCode::ACCEPTED, "text/plain", "draining\n".into())
        }
        (_, "/live" | "/ready" | "/metrics" | "/config" | "/tap" | "/shutdown") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "method not allowed\n".into())
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /ready, /live, /metrics, /config, /tap, POST /shutdown\n".into(),
        ),
    }
}

/// Gauges computed at scrape time from the current snapshot and balancer.
fn refresh_gauges(state: &Arc<State>) {
    let m = &state.metrics;
    m.config_version.set(state.discovery.generation() as i64);
    m.control_plane_connected.set(i64::from(state.discovery.control_plane_connected()));
    m.update_trace_spans(crate::trace::export::stats());
    let snapshot = state.discovery.current();
    m.balancer_endpoints.clear();
    for service in snapshot.services.values() {
        let endpoints: Vec<_> = service.ports.iter().flat_map(|p| p.endpoints.iter().cloned()).collect();
        let ejected = state.balancer.ejected_count(&endpoints);
        let labels = |s: &str| crate::metrics::EndpointStateLabels {
            destination_service: service.name.name.clone(),
            state: s.into(),
        };
        m.balancer_endpoints.get_or_create(&labels("ready")).set((endpoints.len() - ejected) as i64);
        m.balancer_endpoints.get_or_create(&labels("ejected")).set(ejected as i64);
    }
}
