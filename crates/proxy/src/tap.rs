//! Tap: the proxy's live stream of the HTTP requests it handles (admin `GET /tap`).
//!
//! Requests are described only while someone taps: [`Tap::active`] is one atomic load, and a
//! request that starts while nobody listens carries no [`Notes`] and costs nothing more. Each
//! subscriber gets the events through a bounded broadcast channel; one that reads too slowly
//! loses the oldest events (counted in the log), never slows the proxy down.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body::Frame;
use http_body_util::StreamBody;
use plexus_core::tap::{FILTER_PARAMS, TapEvent, TapFilter};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::http::body::{self, Body};

/// Events buffered per subscriber before the oldest are dropped.
const BUFFER: usize = 4096;

/// The tap hub of one proxy.
pub struct Tap {
    events: broadcast::Sender<Arc<TapEvent>>,
    subscribers: Arc<AtomicUsize>,
}

impl Default for Tap {
    fn default() -> Self {
        Tap { events: broadcast::channel(BUFFER).0, subscribers: Arc::default() }
    }
}

impl Tap {
    /// Whether anyone taps (requests starting now are described).
    pub fn active(&self) -> bool {
        self.subscribers.load(Ordering::Relaxed) > 0
    }

    /// Hands `event` to every subscriber.
    pub fn publish(&self, event: TapEvent) {
        // No receiver left (the last subscriber went meanwhile) is not an error.
        let _ = self.events.send(Arc::new(event));
    }

    fn subscribe(&self) -> Subscription {
        self.subscribers.fetch_add(1, Ordering::Relaxed);
        Subscription { events: self.events.subscribe(), subscribers: self.subscribers.clone() }
    }

    /// Answers `GET /tap?method=&path=&status=&source=&destination=&direction=&max=`: JSON
    /// lines, one per request, until the client goes (or after `max` events).
    pub fn serve(&self, query: Option<&str>) -> Response<Body> {
        let pairs: Vec<(String, String)> =
            form_urlencoded::parse(query.unwrap_or_default().as_bytes()).into_owned().collect();
        let filter = match TapFilter::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
            Ok(f) => f,
            Err(e) => return bad_request(e),
        };
        let mut max = None;
        for (k, v) in &pairs {
            match k.as_str() {
                "max" => match v.parse::<u64>() {
                    Ok(n) if n > 0 => max = Some(n),
                    _ => return bad_request(format!("max: a positive number of events, got {v:?}")),
                },
                k if FILTER_PARAMS.contains(&k) => {}
                other => return bad_request(format!("unknown parameter {other:?}")),
            }
        }
        let sub = self.subscribe();
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
        tokio::spawn(sub.forward(filter, max, tx));
        let mut resp = Response::new(body::boxed(StreamBody::new(ReceiverStream::new(rx))));
        resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/x-ndjson"));
        resp.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
        resp
    }
}

fn bad_request(message: String) -> Response<Body> {
    let mut r = Response::new(body::full(format!("{message}\n")));
    *r.status_mut() = StatusCode::BAD_REQUEST;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain"));
    r
}

/// One tap client; counted in [`Tap::active`] until dropped.
struct Subscription {
    events: broadcast::Receiver<Arc<TapEvent>>,
    subscribers: Arc<AtomicUsize>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Subscription {
    /// Writes the events that pass `filter` to `out` as JSON lines until the client is gone
    /// or `max` were written.
    async fn forward(
        mut self,
        filter: TapFilter,
        max: Option<u64>,
        out: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    ) {
        let mut sent = 0u64;
        loop {
            let event = tokio::select! {
                e = self.events.recv() => e,
                _ = out.closed() => return,
            };
            let event = match event {
                Ok(e) => e,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(dropped = n, "tap client too slow: events dropped");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if !filter.matches(&event) {
                continue;
            }
            let Ok(mut line) = serde_json::to_vec(&*event) else { continue };
            line.push(b'\n');
            if out.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                return;
            }
            sent += 1;
            if max.is_some_and(|m| sent >= m) {
                return;
            }
        }
    }
}

/// What the proxy decided while handling one request, for tap; off (and free) when nobody
/// tapped as the request started.
#[derive(Default)]
pub struct Notes(Option<Mutex<Noted>>);

/// The decisions and the count of retries of one request.
#[derive(Default)]
pub struct Noted {
    pub decisions: Vec<String>,
    pub retries: u32,
}

impl Notes {
    /// Notes that record when `on`.
    pub fn new(on: bool) -> Notes {
        Notes(on.then(Mutex::default))
    }

    /// Whether decisions are recorded.
    pub fn on(&self) -> bool {
        self.0.is_some()
    }

    /// Records a decision; `describe` runs only when recording.
    pub fn add(&self, describe: impl FnOnce() -> String) {
        if let Some(Ok(mut n)) = self.0.as_ref().map(Mutex::lock) {
            n.decisions.push(describe());
        }
    }

    /// Records a retry and why it happened.
    pub fn retry(&self, describe: impl FnOnce() -> String) {
        if let Some(Ok(mut n)) = self.0.as_ref().map(Mutex::lock) {
            n.retries += 1;
            n.decisions.push(describe());
        }
    }

    /// What was recorded.
    pub fn take(&self) -> Noted {
        match self.0.as_ref().map(Mutex::lock) {
            Some(Ok(mut n)) => std::mem::take(&mut *n),
            _ => Noted::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn event(path: &str) -> TapEvent {
        serde_json::from_value(serde_json::json!({
            "time": "2026-01-01T00:00:00Z", "proxy": "a", "direction": "inbound", "method": "GET",
            "authority": "a:80", "path": path, "status": 200, "latencyMs": 1.0,
            "source": {}, "destination": {}, "route": "default", "tls": false, "flags": "-"
        }))
        .expect("event")
    }

    #[tokio::test]
    async fn streams_matching_events_and_counts_subscribers() {
        let tap = Tap::default();
        assert!(!tap.active());
        let resp = tap.serve(Some("path=/keep&max=2"));
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(tap.active());
        for p in ["/drop", "/keep/1", "/drop", "/keep/2", "/keep/3"] {
            tap.publish(event(p));
        }
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let lines: Vec<TapEvent> = body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("json line"))
            .collect();
        assert_eq!(lines.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(), ["/keep/1", "/keep/2"]);
        // The forwarding task ended after `max`: nobody taps any more.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!tap.active());
    }

    #[tokio::test]
    async fn bad_queries_are_refused() {
        let tap = Tap::default();
        for q in ["status=abc", "max=0", "colour=red"] {
            assert_eq!(tap.serve(Some(q)).status(), StatusCode::BAD_REQUEST, "{q}");
        }
        assert!(!tap.active());
    }

    #[test]
    fn notes_record_only_when_on() {
        let off = Notes::new(false);
        off.add(|| unreachable!("not described when off"));
        assert!(off.take().decisions.is_empty());
        let on = Notes::new(true);
        on.add(|| "route r".into());
        on.retry(|| "retry 1".into());
        let n = on.take();
        assert_eq!((n.decisions.len(), n.retries), (2, 1));
    }
}
