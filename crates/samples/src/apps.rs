//! Request handling for the four apps.

use std::time::Instant;

use http::header::{ALLOW, HeaderName, HeaderValue, LOCATION, SET_COOKIE};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::client::{CallError, Client, Target, parse_proxy};
use crate::util::{self, Resp};
use crate::{App, PROPAGATED_HEADERS, Upstreams};

/// The header carrying the signed-in user, forwarded through the call chain.
const END_USER: &str = "end-user";
/// The cookie `POST /login` sets and productpage reads.
const USER_COOKIE: &str = "user";
/// Largest `POST /login` body read.
const MAX_FORM: usize = 16 * 1024;

/// Everything a running app needs, shared by its connections.
pub(crate) struct State {
    app: App,
    client: Client,
    details: Target,
    reviews: Target,
    ratings: Target,
    upstreams: Upstreams,
    clustername: String,
}

impl State {
    /// Validates `upstreams` for `app`.
    pub(crate) fn new(app: App, upstreams: &Upstreams) -> anyhow::Result<State> {
        let proxy = upstreams.proxy.as_deref().map(parse_proxy).transpose()?;
        let user_agent = HeaderValue::from_str(&format!("plexus-bookinfo/{app}"))
            .unwrap_or_else(|_| HeaderValue::from_static("plexus-bookinfo"));
        Ok(State {
            app,
            client: Client { proxy, user_agent },
            details: Target::parse(&upstreams.details)?,
            reviews: Target::parse(&upstreams.reviews)?,
            ratings: Target::parse(&upstreams.ratings)?,
            upstreams: upstreams.clone(),
            clustername: std::env::var("CLUSTER_NAME").unwrap_or_else(|_| "null".to_string()),
        })
    }
}

/// Handles one request to the app and logs it.
pub(crate) async fn handle(state: &State, req: Request<Incoming>) -> Resp {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = match state.app {
        App::ProductPage => productpage(state, req).await,
        App::Details => details(&req),
        App::Reviews { version } => reviews(state, version, &req).await,
        App::Ratings => ratings(&req),
    };
    tracing::debug!(
        app = %state.app,
        %method,
        %path,
        status = resp.status().as_u16(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "request"
    );
    resp
}

/// 404 for an unknown path.
fn not_found() -> Resp {
    util::json_error(StatusCode::NOT_FOUND, "not found")
}

/// 405 with the allowed methods.
fn method_not_allowed(allow: &'static str) -> Resp {
    let mut resp = util::json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    resp.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
    resp
}

fn is_get(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// `GET /health` for every app.
fn health(app: App) -> Resp {
    util::json(StatusCode::OK, &json!({ "status": format!("{} is healthy", app.service()) }))
}

/// Where a request to a JSON app (details, reviews, ratings) goes.
enum Route {
    /// `GET /health`.
    Health,
    /// `GET /{collection}/{id}`.
    Item(u32),
    /// Anything else: 404, 405 or 400 (bad id).
    Reject(Resp),
}

/// Routes `/health` and `/{collection}/{id}` for the JSON apps.
fn route_item<B>(req: &Request<B>, collection: &str) -> Route {
    let path = req.uri().path();
    let id = if path == "/health" {
        None
    } else {
        match path.strip_prefix('/').and_then(|p| p.strip_prefix(collection)).and_then(|p| p.strip_prefix('/')) {
            Some(id) if !id.contains('/') => Some(id),
            _ => return Route::Reject(not_found()),
        }
    };
    if !is_get(req.method()) {
        return Route::Reject(method_not_allowed("GET, HEAD"));
    }
    match id {
        None => Route::Health,
        Some(id) => match util::parse_id(id) {
            Some(id) => Route::Item(id),
            None => Route::Reject(util::json_error(StatusCode::BAD_REQUEST, "invalid product id")),
        },
    }
}

/// The `end-user` header and the trace headers of `inbound`, to forward upstream.
fn propagated(inbound: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in PROPAGATED_HEADERS.iter().chain(&[END_USER]) {
        for value in inbound.get_all(*name) {
            out.append(HeaderName::from_static(name), value.clone());
        }
    }
    out
}

/// Logs a failed upstream call.
fn log_failure(app: App, upstream: &str, error: &CallError) {
    tracing::warn!(%app, upstream, %error, "upstream call failed");
}

// ---------------------------------------------------------------------------------------------
// details

fn details<B>(req: &Request<B>) -> Resp {
    match route_item(req, "details") {
        Route::Reject(resp) => resp,
        Route::Health => health(App::Details),
        Route::Item(id) => util::json(StatusCode::OK, &book_details(id)),
    }
}

fn book_details(id: u32) -> Value {
    json!({
        "id": id,
        "author": "William Shakespeare",
        "year": 1595,
        "type": "paperback",
        "pages": 200,
        "publisher": "PublisherA",
        "language": "English",
        "ISBN-10": "1234567890",
        "ISBN-13": "123-1234567890",
    })
}

// ---------------------------------------------------------------------------------------------
// ratings

fn ratings<B>(req: &Request<B>) -> Resp {
    match route_item(req, "ratings") {
        Route::Reject(resp) => resp,
        Route::Health => health(App::Ratings),
        Route::Item(id) => {
            util::json(StatusCode::OK, &json!({ "id": id, "ratings": { "Reviewer1": 5, "Reviewer2": 4 } }))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// reviews

/// The reviews every version serves.
const REVIEWS: [(&str, &str); 2] = [
    ("Reviewer1", "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"),
    (
        "Reviewer2",
        "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare.",
    ),
];

/// The message reviews v2/v3 put in each review when ratings cannot be reached.
pub(crate) const RATINGS_UNAVAILABLE: &str = "Ratings service is currently unavailable";

async fn reviews<B>(state: &State, version: u8, req: &Request<B>) -> Resp {
    let id = match route_item(req, "reviews") {
        Route::Reject(resp) => return resp,
        Route::Health => return health(state.app),
        Route::Item(id) => id,
    };
    // v1 shows no ratings and never calls the ratings service.
    let ratings = if version >= 2 {
        let result = state
            .client
            .get_json(
                &state.ratings,
                &format!("/ratings/{id}"),
                &propagated(req.headers()),
                state.upstreams.ratings_timeout,
            )
            .await;
        if let Err(error) = &result {
            log_failure(state.app, "ratings", error);
        }
        Some(result.ok())
    } else {
        None
    };
    let color = if version == 3 { "red" } else { "black" };
    let reviews: Vec<Value> = REVIEWS
        .iter()
        .map(|(reviewer, text)| {
            let mut review = json!({ "reviewer": reviewer, "text": text });
            match &ratings {
                None => {}
                Some(None) => review["rating"] = json!({ "error": RATINGS_UNAVAILABLE }),
                Some(Some(body)) => {
                    if let Some(stars) = body["ratings"][reviewer].as_i64() {
                        review["rating"] = json!({ "stars": stars, "color": color });
                    }
                }
            }
            review
        })
        .collect();
    util::json(
        StatusCode::OK,
        &json!({
            "id": id,
            "podname": state.app.to_string(),
            "clustername": state.clustername,
            "reviews": reviews,
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// productpage

/// The one product of the bookstore, as `GET /api/v1/products` lists it.
fn products() -> Value {
    json!([{
        "id": 0,
        "title": crate::html::TITLE,
        "descriptionHtml": crate::html::DESCRIPTION_HTML,
    }])
}

async fn productpage(state: &State, req: Request<Incoming>) -> Resp {
    let path = req.uri().path();
    match path {
        "/" | "/index.html" | "/productpage" | "/health" | "/api/v1/products" | "/logout" => {
            if !is_get(req.method()) {
                return method_not_allowed("GET, HEAD");
            }
        }
        "/login" => {
            if req.method() != Method::POST {
                return method_not_allowed("POST");
            }
        }
        _ => return not_found(),
    }
    match path {
        "/" | "/index.html" => util::html(StatusCode::OK, crate::html::index()),
        "/health" => health(App::ProductPage),
        "/api/v1/products" => util::json(StatusCode::OK, &products()),
        "/login" => login(req).await,
        "/logout" => redirect_with_cookie(format!("{USER_COOKIE}=; Path=/; Max-Age=0")),
        _ => product_page(state, &req).await,
    }
}

/// `POST /login` (form field `username`): sets the `user` cookie and goes to the product page.
async fn login(req: Request<Incoming>) -> Resp {
    let body = match Limited::new(req.into_body(), MAX_FORM).collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => {
            return util::json_error(StatusCode::BAD_REQUEST, &format!("cannot read the form: {error}"));
        }
    };
    let form = String::from_utf8_lossy(&body);
    let user = util::form_param(&form, "username").unwrap_or_default();
    let user = user.trim();
    if user.is_empty() {
        return redirect_with_cookie(format!("{USER_COOKIE}=; Path=/; Max-Age=0"));
    }
    redirect_with_cookie(format!("{USER_COOKIE}={}; Path=/; SameSite=Lax", util::percent_encode(user)))
}

/// 303 to `/productpage` with a `Set-Cookie` header.
fn redirect_with_cookie(cookie: String) -> Resp {
    let mut resp = util::response(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    resp.headers_mut().insert(LOCATION, HeaderValue::from_static("/productpage"));
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(SET_COOKIE, cookie);
    }
    resp
}

/// `GET /productpage`: calls details and reviews concurrently and renders the page.
async fn product_page<B>(state: &State, req: &Request<B>) -> Resp {
    let mut headers = propagated(req.headers());
    if !headers.contains_key(END_USER) {
        // `?u=NAME` wins over the `user` cookie; the header itself wins over both.
        let user = req
            .uri()
            .query()
            .and_then(|q| util::form_param(q, "u"))
            .or_else(|| util::cookie(req.headers(), USER_COOKIE))
            .filter(|u| !u.trim().is_empty());
        if let Some(value) = user.and_then(|u| HeaderValue::from_bytes(u.trim().as_bytes()).ok()) {
            headers.insert(END_USER, value);
        }
    }
    let user = headers.get(END_USER).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());

    let upstreams = &state.upstreams;
    let (details, reviews) = tokio::join!(
        state.client.get_json(&state.details, "/details/0", &headers, upstreams.details_timeout),
        state.client.get_json(&state.reviews, "/reviews/0", &headers, upstreams.reviews_timeout),
    );
    let details = details.inspect_err(|e| log_failure(state.app, "details", e)).ok();
    let reviews = reviews.inspect_err(|e| log_failure(state.app, "reviews", e)).ok();
    util::html(StatusCode::OK, crate::html::product_page(user.as_deref(), details.as_ref(), reviews.as_ref()))
}
