//! The time a request's work is stamped with: one clock reading per wake-up of the
//! connection serving it, instead of one per use.
//!
//! A request read from a client is timed in many places — its observation's start and end, the
//! balancer's latency estimate, the retry budget, the idle pool of upstream connections, the
//! head-read timeout, the `Date` of its response — and each used to read the clock itself (~10
//! readings per request). The HTTP servers instead read it once each time their connection's
//! task is polled ([`polling`]), and everything that runs within that poll asks [`now`] for it,
//! as Envoy's dispatchers and nginx's event loop do (`approximateMonotonicTime`,
//! `ngx_current_msec`). A poll lasts microseconds (its work is bounded by the connection's
//! buffers), so the time is that close: what it times is the wake-up, which is when a
//! response, a head or a timeout was noticed anyway. Outside a server's poll (timers, other
//! tasks, tests) [`now`] reads the clock.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderValue;

thread_local! {
    /// The time of the poll running on this thread, if a server's poll is running.
    static POLL_TIME: Cell<Option<Instant>> = const { Cell::new(None) };
    /// The `Date` of responses, and until when it holds.
    static DATE: RefCell<Option<(Instant, HeaderValue)>> = const { RefCell::new(None) };
}

/// The time of the server poll this runs in, or the clock's outside one.
pub fn now() -> Instant {
    POLL_TIME.get().unwrap_or_else(Instant::now)
}

/// Reads the clock for a server's poll: until the guard is dropped, [`now`] on this thread is
/// this time. Polls nest (a poll within a poll keeps the outer one's time and gives it back).
pub fn polling() -> Polling {
    let outer = POLL_TIME.get();
    if outer.is_none() {
        POLL_TIME.set(Some(Instant::now()));
    }
    Polling { outer }
}

/// A server poll's time, in effect while this lives.
#[must_use = "the poll's time is in effect only while the guard lives"]
pub struct Polling {
    outer: Option<Instant>,
}

impl Drop for Polling {
    fn drop(&mut self) {
        POLL_TIME.set(self.outer);
    }
}

/// Runs `f` with the `Date` of a response sent now (RFC 9110 §6.6.1): formatted once per
/// second per thread, and known to hold without a wall-clock reading until the second ends.
pub fn with_date<R>(f: impl FnOnce(&HeaderValue) -> R) -> R {
    DATE.with(|date| {
        let mut date = date.borrow_mut();
        let now = now();
        match &*date {
            Some((until, value)) if now < *until => f(value),
            _ => {
                let wall = SystemTime::now();
                let into_second = wall.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
                let until = now + Duration::from_nanos(u64::from(1_000_000_000 - into_second.min(999_999_999)));
                let value = HeaderValue::from_str(&httpdate::fmt_http_date(wall))
                    .unwrap_or(HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"));
                f(&date.insert((until, value)).1)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poll_reads_the_clock_once_and_gives_it_back_after() {
        let before = now();
        {
            let _poll = polling();
            let t = now();
            assert!(t >= before);
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(now(), t, "within a poll, its time");
            {
                let _inner = polling();
                assert_eq!(now(), t, "a nested poll keeps the outer time");
            }
            assert_eq!(now(), t, "the outer poll's time after a nested one ends");
        }
        let after = now();
        assert!(after >= before + Duration::from_millis(5), "outside a poll, the clock");
        assert_ne!(POLL_TIME.get(), Some(after));
        assert_eq!(POLL_TIME.get(), None);
    }

    #[test]
    fn the_date_is_an_http_date_of_this_second() {
        let formatted = with_date(|d| d.to_str().map(str::to_string)).expect("visible ASCII");
        let parsed = httpdate::parse_http_date(&formatted).expect("an HTTP date");
        let age = SystemTime::now().duration_since(parsed).expect("not in the future");
        assert!(age < Duration::from_secs(2), "{formatted} is {age:?} old");
        // Read again: the same second's text, or the next second's if it ended meanwhile.
        let again = with_date(|d| d.to_str().map(str::to_string)).expect("visible ASCII");
        let later = httpdate::parse_http_date(&again).expect("an HTTP date");
        assert!(later == parsed || later == parsed + Duration::from_secs(1), "{formatted} then {again}");
    }
}
