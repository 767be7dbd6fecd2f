//! The Bookinfo sample applications (SPEC §9), written in Rust.
//!
//! Four services, each served by [`serve`] on a listener the caller provides:
//!
//! * `productpage` (v1): `GET /productpage` renders an HTML page from `details` and `reviews`;
//!   also `GET /`, `GET /health`, `GET /api/v1/products`, `POST /login`, `GET /logout`.
//! * `details` (v1): `GET /details/{id}` and `GET /health`.
//! * `reviews` v1 / v2 / v3: `GET /reviews/{id}` and `GET /health`; v2 and v3 call `ratings`.
//! * `ratings` (v1): `GET /ratings/{id}` and `GET /health`.
//!
//! Upstreams are addressed by service name and service port ([`SERVICE_PORT`]), e.g.
//! `http://details:9080`. When `http_proxy` / `HTTP_PROXY` is set ([`Upstreams::from_env`]),
//! every upstream call goes to that proxy in absolute form (explicit-mode sidecars); otherwise the
//! name is resolved with DNS and called directly (transparent mode).
//!
//! productpage forwards the `end-user` header and the trace headers ([`PROPAGATED_HEADERS`]) it
//! receives to its upstream calls, and reviews forwards them to ratings.

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

mod apps;
mod client;
mod html;
mod util;

/// The port every Bookinfo Service exposes (a service port, not the apps' listening port).
pub const SERVICE_PORT: u16 = 9080;

/// The default timeout of each upstream call (productpage → details, productpage → reviews,
/// reviews → ratings). Mesh route timeouts are shorter and win.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Request headers forwarded unchanged from an app's inbound request to its upstream calls
/// (besides `end-user`): request id and trace context (W3C and B3).
pub const PROPAGATED_HEADERS: &[&str] = &[
    "x-request-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// One of the Bookinfo applications.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum App {
    /// `productpage` v1: the HTML front end.
    ProductPage,
    /// `details` v1: book details.
    Details,
    /// `reviews` v1 (no ratings), v2 (black stars) or v3 (red stars).
    Reviews {
        /// 1, 2 or 3.
        version: u8,
    },
    /// `ratings` v1: star ratings.
    Ratings,
}

/// Error for an unknown app name or reviews version.
#[derive(Debug, thiserror::Error)]
#[error("unknown Bookinfo app {0:?}: expected productpage, details, reviews-v1, reviews-v2, reviews-v3 or ratings")]
pub struct ParseAppError(String);

impl App {
    /// The app for a service name and optional version, as given to `plexus run --service S
    /// --version V`: `("reviews", Some("v2"))` (or `"2"`) is reviews v2; the other services
    /// accept no version or `v1`.
    pub fn from_service(service: &str, version: Option<&str>) -> Result<App, ParseAppError> {
        let err = || {
            ParseAppError(match version {
                Some(v) => format!("{service} {v}"),
                None => service.to_string(),
            })
        };
        let number = match version {
            None => None,
            Some(v) => {
                let digits = v.strip_prefix('v').unwrap_or(v);
                Some(util::parse_id(digits).and_then(|n| u8::try_from(n).ok()).ok_or_else(err)?)
            }
        };
        let app = match (service, number) {
            ("productpage", None | Some(1)) => App::ProductPage,
            ("details", None | Some(1)) => App::Details,
            ("ratings", None | Some(1)) => App::Ratings,
            ("reviews", Some(version @ 1..=3)) => App::Reviews { version },
            _ => return Err(err()),
        };
        Ok(app)
    }

    /// The Service this app belongs to: `productpage`, `details`, `reviews` or `ratings`.
    pub fn service(&self) -> &'static str {
        match self {
            App::ProductPage => "productpage",
            App::Details => "details",
            App::Reviews { .. } => "reviews",
            App::Ratings => "ratings",
        }
    }

    /// The app's version label: `v1`, `v2` or `v3`.
    pub fn version(&self) -> String {
        match self {
            App::Reviews { version } => format!("v{version}"),
            _ => "v1".to_string(),
        }
    }
}

/// `productpage`, `details`, `reviews-vN` or `ratings`.
impl fmt::Display for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            App::Reviews { version } => write!(f, "reviews-v{version}"),
            other => f.write_str(other.service()),
        }
    }
}

/// Parses `productpage`, `details`, `reviews-v1`, `reviews-v2`, `reviews-v3` or `ratings`.
impl FromStr for App {
    type Err = ParseAppError;

    fn from_str(s: &str) -> Result<App, ParseAppError> {
        let app = match s.split_once("-v") {
            Some(("reviews", version)) => App::from_service("reviews", Some(version)),
            _ => App::from_service(s, None),
        };
        app.map_err(|_| ParseAppError(s.to_string()))
    }
}

/// Where the apps send their upstream calls, and how long they wait for them.
///
/// Base URLs are `http://HOST[:PORT][/PREFIX]`; the request path (`/details/0`) is appended.
/// Override single fields with struct update syntax:
/// `Upstreams { details: "http://127.0.0.1:4000".into(), ..Upstreams::direct() }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstreams {
    /// Base URL of `details` (default `http://details:9080`).
    pub details: String,
    /// Base URL of `reviews` (default `http://reviews:9080`).
    pub reviews: String,
    /// Base URL of `ratings` (default `http://ratings:9080`).
    pub ratings: String,
    /// HTTP proxy (`http://HOST:PORT` or `HOST:PORT`) that receives every upstream call in
    /// absolute form; `None` connects to the upstream directly.
    pub proxy: Option<String>,
    /// Timeout of productpage → details (connect, request and response body).
    pub details_timeout: Duration,
    /// Timeout of productpage → reviews.
    pub reviews_timeout: Duration,
    /// Timeout of reviews → ratings.
    pub ratings_timeout: Duration,
}

impl Upstreams {
    /// Defaults with no proxy: `http://NAME:9080` for each service, 10 s timeouts.
    pub fn direct() -> Upstreams {
        let base = |name: &str| format!("http://{name}:{SERVICE_PORT}");
        Upstreams {
            details: base("details"),
            reviews: base("reviews"),
            ratings: base("ratings"),
            proxy: None,
            details_timeout: DEFAULT_TIMEOUT,
            reviews_timeout: DEFAULT_TIMEOUT,
            ratings_timeout: DEFAULT_TIMEOUT,
        }
    }

    /// [`Upstreams::direct`] with the proxy taken from `http_proxy` or else `HTTP_PROXY`
    /// (ignored when empty), as `plexus run` sets them in explicit mode.
    pub fn from_env() -> Upstreams {
        Upstreams { proxy: client::proxy_from_env(), ..Upstreams::direct() }
    }
}

/// Same as [`Upstreams::from_env`].
impl Default for Upstreams {
    fn default() -> Upstreams {
        Upstreams::from_env()
    }
}

/// Serves `app` on `listener` (HTTP/1.1 with keep-alive) until the returned future is dropped,
/// which also closes the connections it accepted.
///
/// Fails at once if `upstreams` holds an invalid URL or `app` an unknown reviews version;
/// otherwise it never returns (accept errors are logged and retried).
pub async fn serve(app: App, listener: TcpListener, upstreams: Upstreams) -> anyhow::Result<()> {
    serve_until(app, listener, upstreams, std::future::pending()).await
}

/// Like [`serve`], until `shutdown` completes; then it stops accepting, lets every request in
/// flight finish (idle keep-alive connections are closed, busy ones after their response) and
/// returns once all connections are closed. Callers bound the drain with a timeout (dropping
/// the future closes what is left).
pub async fn serve_until(
    app: App,
    listener: TcpListener,
    upstreams: Upstreams,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    if let App::Reviews { version } = app {
        anyhow::ensure!((1..=3).contains(&version), "reviews version must be 1, 2 or 3, not {version}");
    }
    let state = Arc::new(apps::State::new(app, &upstreams)?);
    let local = listener.local_addr().context("listener address")?;
    tracing::info!(%app, %local, proxy = ?upstreams.proxy, "bookinfo app listening");

    let graceful = GracefulShutdown::new();
    // Dropping the JoinSet (when this future is dropped) aborts every connection task.
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let state = state.clone();
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(apps::handle(&state, req).await) }
                    });
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service);
                    let conn = graceful.watch(conn);
                    connections.spawn(async move {
                        if let Err(error) = conn.await {
                            tracing::debug!(%peer, %error, "connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    // EMFILE, ECONNABORTED, ...: transient; back off briefly.
                    tracing::warn!(%app, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!(%app, in_flight = connections.len(), "stopping: finishing the requests in flight");
    graceful.shutdown().await;
    while connections.join_next().await.is_some() {}
    tracing::info!(%app, "stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names_round_trip() {
        for name in ["productpage", "details", "reviews-v1", "reviews-v2", "reviews-v3", "ratings"] {
            let app: App = name.parse().expect(name);
            assert_eq!(app.to_string(), name);
        }
        assert_eq!("reviews-v2".parse::<App>().ok(), Some(App::Reviews { version: 2 }));
        for bad in ["reviews", "reviews-v4", "reviews-v0", "details-v2", "x", ""] {
            assert!(bad.parse::<App>().is_err(), "{bad}");
        }
    }

    #[test]
    fn app_from_service_and_version() {
        let ok = |s, v| App::from_service(s, v).ok();
        assert_eq!(ok("reviews", Some("v3")), Some(App::Reviews { version: 3 }));
        assert_eq!(ok("reviews", Some("1")), Some(App::Reviews { version: 1 }));
        assert_eq!(ok("reviews", None), None);
        assert_eq!(ok("productpage", Some("v1")), Some(App::ProductPage));
        assert_eq!(ok("ratings", None), Some(App::Ratings));
        assert_eq!(ok("ratings", Some("v2")), None);
        assert_eq!(App::Reviews { version: 2 }.service(), "reviews");
        assert_eq!(App::Reviews { version: 2 }.version(), "v2");
        assert_eq!(App::Details.version(), "v1");
    }

    #[test]
    fn default_upstreams() {
        let u = Upstreams::direct();
        assert_eq!(u.details, "http://details:9080");
        assert_eq!(u.reviews, "http://reviews:9080");
        assert_eq!(u.ratings, "http://ratings:9080");
        assert_eq!(u.proxy, None);
        assert_eq!(u.ratings_timeout, Duration::from_secs(10));
    }
}
