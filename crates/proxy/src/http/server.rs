//! Serving HTTP/1.1 and HTTP/2 (h2c) on an accepted connection, with the proxy's limits, and
//! taking part in graceful drain: HTTP/1.1 by [`h1_server`] (hyper from an upgrade on), HTTP/2
//! by [`h2_server`]; a connection whose protocol its caller does not know is told by its first
//! bytes (the HTTP/2 preface or not).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use super::body::{Body, ReceivedBody};
use super::h1_codec::Limits as HeadLimits;
use super::h1_server;
use super::h2_server;
use crate::settings::Limits;

/// A configured HTTP server (HTTP/1.1 with keep-alive and upgrades, HTTP/2 prior knowledge).
#[derive(Clone)]
pub struct HttpServer {
    /// hyper's HTTP/1 server, for a connection from its first request the proxy's own does not
    /// serve (an upgrade, `CONNECT`) on.
    http1: http1::Builder,
    http2: h2_server::Settings,
    /// A connection with no request in flight for this long is closed (HTTP/2: GOAWAY).
    idle_timeout: Duration,
    /// An HTTP/1 request head must be complete this long after its first byte (slowloris).
    header_read_timeout: Duration,
    /// An HTTP/1 keep-alive connection quiet this long is parked: hyper's buffers are freed
    /// until its next byte arrives (zero: never).
    park_after: Duration,
    /// Connections parked now (`plexus_http_connections_parked`).
    parked: Gauge,
    /// What an HTTP/1 request head may be.
    head_limits: HeadLimits,
}

/// The protocol of a connection, when its caller knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Known {
    Http1,
    Http2,
}

impl HttpServer {
    pub fn new(limits: &Limits, parked: Gauge) -> Self {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            // hyper's own header timer also runs while a keep-alive connection waits for its
            // next request, which would make it the keep-alive idle timeout: the head clock
            // below starts at a request's first byte instead.
            .header_read_timeout(None)
            .max_buf_size(limits.max_header_bytes.max(8192))
            // A client may shut down its sending side once its request is sent (`nc`, some
            // HTTP/1.0 clients): it still gets its response.
            .half_close(true)
            .keep_alive(true);
        let http2 = h2_server::Settings {
            max_header_list_size: u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX),
            keep_alive: h2_server::SERVER_KEEP_ALIVE,
        };
        HttpServer {
            http1,
            http2,
            idle_timeout: limits.idle_timeout,
            header_read_timeout: limits.header_read_timeout,
            park_after: limits.release_idle_buffers_after,
            parked,
            head_limits: h1_server::limits(limits.max_header_bytes),
        }
    }

    /// Serves requests on `io` with `handler` until the connection ends, or finishes in-flight
    /// requests and closes once `drain` turns true, or closes once no request has been in
    /// flight for the idle timeout (HTTP/1 keep-alive and HTTP/2 alike; HTTP/2 gets a GOAWAY
    /// and a stream still sending its response body finishes first). An HTTP/1 request head
    /// must be complete within the header read timeout of its first byte, else the connection
    /// is closed without an answer (slowloris); an idle keep-alive connection is not timed by it.
    ///
    /// The connection's state (hyper's, ours) lives in an allocation of its own, sized for
    /// HTTP: the task calling this (detection, TLS, opaque forwarding in other branches) keeps
    /// only a pointer to it across the connection's life.
    pub async fn serve<I, F, Fut>(&self, io: I, drain: watch::Receiver<bool>, handler: F)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: Fn(Request<ReceivedBody>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        Box::pin(self.serve_connection(None, io, drain, handler)).await
    }

    /// [`serve`](Self::serve) for a connection whose protocol the caller has detected.
    pub async fn serve_known<I, F, Fut>(&self, known: Known, io: I, drain: watch::Receiver<bool>, handler: F)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: Fn(Request<ReceivedBody>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        Box::pin(self.serve_connection(Some(known), io, drain, handler)).await
    }

    async fn serve_connection<I, F, Fut>(&self, known: Option<Known>, io: I, drain: watch::Receiver<bool>, handler: F)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: Fn(Request<ReceivedBody>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let activity = Arc::new(Activity { flushed: AtomicBool::new(true), ..Activity::default() });
        let started = Instant::now();
        let counted = activity.clone();
        let handler = Arc::new(handler);
        // What serves one request, for hyper's connections and the proxy's own alike.
        let serve_one = move |req: Request<ReceivedBody>| {
            // Boxed where it is made: a connection keeps a slot the size of the service's future
            // for its whole life, idle or not; this way the slot holds a pointer and the
            // request's state (several KiB) exists only while the request does — and is copied
            // once, into its box, not again into the wrapper and the connection's slot. The box
            // is allocated before the handler is called, so that its future can be written
            // straight into it rather than made on the stack and copied.
            let slot = Box::<Fut>::new_uninit();
            let fut = Box::into_pin(Box::write(slot, handler(req)));
            let activity = counted.clone();
            activity.in_flight.fetch_add(1, Ordering::Relaxed);
            // The head is complete: its clock stops.
            activity.head_since.store(0, Ordering::Relaxed);
            Served { fut, activity, started, answered: false }
        };
        let mut io = HeadClock::new(io, activity.clone(), started);
        let mut drain = drain;
        let known = match known {
            Some(known) => known,
            None => {
                let detected = tokio::select! {
                    known = self.detect(&mut io, started) => known,
                    () = crate::proxy::drained(&mut drain) => None,
                };
                // Closed, failed or timed out before it said, or drained meanwhile.
                let Some(known) = detected else { return };
                known
            }
        };
        match known {
            Known::Http1 => self.serve_http1(io, serve_one, &activity, started, &mut drain).await,
            Known::Http2 => {
                let mut conn = h2_server::Connection::new(io, serve_one, &self.http2);
                self.drive(
                    Pin::new(&mut conn),
                    |c| c.get_mut().graceful_shutdown(),
                    &activity,
                    started,
                    &mut drain,
                    false,
                )
                .await;
            }
        }
    }

    /// Reads a connection's first bytes until they tell HTTP/2 (its preface, RFC 9113 §3.4)
    /// from HTTP/1, and leaves them in `io.prefix` for the server that reads them next. None:
    /// the client closed or failed before it said, or did not say within the idle timeout
    /// (nothing sent) or the header read timeout of its first byte.
    async fn detect<I: AsyncRead + Unpin>(&self, io: &mut HeadClock<I>, started: Instant) -> Option<Known> {
        let mut first = [0u8; PREFACE.len()];
        let mut n = 0;
        let mut deadline = (!self.idle_timeout.is_zero()).then(|| started + self.idle_timeout);
        let known = loop {
            let read = std::future::poll_fn(|cx| {
                let mut buf = ReadBuf::new(&mut first[n..]);
                Pin::new(&mut *io).poll_read(cx, &mut buf).map(|r| r.map(|()| buf.filled().len()))
            });
            let read = match deadline {
                Some(at) => tokio::time::timeout_at(at.into(), read).await.ok()?,
                None => read.await,
            };
            match read {
                Ok(0) if n > 0 => break Known::Http1,
                Ok(0) | Err(_) => return None,
                Ok(k) => {
                    if n == 0 && !self.header_read_timeout.is_zero() {
                        deadline = Some(Instant::now() + self.header_read_timeout);
                    }
                    n += k;
                }
            }
            if first[..n] != PREFACE[..n] {
                break Known::Http1;
            }
            if n == PREFACE.len() {
                break Known::Http2;
            }
        };
        let http2 = known == Known::Http2;
        io.http2 = Some(http2);
        if http2 {
            // No head clock for HTTP/2, whatever the first read looked like.
            io.activity.head_since.store(0, Ordering::Relaxed);
            io.prefix = Bytes::from_static(PREFACE);
        } else {
            io.prefix = Bytes::copy_from_slice(&first[..n]);
        }
        Some(known)
    }

    /// HTTP/1: the proxy's own server ([`h1_server`]), parked while the connection is quiet,
    /// and hyper's from the first request it does not serve itself (an upgrade, `CONNECT`) on.
    /// A keep-alive connection holds read and write buffers for as long as it is served; once
    /// it has been quiet for `park_after` (no request in flight, no byte in or out, nothing left
    /// to flush) the connection is ended at the message boundary without closing the socket
    /// (`graceful_shutdown` on an idle connection, with the shutdown of the socket held back),
    /// and the socket waits on its own, with a one-byte read, for the next request; its first
    /// byte (and any bytes read past the last message) is handed to a new connection. A
    /// connection that turns out not to be at a message boundary when parked (it still had I/O
    /// to do) is closed instead, never re-served.
    async fn serve_http1<I, S, R>(
        &self,
        io: HeadClock<I>,
        serve_one: S,
        activity: &Activity,
        started: Instant,
        drain: &mut watch::Receiver<bool>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Fn(Request<ReceivedBody>) -> R + Clone + Send + Sync + Unpin + 'static,
        R: Future<Output = Response<Body>> + Send + Unpin + 'static,
    {
        let (mut io, mut serve_one) = (io, serve_one);
        loop {
            let mut conn = h1_server::Connection::new(io, serve_one, self.head_limits);
            let driven = self
                .drive(
                    Pin::new(&mut conn),
                    |c| c.get_mut().graceful_shutdown(),
                    activity,
                    started,
                    drain,
                    !self.park_after.is_zero(),
                )
                .await;
            let handed_off = conn.handed_off();
            let unread_input = conn.closed_with_unread_input();
            let (mut clock, read, service) = conn.into_parts();
            serve_one = service;
            if handed_off {
                // A request the proxy's server does not serve: hyper serves the connection
                // from its head on.
                clock.prefix = read.freeze();
                let hyper = self.http1.serve_connection(TokioIo::new(clock), hyper_service(serve_one)).with_upgrades();
                tokio::pin!(hyper);
                self.drive(hyper, |c| c.graceful_shutdown(), activity, started, drain, false).await;
                return;
            }
            // Ended: closed by either side, a timeout or a drain. A connection that closed with
            // input unread (it lingered) is never parked: what follows in it is not a request.
            let (Driven::Parked | Driven::NotAtBoundary) = driven else { return };
            if unread_input {
                return;
            }
            activity.parking.store(false, Ordering::Relaxed);
            if driven == Driven::NotAtBoundary {
                tracing::debug!("HTTP/1 connection busy when parked; closing it");
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut clock).await;
                return;
            }
            // Bytes read past the last message (none, unless pipelined) in an allocation of
            // their own; the read buffer is freed before waiting.
            clock.prefix = if read.is_empty() { Bytes::new() } else { Bytes::copy_from_slice(&read) };
            drop(read);
            if !self.wait_parked(&mut clock, activity, started, drain).await {
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut clock).await;
                return;
            }
            io = clock;
        }
    }

    /// A parked HTTP/1 connection: waits for its next byte (true: serve it again), or for the
    /// client to close, the idle timeout or a drain (false).
    async fn wait_parked<I: AsyncRead + Unpin>(
        &self,
        clock: &mut HeadClock<I>,
        activity: &Activity,
        started: Instant,
        drain: &mut watch::Receiver<bool>,
    ) -> bool {
        if !clock.prefix.is_empty() {
            return true;
        }
        tracing::trace!("HTTP/1 connection parked");
        self.parked.inc();
        let last = started + Duration::from_millis(activity.last.load(Ordering::Relaxed));
        let idle = tokio::time::sleep_until((last + self.idle_timeout).into());
        let mut byte = [0u8; 1];
        let read = std::future::poll_fn(|cx| {
            let mut buf = ReadBuf::new(&mut byte);
            Pin::new(&mut *clock).poll_read(cx, &mut buf).map(|r| r.map(|()| buf.filled().len()))
        });
        let woke = tokio::select! {
            r = read => matches!(r, Ok(1)),
            () = crate::proxy::drained(drain) => false,
            () = idle, if !self.idle_timeout.is_zero() => false,
        };
        self.parked.dec();
        if woke {
            clock.prefix = Bytes::copy_from_slice(&byte);
        }
        woke
    }

    /// Runs a connection (the proxy's or hyper's, with `graceful_shutdown` theirs) to its end:
    /// drain, idle timeout, the head clock; with `park`, also to the moment it is parked.
    async fn drive<C, E>(
        &self,
        mut conn: Pin<&mut C>,
        graceful_shutdown: impl Fn(Pin<&mut C>),
        activity: &Activity,
        started: Instant,
        drain: &mut watch::Receiver<bool>,
        park: bool,
    ) -> Driven
    where
        C: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let idle = self.idle_timeout;
        // When the connection is next checked for quiet (parking), and the I/O count then.
        let mut park_check = park.then(|| started + self.park_after);
        let mut io_seen = u64::MAX;
        let head_timeout = self.header_read_timeout;
        // When the connection is next checked for idleness.
        let mut check = started + idle;
        // One timer for both clocks (the idle check and the head clock), armed at the earlier
        // of their deadlines and moved only when it fires or a deadline comes before it: a
        // request head that starts and completes in time touches neither the timer wheel nor
        // a new future.
        let mut armed = (!idle.is_zero()).then_some(check);
        let timer = tokio::time::sleep_until(check.into());
        tokio::pin!(timer);
        let drained = crate::proxy::drained(drain);
        tokio::pin!(drained);
        // The timer and the drain are polled only when one of them woke the task (or the timer
        // moved), not on every wake-up of the connection: their waker notes it.
        let side = Arc::new(SideWake::default());
        let side_waker = Waker::from(side.clone());
        let result = loop {
            let mut head_deadline = None;
            // The head clock's start the deadlines were last checked with: they change only
            // when it does (or after an event, when this loop turns and they are checked again).
            let mut checked_with = None;
            let event = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                    return Poll::Ready(Event::Ended(r));
                }
                // A head that started while the connection was polled (its reads happen in
                // this task): its clock may come before the armed deadline.
                let head_since = activity.head_since.load(Ordering::Relaxed);
                if checked_with != Some(head_since) {
                    checked_with = Some(head_since);
                    head_deadline = (head_since != 0 && !head_timeout.is_zero())
                        .then(|| started + Duration::from_millis(head_since - 1) + head_timeout);
                    let due =
                        [head_deadline, (!idle.is_zero()).then_some(check), park_check].into_iter().flatten().min();
                    if let Some(due) = due
                        && armed.is_none_or(|a| due < a)
                    {
                        timer.as_mut().reset(due.into());
                        armed = Some(due);
                        side.woken.store(true, Ordering::Relaxed);
                    }
                }
                if side.take(cx.waker()) {
                    let mut side_cx = Context::from_waker(&side_waker);
                    if drained.as_mut().poll(&mut side_cx).is_ready() {
                        return Poll::Ready(Event::Drain);
                    }
                    if armed.is_some() && timer.as_mut().poll(&mut side_cx).is_ready() {
                        return Poll::Ready(Event::Timer(head_since));
                    }
                }
                Poll::Pending
            })
            .await;
            match event {
                Event::Ended(r) => break r,
                Event::Drain => {
                    // HTTP/1: finish the current request, then close; HTTP/2: GOAWAY.
                    graceful_shutdown(conn.as_mut());
                    break conn.await;
                }
                Event::Timer(head_since) => {
                    armed = None;
                    let now = Instant::now();
                    if head_deadline.is_some_and(|d| d <= now) {
                        if activity.wrote.swap(false, Ordering::Relaxed) {
                            // Bytes went out meanwhile: what came in was the body of a request
                            // whose response is streaming (an echo), not a new head. Look
                            // again one timeout later.
                            let _ = activity.head_since.compare_exchange(
                                head_since,
                                since(started) + 1,
                                Ordering::Relaxed,
                                Ordering::Relaxed,
                            );
                        } else if activity.head_since.load(Ordering::Relaxed) == head_since
                            && activity.in_flight.load(Ordering::Relaxed) == 0
                        {
                            tracing::debug!(timeout = ?head_timeout, "request head not complete in time; closing the connection");
                            break Ok(());
                        }
                    }
                    if let Some(at) = park_check
                        && at <= now
                    {
                        let io = activity.io.load(Ordering::Relaxed);
                        let quiet = io == io_seen
                            && activity.flushed.load(Ordering::Relaxed)
                            && activity.in_flight.load(Ordering::Relaxed) == 0
                            && activity.head_since.load(Ordering::Relaxed) == 0;
                        if quiet {
                            // Idle in hyper's eyes too: `graceful_shutdown` closes an idle
                            // connection at once, without I/O. If hyper was in the middle of a
                            // message after all, it only stops keep-alive (the connection closes
                            // after that message) and the poll below does I/O or waits.
                            activity.parking.store(true, Ordering::Relaxed);
                            graceful_shutdown(conn.as_mut());
                            let polled = std::future::poll_fn(|cx| Poll::Ready(conn.as_mut().poll(cx))).await;
                            let clean = activity.io.load(Ordering::Relaxed) == io;
                            match polled {
                                Poll::Ready(Ok(())) if clean => return Driven::Parked,
                                Poll::Ready(_) => return Driven::NotAtBoundary,
                                Poll::Pending => activity.parking.store(false, Ordering::Relaxed),
                            }
                        }
                        io_seen = io;
                        park_check = Some(now + self.park_after);
                    }
                    if !idle.is_zero() && check <= now {
                        let last = started + Duration::from_millis(activity.last.load(Ordering::Relaxed));
                        if activity.in_flight.load(Ordering::Relaxed) == 0 && last + idle <= now {
                            tracing::debug!("closing an idle HTTP connection");
                            graceful_shutdown(conn.as_mut());
                            break conn.await;
                        }
                        check = last.max(now) + idle;
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "HTTP connection ended with an error");
        }
        Driven::Ended
    }
}

/// Milliseconds from `origin` (a connection's start) to now ([`crate::clock::now`]).
fn since(origin: Instant) -> u64 {
    crate::clock::now().saturating_duration_since(origin).as_millis() as u64
}

/// hyper's service for `serve_one`: the request's body wrapped as a [`ReceivedBody`].
fn hyper_service<S, R>(
    serve_one: S,
) -> impl hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible, Future: Send + 'static>
+ Clone
where
    S: Fn(Request<ReceivedBody>) -> R + Clone,
    R: Future<Output = Response<Body>> + Send + 'static,
{
    service_fn(move |req: Request<Incoming>| {
        let resp = serve_one(req.map(ReceivedBody::Hyper));
        async move { Ok::<_, Infallible>(resp.await) }
    })
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A request's handler, counted in its connection's [`Activity`] until it answers or is dropped
/// (an HTTP/2 stream reset by its client drops its handler). `Unpin` (the handler's own future
/// is boxed): the connection keeps it inline.
struct Served<Fut> {
    fut: Pin<Box<Fut>>,
    activity: Arc<Activity>,
    started: Instant,
    /// Answered: no longer counted.
    answered: bool,
}

impl<Fut> Served<Fut> {
    fn uncount(&mut self) {
        self.answered = true;
        let activity = &self.activity;
        activity.last.store(since(self.started), Ordering::Relaxed);
        activity.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<Fut: Future<Output = Response<Body>>> Future for Served<Fut> {
    type Output = Response<Body>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<Body>> {
        let resp = std::task::ready!(self.fut.as_mut().poll(cx));
        self.uncount();
        Poll::Ready(resp)
    }
}

impl<Fut> Drop for Served<Fut> {
    fn drop(&mut self) {
        if !self.answered {
            self.uncount();
        }
    }
}

/// How [`HttpServer::drive`] left a connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Driven {
    /// Closed (by either side, the idle timeout, a drain) or upgraded.
    Ended,
    /// Ended by hyper at a message boundary with the socket open: serve it again later.
    Parked,
    /// Ended by hyper while parking, after I/O: not known to be at a message boundary.
    NotAtBoundary,
}

/// Requests in flight on a connection, when the last one was answered (milliseconds since
/// the connection started), and when the head being received started.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    last: AtomicU64,
    /// 1 + milliseconds since the connection started at the first byte of an HTTP/1 request
    /// head not yet complete; 0 when none is being received.
    head_since: AtomicU64,
    /// Bytes were written since the head clock started.
    wrote: AtomicBool,
    /// Reads and writes that moved bytes (written only by the connection's [`HeadClock`]).
    io: AtomicU64,
    /// The last write-side call was a flush that completed: nothing is waiting to be sent.
    flushed: AtomicBool,
    /// The connection is being parked: hyper's shutdown of the socket is held back.
    parking: AtomicBool,
}

/// What woke a connection's serving loop.
enum Event<R> {
    Ended(R),
    Drain,
    /// The timer fired; the head clock's start it was armed with.
    Timer(u64),
}

/// The waker of a connection's timer and drain: notes that one of them woke the task, then
/// wakes it.
#[derive(Default)]
struct SideWake {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl SideWake {
    /// Whether the timer or the drain woke the task since the last call (the first call says
    /// yes: they were never polled); keeps `task` as the waker to wake.
    fn take(&self, task: &Waker) -> bool {
        if let Ok(mut t) = self.task.lock()
            && !t.as_ref().is_some_and(|w| w.will_wake(task))
        {
            *t = Some(task.clone());
            return true;
        }
        self.woken.swap(false, Ordering::Acquire)
    }
}

impl Wake for SideWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Ok(t) = self.task.lock()
            && let Some(w) = t.as_ref()
        {
            w.wake_by_ref();
        }
    }
}

/// The connection's I/O, noting the first byte of each HTTP/1 request head: a byte that
/// arrives while no request is in flight starts one (the head clock). HTTP/2 connections
/// (recognised by their preface) have no head clock; their idle timeout covers them.
/// Bytes read while no request is in flight may also be the rest of a request body whose
/// response is already streaming (an echo): such a clock is restarted as long as bytes are
/// written, so only a connection that neither completes a head nor receives anything is cut.
struct HeadClock<I> {
    inner: I,
    activity: Arc<Activity>,
    started: Instant,
    /// Decided on the first bytes.
    http2: Option<bool>,
    /// Bytes read before the connection was parked that the next hyper connection must see
    /// first (what hyper had read past its last message, the byte that woke the connection).
    prefix: Bytes,
}

impl<I> HeadClock<I> {
    fn new(inner: I, activity: Arc<Activity>, started: Instant) -> Self {
        HeadClock { inner, activity, started, http2: None, prefix: Bytes::new() }
    }

    fn count_io(&self) {
        // One writer (this connection's I/O): no read-modify-write needed.
        let io = &self.activity.io;
        io.store(io.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for HeadClock<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = if self.prefix.is_empty() {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        } else {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            Poll::Ready(Ok(()))
        };
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            self.count_io();
            let http2 = *self.http2.get_or_insert_with(|| read.starts_with(b"PRI * HTTP/2"));
            let activity = &self.activity;
            if !http2
                && activity.in_flight.load(Ordering::Relaxed) == 0
                && activity.head_since.load(Ordering::Relaxed) == 0
            {
                activity.wrote.store(false, Ordering::Relaxed);
                // The serving loop, in this task, sees it once this poll returns.
                activity.head_since.store(since(self.started) + 1, Ordering::Relaxed);
            }
        }
        poll
    }
}

impl<I> HeadClock<I> {
    fn note_write(&self, poll: &Poll<std::io::Result<usize>>) {
        if matches!(poll, Poll::Ready(Ok(n)) if *n > 0) {
            self.count_io();
            self.activity.flushed.store(false, Ordering::Relaxed);
            if self.activity.head_since.load(Ordering::Relaxed) != 0 {
                self.activity.wrote.store(true, Ordering::Relaxed);
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for HeadClock<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note_write(&poll);
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note_write(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(poll, Poll::Ready(Ok(()))) {
            self.activity.flushed.store(true, Ordering::Relaxed);
        }
        poll
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.activity.parking.load(Ordering::Relaxed) {
            // Parking: hyper is done with the connection, the socket is not.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
