//! Retry budgets and replayable request bodies.
//!
//! A retry budget bounds the extra load retries may add to a destination: over a sliding
//! window of `ttl`, retries may not exceed `ratio` × the requests sent plus `min_per_second`
//! × `ttl` (Finagle's and Linkerd's budget). So a failing destination sees at most
//! (1 + ratio) × the offered load plus a small constant, however many attempts a policy allows.

use foldhash::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body::Body as _;
use http_body_util::BodyExt;

use super::body::{self, Body};
use plexus_core::ServiceName;
use plexus_core::policy::RetryBudget;

/// Slots the window is divided into.
const SLOTS: usize = 10;

/// Requests and retries in a sliding window.
#[derive(Debug)]
pub struct Budget {
    params: RetryBudget,
    slot_len: Duration,
    slots: [(u64, u64); SLOTS],
    /// Index of the slot `current_start` begins.
    current: usize,
    current_start: Instant,
}

impl Budget {
    pub fn new(params: RetryBudget, now: Instant) -> Budget {
        let slot_len = (params.ttl / SLOTS as u32).max(Duration::from_millis(1));
        Budget { params, slot_len, slots: [(0, 0); SLOTS], current: 0, current_start: now }
    }

    fn advance(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.current_start);
        let steps = (elapsed.as_nanos() / self.slot_len.as_nanos().max(1)) as usize;
        for _ in 0..steps.min(SLOTS) {
            self.current = (self.current + 1) % SLOTS;
            self.slots[self.current] = (0, 0);
        }
        if steps > 0 {
            self.current_start += self.slot_len * steps.min(u32::MAX as usize) as u32;
        }
    }

    /// Counts an original request.
    pub fn deposit(&mut self, now: Instant) {
        self.advance(now);
        self.slots[self.current].0 += 1;
    }

    /// Takes one retry from the budget; `false` when the budget is spent.
    pub fn withdraw(&mut self, now: Instant) -> bool {
        self.advance(now);
        let (requests, retries) = self.slots.iter().fold((0u64, 0u64), |(a, b), (r, t)| (a + r, b + t));
        let allowed =
            self.params.ratio * requests as f64 + f64::from(self.params.min_per_second) * self.params.ttl.as_secs_f64();
        if (retries as f64) < allowed {
            self.slots[self.current].1 += 1;
            true
        } else {
            false
        }
    }
}

/// One budget per destination Service, kept across config reloads (reset when the budget's
/// parameters change).
#[derive(Debug, Default)]
pub struct Budgets {
    by_service: Mutex<HashMap<ServiceName, Budget>>,
}

impl Budgets {
    fn with<T>(
        &self,
        service: &ServiceName,
        params: RetryBudget,
        now: Instant,
        f: impl FnOnce(&mut Budget, Instant) -> T,
    ) -> Option<T> {
        let mut map = self.by_service.lock().ok()?;
        // One lookup; the key is cloned only for a Service's first request.
        if let Some(budget) = map.get_mut(service) {
            if budget.params != params {
                *budget = Budget::new(params, now);
            }
            return Some(f(budget, now));
        }
        Some(f(map.entry(service.clone()).or_insert(Budget::new(params, now)), now))
    }

    /// Counts a request sent at `now` (a clock read its caller shares).
    pub fn deposit(&self, service: &ServiceName, params: RetryBudget, now: Instant) {
        self.with(service, params, now, |b, now| b.deposit(now));
    }

    pub fn withdraw(&self, service: &ServiceName, params: RetryBudget) -> bool {
        self.with(service, params, crate::clock::now(), |b, now| b.withdraw(now)).unwrap_or(false)
    }

    /// Forgets Services no longer known.
    pub fn retain(&self, live: impl Fn(&ServiceName) -> bool) {
        if let Ok(mut map) = self.by_service.lock() {
            map.retain(|k, _| live(k));
        }
    }
}

/// The largest request body kept in memory so the request can be sent again.
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

/// How long a body whose end has not arrived is waited for before it is streamed instead (a
/// streaming client may wait for the response before sending more).
const REPLAY_WAIT: Duration = Duration::from_millis(10);

/// A request body: fully buffered (replayable, for retries and mirrors) or streaming (sent
/// once: the buffered prefix, then the rest).
pub enum RequestBody {
    Replayable(Bytes),
    /// `None` once sent.
    Streaming(Option<Body>),
}

impl RequestBody {
    /// Buffers `b` when it is small and complete within a moment; otherwise returns a body that
    /// streams what was read followed by the rest. A body with trailers (gRPC streaming) is
    /// streamed, so trailers are never dropped.
    pub async fn read(mut b: Body) -> RequestBody {
        if b.is_end_stream() {
            return RequestBody::Replayable(Bytes::new());
        }
        if b.size_hint().lower() as usize > MAX_REPLAY_BYTES {
            return RequestBody::Streaming(Some(b));
        }
        let mut buf = BytesMut::new();
        let streaming = |prefix: BytesMut, trailers, error, rest| {
            let p = Prefixed { prefix: Some(prefix.freeze()).filter(|p| !p.is_empty()), trailers, error, rest };
            RequestBody::Streaming(Some(body::boxed(p)))
        };
        loop {
            match tokio::time::timeout(REPLAY_WAIT, b.frame()).await {
                Ok(None) => return RequestBody::Replayable(buf.freeze()),
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        buf.extend_from_slice(&data);
                        if buf.len() > MAX_REPLAY_BYTES {
                            return streaming(buf, None, None, Some(b));
                        }
                        if b.is_end_stream() {
                            return RequestBody::Replayable(buf.freeze());
                        }
                    }
                    Err(frame) => return streaming(buf, frame.into_trailers().ok(), None, None),
                },
                Ok(Some(Err(e))) => return streaming(buf, None, Some(e), None),
                Err(_) => return streaming(buf, None, None, Some(b)),
            }
        }
    }

    /// Whether the body can be sent again.
    pub fn replayable(&self) -> bool {
        matches!(self, RequestBody::Replayable(_))
    }

    /// A body to send: a copy of a replayable body; a streaming body once (then `None`).
    pub fn take(&mut self) -> Option<Body> {
        match self {
            // Boxing the empty body allocates nothing.
            RequestBody::Replayable(bytes) if bytes.is_empty() => Some(body::empty()),
            RequestBody::Replayable(bytes) => Some(body::full(bytes.clone())),
            RequestBody::Streaming(b) => b.take(),
        }
    }

    /// A copy for a mirror, when the body is replayable.
    pub fn copy(&self) -> Option<Body> {
        match self {
            RequestBody::Replayable(bytes) => Some(body::full(bytes.clone())),
            RequestBody::Streaming(_) => None,
        }
    }
}

/// What was read ahead, then the rest of the body.
struct Prefixed {
    prefix: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
    error: Option<crate::BoxError>,
    rest: Option<Body>,
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        if let Some(p) = self.prefix.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(p))));
        }
        if let Some(e) = self.error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        if let Some(t) = self.trailers.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::trailers(t))));
        }
        match self.rest.as_mut() {
            Some(rest) => std::pin::Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none()
            && self.error.is_none()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_ratio_plus_minimum() {
        let params = RetryBudget { ratio: 0.2, min_per_second: 1, ttl: Duration::from_secs(10) };
        let now = Instant::now();
        let mut b = Budget::new(params, now);
        for _ in 0..100 {
            b.deposit(now);
        }
        let granted = (0..1000).filter(|_| b.withdraw(now)).count();
        assert_eq!(granted, 30, "0.2 x 100 + 1/s x 10s");
        // After the window has passed, the old requests and retries no longer count.
        let later = now + Duration::from_secs(11);
        let granted = (0..1000).filter(|_| b.withdraw(later)).count();
        assert_eq!(granted, 10);
    }

    #[tokio::test]
    async fn small_complete_bodies_are_replayable_and_large_ones_stream() {
        let mut small = RequestBody::read(body::full("hello")).await;
        assert!(small.replayable());
        for _ in 0..2 {
            let b = small.take().expect("body");
            assert_eq!(b.collect().await.expect("collect").to_bytes(), "hello");
        }
        let big = vec![7u8; MAX_REPLAY_BYTES + 1];
        let mut large = RequestBody::read(body::full(big.clone())).await;
        assert!(!large.replayable());
        let b = large.take().expect("body once");
        assert_eq!(b.collect().await.expect("collect").to_bytes().len(), big.len());
        assert!(large.take().is_none());
    }
}
