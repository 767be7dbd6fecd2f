//! End-to-end tests of the Bookinfo apps, served in-process on ephemeral loopback ports.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use plexus_samples::{App, Upstreams, serve};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Aborts a spawned server when the test ends.
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    (listener, addr)
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// Upstreams with no proxy (whatever the test environment says) and short timeouts.
fn upstreams() -> Upstreams {
    Upstreams {
        details_timeout: Duration::from_secs(3),
        reviews_timeout: Duration::from_secs(3),
        ratings_timeout: Duration::from_secs(3),
        ..Upstreams::direct()
    }
}

/// Starts `app` and returns its address.
async fn start(app: App, upstreams: Upstreams) -> (SocketAddr, Task) {
    let (listener, addr) = bind().await;
    let task = tokio::spawn(async move {
        if let Err(error) = serve(app, listener, upstreams).await {
            panic!("serve {app}: {error:#}");
        }
    });
    (addr, Task(task))
}

/// A loopback URL where nothing listens.
async fn dead_url() -> String {
    let (listener, addr) = bind().await;
    drop(listener);
    url(addr)
}

/// One GET over a fresh connection: status, headers and body.
async fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, String) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    let conn = Task(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let mut req = Request::get(path).header("host", "productpage:9080");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = sender.send_request(req.body(Empty::<Bytes>::new()).expect("request")).await.expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    drop(conn);
    (parts.status, parts.headers, String::from_utf8(body.to_vec()).expect("utf-8 body"))
}

async fn get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let (status, _, body) = get_with(addr, path, &[]).await;
    (status, body)
}

/// A test upstream that records each request and answers with a fixed status and body after
/// an optional delay.
#[derive(Clone)]
struct Capture {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<(String, HeaderMap)>>>,
}

impl Capture {
    async fn start(status: StatusCode, body: &'static str, delay: Duration) -> (Capture, Task) {
        let (listener, addr) = bind().await;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let recorded = recorded.clone();
                        async move {
                            recorded.lock().expect("lock").push((req.uri().to_string(), req.headers().clone()));
                            tokio::time::sleep(delay).await;
                            let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                            *resp.status_mut() = status;
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (Capture { addr, requests }, Task(task))
    }

    fn url(&self) -> String {
        url(self.addr)
    }

    fn requests(&self) -> Vec<(String, HeaderMap)> {
        self.requests.lock().expect("lock").clone()
    }
}

const RATINGS_BODY: &str = r#"{"id":0,"ratings":{"Reviewer1":5,"Reviewer2":4}}"#;

/// productpage + details + reviews (`version`) + the given ratings base URL.
struct Bookinfo {
    productpage: SocketAddr,
    _tasks: Vec<Task>,
}

impl Bookinfo {
    async fn start(version: u8, ratings: String) -> Bookinfo {
        let (details, details_task) = start(App::Details, upstreams()).await;
        let (reviews, reviews_task) = start(App::Reviews { version }, Upstreams { ratings, ..upstreams() }).await;
        Bookinfo::with_upstreams(url(details), url(reviews), vec![details_task, reviews_task]).await
    }

    async fn with_upstreams(details: String, reviews: String, mut tasks: Vec<Task>) -> Bookinfo {
        let (productpage, task) = start(App::ProductPage, Upstreams { details, reviews, ..upstreams() }).await;
        tasks.push(task);
        Bookinfo { productpage, _tasks: tasks }
    }

    async fn page(&self) -> String {
        let (status, body) = get(self.productpage, "/productpage").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }
}

/// A real ratings service.
async fn ratings() -> (String, Task) {
    let (addr, task) = start(App::Ratings, upstreams()).await;
    (url(addr), task)
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

fn assert_details_ok(page: &str) {
    assert!(page.contains("PublisherA"), "{page}");
    assert!(page.contains("123-1234567890"), "{page}");
    assert!(!page.contains("Error fetching product details"), "{page}");
}

#[tokio::test]
async fn reviews_v1_page_has_no_stars_and_never_calls_ratings() {
    let (ratings, _ratings) = Capture::start(StatusCode::OK, RATINGS_BODY, Duration::ZERO).await;
    let bookinfo = Bookinfo::start(1, ratings.url()).await;
    let page = bookinfo.page().await;
    assert!(page.contains("Reviews served by: reviews-v1\n"), "{page}");
    assert!(!page.contains("stars:"), "{page}");
    assert!(!page.contains("Ratings service is currently unavailable"));
    assert!(page.contains("An extremely entertaining play by Shakespeare."));
    assert_details_ok(&page);
    assert!(ratings.requests().is_empty(), "reviews v1 called ratings");
}

#[tokio::test]
async fn reviews_v2_page_has_black_stars() {
    let (ratings, _ratings) = ratings().await;
    let page = Bookinfo::start(2, ratings).await.page().await;
    assert!(page.contains("Reviews served by: reviews-v2\n"), "{page}");
    assert_eq!(count(&page, "stars: black"), 2, "{page}");
    assert_eq!(count(&page, "stars: red"), 0, "{page}");
    assert!(page.contains("★★★★★"), "{page}");
    assert!(page.contains("★★★★☆"), "{page}");
    assert!(!page.contains("Ratings service is currently unavailable"));
    assert_details_ok(&page);
}

#[tokio::test]
async fn reviews_v3_page_has_red_stars() {
    let (ratings, _ratings) = ratings().await;
    let page = Bookinfo::start(3, ratings).await.page().await;
    assert!(page.contains("Reviews served by: reviews-v3\n"), "{page}");
    assert_eq!(count(&page, "stars: red"), 2, "{page}");
    assert_eq!(count(&page, "stars: black"), 0, "{page}");
    assert_details_ok(&page);
}

#[tokio::test]
async fn ratings_down_shows_ratings_unavailable() {
    let page = Bookinfo::start(3, dead_url().await).await.page().await;
    assert!(page.contains("Reviews served by: reviews-v3\n"), "{page}");
    assert!(page.contains("\nRatings service is currently unavailable\n"), "{page}");
    assert!(!page.contains("stars:"), "{page}");
    assert!(!page.contains("Sorry, product reviews are currently unavailable"));
}

#[tokio::test]
async fn ratings_error_status_and_slow_ratings_count_as_unavailable() {
    let (failing, _f) = Capture::start(StatusCode::SERVICE_UNAVAILABLE, "fault filter abort", Duration::ZERO).await;
    let page = Bookinfo::start(2, failing.url()).await.page().await;
    assert!(page.contains("Ratings service is currently unavailable"), "{page}");
    assert_eq!(failing.requests().len(), 1);

    // ratings slower than reviews' ratings timeout: the page still comes, from reviews.
    let (slow, _s) = Capture::start(StatusCode::OK, RATINGS_BODY, Duration::from_secs(5)).await;
    let (details, details_task) = start(App::Details, upstreams()).await;
    let (reviews, reviews_task) = start(
        App::Reviews { version: 2 },
        Upstreams { ratings: slow.url(), ratings_timeout: Duration::from_millis(300), ..upstreams() },
    )
    .await;
    let bookinfo = Bookinfo::with_upstreams(url(details), url(reviews), vec![details_task, reviews_task]).await;
    let started = Instant::now();
    let page = bookinfo.page().await;
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert!(page.contains("Reviews served by: reviews-v2"), "{page}");
    assert!(page.contains("Ratings service is currently unavailable"), "{page}");
}

#[tokio::test]
async fn reviews_down_shows_reviews_unavailable() {
    let (details, details_task) = start(App::Details, upstreams()).await;
    let bookinfo = Bookinfo::with_upstreams(url(details), dead_url().await, vec![details_task]).await;
    let page = bookinfo.page().await;
    assert!(page.contains("\nSorry, product reviews are currently unavailable\n"), "{page}");
    assert!(!page.contains("Reviews served by:"), "{page}");
    assert_details_ok(&page);
}

#[tokio::test]
async fn reviews_error_status_counts_as_failure() {
    let (details, details_task) = start(App::Details, upstreams()).await;
    let (reviews, _r) = Capture::start(
        StatusCode::INTERNAL_SERVER_ERROR,
        r#"{"id":0,"podname":"reviews-v9","reviews":[]}"#,
        Duration::ZERO,
    )
    .await;
    let bookinfo = Bookinfo::with_upstreams(url(details), reviews.url(), vec![details_task]).await;
    let page = bookinfo.page().await;
    assert!(page.contains("Sorry, product reviews are currently unavailable"), "{page}");
    assert!(!page.contains("reviews-v9"), "{page}");
}

#[tokio::test]
async fn reviews_slower_than_the_timeout_counts_as_failure() {
    let (details, details_task) = start(App::Details, upstreams()).await;
    let (slow, _s) =
        Capture::start(StatusCode::OK, r#"{"id":0,"podname":"reviews-v1","reviews":[]}"#, Duration::from_secs(5)).await;
    let (productpage, _p) = start(
        App::ProductPage,
        Upstreams {
            details: url(details),
            reviews: slow.url(),
            reviews_timeout: Duration::from_millis(300),
            ..upstreams()
        },
    )
    .await;
    let _details = details_task;
    let started = Instant::now();
    let (status, page) = get(productpage, "/productpage").await;
    let elapsed = started.elapsed();
    assert_eq!(status, StatusCode::OK);
    assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    assert!(page.contains("Sorry, product reviews are currently unavailable"), "{page}");
    assert_details_ok(&page);
}

#[tokio::test]
async fn details_down_shows_details_error() {
    let (ratings, _ratings) = ratings().await;
    let (reviews, reviews_task) = start(App::Reviews { version: 2 }, Upstreams { ratings, ..upstreams() }).await;
    let bookinfo = Bookinfo::with_upstreams(dead_url().await, url(reviews), vec![reviews_task]).await;
    let page = bookinfo.page().await;
    assert!(page.contains("\nError fetching product details\n"), "{page}");
    assert!(!page.contains("PublisherA"), "{page}");
    assert!(page.contains("Reviews served by: reviews-v2"), "{page}");
    assert_eq!(count(&page, "stars: black"), 2, "{page}");
}

#[tokio::test]
async fn headers_reach_ratings_through_reviews() {
    let (ratings, _ratings) = Capture::start(StatusCode::OK, RATINGS_BODY, Duration::ZERO).await;
    let bookinfo = Bookinfo::start(2, ratings.url()).await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (status, _, page) = get_with(
        bookinfo.productpage,
        "/productpage?u=ignored",
        &[
            ("end-user", "jason"),
            ("traceparent", traceparent),
            ("x-request-id", "req-123"),
            ("x-b3-sampled", "1"),
            ("cookie", "user=alsoignored"),
            ("x-not-propagated", "1"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("Signed in as jason"), "{page}");
    assert_eq!(count(&page, "stars: black"), 2, "{page}");

    let requests = ratings.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let (uri, headers) = &requests[0];
    assert_eq!(uri, "/ratings/0");
    assert_eq!(headers["end-user"], "jason");
    assert_eq!(headers["traceparent"], traceparent);
    assert_eq!(headers["x-request-id"], "req-123");
    assert_eq!(headers["x-b3-sampled"], "1");
    assert!(headers.get("x-not-propagated").is_none());
    assert!(headers.get("cookie").is_none());
}

#[tokio::test]
async fn query_and_cookie_become_end_user() {
    let (details, _d) = Capture::start(StatusCode::OK, "{}", Duration::ZERO).await;
    let (reviews, _r) =
        Capture::start(StatusCode::OK, r#"{"id":0,"podname":"reviews-v1","reviews":[]}"#, Duration::ZERO).await;
    let bookinfo = Bookinfo::with_upstreams(details.url(), reviews.url(), vec![]).await;

    let (_, _, page) = get_with(bookinfo.productpage, "/productpage?u=jason", &[]).await;
    assert!(page.contains("Signed in as jason"), "{page}");
    let (_, _, page) =
        get_with(bookinfo.productpage, "/productpage", &[("cookie", "theme=dark; user=alice%20b")]).await;
    assert!(page.contains("Signed in as alice b"), "{page}");
    // The query wins over the cookie.
    get_with(bookinfo.productpage, "/productpage?u=bob", &[("cookie", "user=alice")]).await;
    // Markup in the name is escaped.
    let (_, _, page) = get_with(bookinfo.productpage, "/productpage?u=%3Cb%3E", &[]).await;
    assert!(page.contains("Signed in as &lt;b&gt;"), "{page}");
    let (_, _, page) = get_with(bookinfo.productpage, "/productpage", &[]).await;
    assert!(!page.contains("Signed in as"), "{page}");

    let users = |capture: &Capture| -> Vec<Option<String>> {
        capture
            .requests()
            .iter()
            .map(|(_, h)| h.get("end-user").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect()
    };
    let expected = vec![
        Some("jason".to_string()),
        Some("alice b".to_string()),
        Some("bob".to_string()),
        Some("<b>".to_string()),
        None,
    ];
    assert_eq!(users(&details), expected);
    assert_eq!(users(&reviews), expected);
}

/// A fake HTTP proxy: records each request head and answers by path, closing the connection.
async fn fake_proxy() -> (SocketAddr, Arc<Mutex<Vec<String>>>, Task) {
    let (listener, addr) = bind().await;
    let heads = Arc::new(Mutex::new(Vec::new()));
    let recorded = heads.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let body = if head.contains("/details/") {
                    r#"{"id":0,"publisher":"ProxiedPublisher"}"#
                } else {
                    r#"{"id":0,"podname":"reviews-v7","reviews":[]}"#
                };
                recorded.lock().expect("lock").push(head);
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(resp.as_bytes()).await;
            });
        }
    });
    (addr, heads, Task(task))
}

#[tokio::test]
async fn http_proxy_gets_absolute_form_requests() {
    let (proxy, recorded, _proxy) = fake_proxy().await;
    let (productpage, _p) =
        start(App::ProductPage, Upstreams { proxy: Some(format!("http://{proxy}")), ..upstreams() }).await;
    let (_, _, page) = get_with(productpage, "/productpage", &[("x-request-id", "r1")]).await;
    assert!(page.contains("ProxiedPublisher"), "{page}");
    assert!(page.contains("Reviews served by: reviews-v7"), "{page}");

    let mut heads = recorded.lock().expect("lock").clone();
    heads.sort();
    assert_eq!(heads.len(), 2, "{heads:?}");
    let details = &heads[0];
    assert!(details.starts_with("GET http://details:9080/details/0 HTTP/1.1\r\n"), "{details}");
    assert!(details.to_ascii_lowercase().contains("\r\nhost: details:9080\r\n"));
    assert!(details.to_ascii_lowercase().contains("\r\nx-request-id: r1\r\n"));
    let reviews = &heads[1];
    assert!(reviews.starts_with("GET http://reviews:9080/reviews/0 HTTP/1.1\r\n"), "{reviews}");
    assert!(reviews.to_ascii_lowercase().contains("\r\nhost: reviews:9080\r\n"));

    // reviews v2 sends ratings calls through the proxy too.
    let (reviews, _r) =
        start(App::Reviews { version: 2 }, Upstreams { proxy: Some(proxy.to_string()), ..upstreams() }).await;
    let (status, body) = get(reviews, "/reviews/3").await;
    assert_eq!(status, StatusCode::OK);
    // The fake proxy's answer has no ratings for the reviewers: no stars, no error.
    assert!(!body.contains("rating"), "{body}");
    let heads = recorded.lock().expect("lock").clone();
    assert_eq!(heads.len(), 3, "{heads:?}");
    assert!(heads[2].starts_with("GET http://ratings:9080/ratings/3 HTTP/1.1\r\n"), "{}", heads[2]);
}

#[tokio::test]
async fn json_endpoints_and_errors() {
    let (details, _d) = start(App::Details, upstreams()).await;
    let (status, body) = get(details, "/details/7").await;
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(json["id"], 7);
    for key in ["author", "year", "type", "pages", "publisher", "language", "ISBN-10", "ISBN-13"] {
        assert!(json.get(key).is_some(), "{key} missing in {body}");
    }
    assert_eq!(get(details, "/health").await.0, StatusCode::OK);
    assert_eq!(get(details, "/details/abc").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(get(details, "/details/-1").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(get(details, "/details/").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(get(details, "/details/0/x").await.0, StatusCode::NOT_FOUND);
    assert_eq!(get(details, "/ratings/0").await.0, StatusCode::NOT_FOUND);
    assert_eq!(get(details, "/").await.0, StatusCode::NOT_FOUND);

    let (ratings, _r) = start(App::Ratings, upstreams()).await;
    let (status, body) = get(ratings, "/ratings/0").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).expect("json"),
        serde_json::json!({"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}})
    );
    assert_eq!(get(ratings, "/health").await.0, StatusCode::OK);
    assert_eq!(get(ratings, "/ratings/x").await.0, StatusCode::BAD_REQUEST);

    let (reviews, _v) = start(App::Reviews { version: 1 }, upstreams()).await;
    let (status, body) = get(reviews, "/reviews/0").await;
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(json["podname"], "reviews-v1");
    assert!(json["clustername"].is_string());
    let list = json["reviews"].as_array().expect("reviews");
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|r| r.get("rating").is_none() && r["reviewer"].is_string()));
    assert_eq!(get(reviews, "/health").await.0, StatusCode::OK);
    assert_eq!(get(reviews, "/reviews/1.5").await.0, StatusCode::BAD_REQUEST);

    let (productpage, _p) = start(App::ProductPage, upstreams()).await;
    let (status, body) = get(productpage, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("href=\"/productpage\""), "{body}");
    assert_eq!(get(productpage, "/health").await.0, StatusCode::OK);
    let (status, body) = get(productpage, "/api/v1/products").await;
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(json[0]["id"], 0);
    assert_eq!(json[0]["title"], "The Comedy of Errors");
    assert_eq!(get(productpage, "/nope").await.0, StatusCode::NOT_FOUND);
    assert_eq!(get(productpage, "/login").await.0, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn login_sets_the_user_cookie_and_logout_clears_it() {
    let (productpage, _p) = start(App::ProductPage, upstreams()).await;
    let stream = TcpStream::connect(productpage).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    let _conn = Task(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let req = Request::post("/login")
        .header("host", "productpage")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from_static(b"username=jason+k&passwd=x")))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()["location"], "/productpage");
    let cookie = resp.headers()["set-cookie"].to_str().expect("ascii");
    assert!(cookie.starts_with("user=jason%20k;"), "{cookie}");

    let (status, headers, _) = get_with(productpage, "/logout", &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let cookie = headers["set-cookie"].to_str().expect("ascii");
    assert!(cookie.starts_with("user=;"), "{cookie}");
}

#[tokio::test]
async fn connections_are_kept_alive() {
    let (details, _d) = start(App::Details, upstreams()).await;
    let stream = TcpStream::connect(details).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    let _conn = Task(tokio::spawn(async move {
        let _ = conn.await;
    }));
    for id in 0..3 {
        sender.ready().await.expect("connection still open");
        let req = Request::get(format!("/details/{id}"))
            .header("host", "details")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        resp.into_body().collect().await.expect("body");
    }
}

#[tokio::test]
async fn serve_rejects_bad_configuration() {
    let (listener, _) = bind().await;
    let bad_url = Upstreams { details: "https://details:9080".into(), ..upstreams() };
    assert!(serve(App::ProductPage, listener, bad_url).await.is_err());
    let (listener, _) = bind().await;
    let bad_proxy = Upstreams { proxy: Some("http://127.0.0.1:1/path".into()), ..upstreams() };
    assert!(serve(App::ProductPage, listener, bad_proxy).await.is_err());
    let (listener, _) = bind().await;
    assert!(serve(App::Reviews { version: 4 }, listener, upstreams()).await.is_err());
}

/// SIGTERM semantics of the apps (`serve_until`): requests in flight when shutdown starts get
/// their complete answer, an idle keep-alive connection is closed, no new connection is
/// accepted, and the server returns once the last request is done.
#[tokio::test]
async fn shutdown_finishes_requests_in_flight_and_accepts_no_new_ones() {
    let (details, _d) = start(App::Details, upstreams()).await;
    let (slow, _s) =
        Capture::start(StatusCode::OK, r#"{"id":0,"podname":"reviews-v1","reviews":[]}"#, Duration::from_millis(800))
            .await;
    let (listener, productpage) = bind().await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(plexus_samples::serve_until(
        App::ProductPage,
        listener,
        Upstreams { details: url(details), reviews: slow.url(), ..upstreams() },
        async move {
            let _ = stop_rx.await;
        },
    ));
    // Positive control before shutdown, on a connection that then stays idle.
    let idle = TcpStream::connect(productpage).await.expect("connect");
    let (mut idle_sender, idle_conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(idle)).await.expect("handshake");
    let idle_conn = tokio::spawn(idle_conn);
    let resp = idle_sender
        .send_request(Request::get("/health").header("host", "productpage").body(Empty::<Bytes>::new()).expect("req"))
        .await
        .expect("health");
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.expect("body");

    let in_flight: Vec<_> = (0..5).map(|_| tokio::spawn(get(productpage, "/productpage"))).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = Instant::now();
    stop_tx.send(()).expect("stop");
    for request in in_flight {
        let (status, page) = request.await.expect("request task");
        assert_eq!(status, StatusCode::OK);
        assert!(page.contains("Reviews served by: reviews-v1"), "{page}");
    }
    // The idle keep-alive connection is closed by the server, not left open.
    tokio::time::timeout(Duration::from_secs(2), idle_conn).await.expect("idle connection closed").ok();
    tokio::time::timeout(Duration::from_secs(2), server).await.expect("server returns").expect("join").expect("serve");
    assert!(stopping.elapsed() < Duration::from_secs(2), "{:?}", stopping.elapsed());
    assert!(TcpStream::connect(productpage).await.is_err(), "still accepting after shutdown");
}
