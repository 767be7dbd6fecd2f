//! The web dashboard (SPEC §7) the control plane serves at its HTTP port: one HTML shell for
//! every page path, and the stylesheet, scripts and icon under `/assets/`, all compiled into
//! the binary (no build step, nothing fetched from elsewhere).
//!
//! The pages are a small single-page application in plain JavaScript modules
//! (`crates/control/assets/`) that read the JSON API (`/api/v1/...`) and poll it every two
//! seconds; charts and the topology graph are hand-written SVG. Every page path answers the
//! same shell, so each can be loaded directly; the script picks the page from the path.

use std::sync::Arc;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::api::ApiState;

/// The page paths (SPEC §7), all answered with the shell.
pub const PAGES: [&str; 9] =
    ["/", "/topology", "/services", "/workloads", "/routes", "/policies", "/tap", "/certificates", "/performance"];

/// The HTML shell every page path answers.
const SHELL: &str = include_str!("../../assets/index.html");

/// What pages may load and reach: only this origin. Inline scripts and styles are refused
/// too, so a page that tried anything else would fail loudly in the browser's console.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file under `/assets/`.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $type:expr) => {
        Asset { path: $path, content_type: $type, body: include_bytes!(concat!("../../assets/", $path)) }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file the pages load. A module imported by a script must be listed here (a test
/// checks that every import resolves).
static ASSETS: &[Asset] = &[
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("js/app.js", JS),
    asset!("js/api.js", JS),
    asset!("js/dom.js", JS),
    asset!("js/format.js", JS),
    asset!("js/chart.js", JS),
    asset!("js/layout.js", JS),
    asset!("js/resources.js", JS),
    asset!("js/pages/overview.js", JS),
    asset!("js/pages/topology.js", JS),
    asset!("js/pages/metrics.js", JS),
    asset!("js/pages/routes.js", JS),
    asset!("js/pages/policies.js", JS),
    asset!("js/pages/tap.js", JS),
    asset!("js/pages/certificates.js", JS),
    asset!("js/pages/performance.js", JS),
];

/// The dashboard's routes, to merge into the API router ([`crate::api::router`]).
pub fn router() -> Router<Arc<ApiState>> {
    let mut router = Router::new();
    for path in PAGES {
        router = router.route(path, get(page));
    }
    router.route("/assets/{*file}", get(asset))
}

/// A strong validator for `body`: FNV-1a, enough to tell versions of one file apart.
fn etag(body: &[u8]) -> String {
    let hash = body.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    format!("\"{hash:016x}\"")
}

/// Answers `body`, or 304 when the browser's copy (`If-None-Match`) is current. Files are
/// revalidated on every use (`no-cache`), so a new binary's dashboard shows at once.
fn cached(request: &HeaderMap, content_type: &'static str, body: &'static [u8]) -> Response {
    let tag = etag(body);
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"));
    let mut response = if fresh { StatusCode::NOT_MODIFIED.into_response() } else { body.into_response() };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if let Ok(v) = HeaderValue::from_str(&tag) {
        headers.insert(header::ETAG, v);
    }
    response
}

/// Any page path: the shell.
async fn page(request: HeaderMap) -> Response {
    let mut response = cached(&request, "text/html; charset=utf-8", SHELL.as_bytes());
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// `/assets/FILE`.
async fn asset(Path(file): Path<String>, request: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.path == file) {
        Some(a) => cached(&request, a.content_type, a.body),
        None => (StatusCode::NOT_FOUND, format!("no asset {file:?}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_asset(file: &str, if_none_match: Option<&str>) -> Response {
        let mut headers = HeaderMap::new();
        if let Some(t) = if_none_match {
            headers.insert(header::IF_NONE_MATCH, HeaderValue::from_str(t).expect("header value"));
        }
        asset(Path(file.to_string()), headers).await
    }

    async fn body_text(r: Response) -> String {
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 22).await.expect("body");
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    }

    #[tokio::test]
    async fn assets_have_types_and_validators() {
        let r = get_asset("js/app.js", None).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], JS);
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-cache");
        let tag = r.headers()[header::ETAG].to_str().expect("etag").to_string();
        assert!(body_text(r).await.contains("import"));
        let again = get_asset("js/app.js", Some(&tag)).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(get_asset("app.css", None).await.headers()[header::CONTENT_TYPE], "text/css; charset=utf-8");
        assert_eq!(get_asset("../Cargo.toml", None).await.status(), StatusCode::NOT_FOUND);
        assert_eq!(get_asset("js/missing.js", None).await.status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn pages_answer_the_shell_with_a_strict_policy() {
        let r = page(HeaderMap::new()).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY].to_str().expect("csp");
        assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"), "{csp}");
        let html = body_text(r).await;
        assert!(html.contains("/assets/js/app.js") && html.contains("/assets/app.css"));
    }

    /// Every `/assets/...` a file names (module imports, the shell's links) is embedded, every
    /// embedded file is used, and nothing names another host.
    #[test]
    fn every_referenced_asset_is_embedded_and_local() {
        let mut texts: Vec<(&str, &str)> = vec![("index.html", SHELL)];
        for a in ASSETS {
            if a.content_type.starts_with("text/") {
                texts.push((a.path, std::str::from_utf8(a.body).expect("utf-8 asset")));
            }
        }
        let mut referenced = std::collections::BTreeSet::new();
        for (name, text) in texts {
            for (i, _) in text.match_indices("/assets/") {
                let rest = &text[i + "/assets/".len()..];
                let end =
                    rest.find(|c: char| c == '\'' || c == '"' || c == '`' || c.is_whitespace()).unwrap_or(rest.len());
                let path = &rest[..end];
                if path.is_empty() || path.contains('$') {
                    continue;
                }
                assert!(
                    ASSETS.iter().any(|a| a.path == path),
                    "{name} references /assets/{path}, which is not embedded"
                );
                referenced.insert(path.to_string());
            }
            for scheme in ["http://", "https://", "//cdn", "wss://"] {
                let outside = text.match_indices(scheme).any(|(i, _)| {
                    // The SVG namespace is a name, not a request.
                    !text[i..].starts_with("http://www.w3.org/")
                });
                assert!(!outside, "{name} names an outside URL ({scheme})");
            }
        }
        for a in ASSETS {
            assert!(referenced.contains(a.path), "/assets/{} is embedded but nothing loads it", a.path);
        }
    }
}
