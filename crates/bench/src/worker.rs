//! One task per connection: take the next request from the schedule, wait for its intended
//! time, send it, read the whole response, record.

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};

use crate::config::Protocol;
use crate::conn::{self, ReqBody};
use crate::error::{ErrorKind, classify};
use crate::recorder::{Outcome, Recorder};
use crate::request::Template;
use crate::schedule::{Pacer, Schedule, Slot};

/// What every connection task of a run shares.
pub(crate) struct Ctx {
    pub schedule: Schedule,
    pub template: Template,
    pub addr: SocketAddr,
    pub timeout: Duration,
    pub protocol: Protocol,
    pub keepalive: bool,
    pub streams: usize,
}

/// Runs one connection until the schedule is exhausted and its requests have finished.
/// Results go to the thread's recorder (borrowed only while recording, never across an await).
pub(crate) async fn connection(ctx: Arc<Ctx>, rec: Rc<RefCell<Recorder>>) {
    if ctx.protocol.multiplexed() {
        multiplexed(&ctx, &rec).await;
    } else {
        sequential(&ctx, &rec).await;
    }
}

/// Sleeps until it is time to send `slot` (at once when it is already late).
async fn wait_for(slot: &Slot, pacer: &mut Pacer) {
    let wake = pacer.wake_at(slot);
    if wake > Instant::now() {
        tokio::time::sleep_until(wake.into()).await;
        pacer.woke(wake, Instant::now());
    }
}

/// HTTP/1.1: one request at a time on this connection (or a new connection per request).
async fn sequential(ctx: &Ctx, rec: &RefCell<Recorder>) {
    let mut sender: Option<http1::SendRequest<ReqBody>> = None;
    let mut pacer = Pacer::default();
    while let Some(slot) = ctx.schedule.claim(Instant::now()) {
        wait_for(&slot, &mut pacer).await;
        let sent = Instant::now();
        let outcome = match tokio::time::timeout(ctx.timeout, h1_exchange(ctx, &mut sender)).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Failed(ErrorKind::Timeout),
        };
        if matches!(outcome, Outcome::Failed(_)) || !ctx.keepalive {
            // The connection's state is unknown after a failure (a response may still be on
            // its way): start over on a new one.
            sender = None;
        }
        rec.borrow_mut().record(slot, sent, Instant::now(), outcome);
    }
}

async fn h1_exchange(ctx: &Ctx, sender: &mut Option<http1::SendRequest<ReqBody>>) -> Outcome {
    let s = match sender {
        Some(s) if !s.is_closed() => s,
        _ => match conn::h1(ctx.addr, ctx.timeout).await {
            Ok(s) => sender.insert(s),
            Err(kind) => return Outcome::Failed(kind),
        },
    };
    if let Err(e) = s.ready().await {
        return Outcome::Failed(classify(&e));
    }
    match s.send_request(ctx.template.request()).await {
        Ok(resp) => finish(resp, false).await,
        Err(e) => Outcome::Failed(classify(&e)),
    }
}

/// HTTP/2 and gRPC: up to `streams` requests in flight on this connection.
async fn multiplexed(ctx: &Ctx, rec: &RefCell<Recorder>) {
    let grpc = ctx.protocol == Protocol::Grpc;
    let cap = ctx.streams;
    let mut sender: Option<http2::SendRequest<ReqBody>> = None;
    let mut in_flight = FuturesUnordered::new();
    let mut pending: Option<Slot> = None;
    let mut claiming = true;
    let mut pacer = Pacer::default();
    // When the armed timer should fire, while the pending request waits for it; `None` with a
    // pending request: it is due.
    let mut armed: Option<Instant> = None;
    // One timer, re-armed for each pending request, rather than a new one per loop turn.
    let sleep = tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_secs(86_400));
    tokio::pin!(sleep);
    loop {
        if pending.is_none() && claiming && in_flight.len() < cap {
            match ctx.schedule.claim(Instant::now()) {
                Some(slot) => {
                    let wake = pacer.wake_at(&slot);
                    if wake > Instant::now() {
                        sleep.as_mut().reset(wake.into());
                        armed = Some(wake);
                    }
                    pending = Some(slot);
                }
                None => claiming = false,
            }
        }
        if pending.is_none() && in_flight.is_empty() {
            break;
        }
        // Due (late ones without a trip through the timer) and a stream is free: send.
        if in_flight.len() < cap
            && armed.is_none()
            && let Some(slot) = pending.take()
        {
            let sent = Instant::now();
            let s = match &mut sender {
                Some(s) if !s.is_closed() => s,
                _ => match conn::h2(ctx.addr, ctx.timeout, cap).await {
                    Ok(s) => sender.insert(s),
                    Err(kind) => {
                        rec.borrow_mut().record(slot, sent, Instant::now(), Outcome::Failed(kind));
                        continue;
                    }
                },
            };
            let response = s.send_request(ctx.template.request());
            in_flight.push(h2_exchange(response, slot, sent, ctx.timeout, grpc));
            continue;
        }
        tokio::select! {
            biased;
            Some((slot, sent, done, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                rec.borrow_mut().record(slot, sent, done, outcome);
            }
            () = &mut sleep, if armed.is_some() && in_flight.len() < cap => {
                if let Some(target) = armed.take() {
                    pacer.woke(target, Instant::now());
                }
            }
            else => break,
        }
    }
}

/// One HTTP/2 exchange, timed out as a whole; returns when it finished.
async fn h2_exchange(
    response: impl Future<Output = Result<Response<Incoming>, hyper::Error>>,
    slot: Slot,
    sent: Instant,
    timeout: Duration,
    grpc: bool,
) -> (Slot, Instant, Instant, Outcome) {
    let exchange = async {
        match response.await {
            Ok(resp) => finish(resp, grpc).await,
            Err(e) => Outcome::Failed(classify(&e)),
        }
    };
    let outcome = tokio::time::timeout(timeout, exchange).await.unwrap_or(Outcome::Failed(ErrorKind::Timeout));
    (slot, sent, Instant::now(), outcome)
}

/// Reads the whole response body (so the connection can carry the next request) and judges
/// the response.
async fn finish(resp: Response<Incoming>, grpc: bool) -> Outcome {
    let (parts, mut body) = resp.into_parts();
    let mut trailer_status = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(trailers) = frame.trailers_ref() {
                    trailer_status = grpc_status(trailers);
                }
            }
            Err(e) => return Outcome::Failed(classify(&e)),
        }
    }
    Outcome::Response { error: judge(parts.status, &parts.headers, trailer_status, grpc) }
}

fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

/// The failure a complete response reports, if any: a non-2xx status; for gRPC a non-200
/// status or a `grpc-status` other than 0 (in the trailers, or the headers of a
/// trailers-only response; missing is UNKNOWN, 2).
fn judge(status: StatusCode, headers: &HeaderMap, trailer_status: Option<u32>, grpc: bool) -> Option<ErrorKind> {
    if grpc {
        if status != StatusCode::OK {
            return Some(ErrorKind::Status(status.as_u16()));
        }
        return match trailer_status.or_else(|| grpc_status(headers)).unwrap_or(2) {
            0 => None,
            code => Some(ErrorKind::Grpc(code)),
        };
    }
    (!status.is_success()).then_some(ErrorKind::Status(status.as_u16()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn judging_responses() {
        let none = HeaderMap::new();
        assert_eq!(judge(StatusCode::OK, &none, None, false), None);
        assert_eq!(judge(StatusCode::NO_CONTENT, &none, None, false), None);
        assert_eq!(judge(StatusCode::SERVICE_UNAVAILABLE, &none, None, false), Some(ErrorKind::Status(503)));
        assert_eq!(judge(StatusCode::OK, &none, Some(0), true), None);
        assert_eq!(judge(StatusCode::OK, &none, Some(14), true), Some(ErrorKind::Grpc(14)));
        assert_eq!(judge(StatusCode::OK, &none, None, true), Some(ErrorKind::Grpc(2)));
        let mut trailers_only = HeaderMap::new();
        trailers_only.insert("grpc-status", HeaderValue::from_static("12"));
        assert_eq!(judge(StatusCode::OK, &trailers_only, None, true), Some(ErrorKind::Grpc(12)));
        assert_eq!(judge(StatusCode::BAD_GATEWAY, &none, Some(0), true), Some(ErrorKind::Status(502)));
    }
}
