//! Circuit breaking: ResiliencePolicy `connectionLimits` per destination Service port, kept by
//! each client proxy.
//!
//! At most `maxConnections` requests are in flight to the port (with HTTP/1 endpoints, that
//! bounds the upstream connections too); up to `maxPendingRequests` more wait, in arrival
//! order, for one of them to finish; any further request is refused at once with
//! [`ProxyError::Overloaded`] (503, `x-plexus-error: circuit open: ...`). With
//! `maxPendingRequests: 0` a request is refused as soon as all slots are taken.
//!
//! A tokio `Semaphore` cannot shrink below the permits it has handed out nor bound its
//! waiters, and the limits change with the policy at run time, so the limiter is a small
//! counter pair under a mutex plus a [`Notify`] for the waiters.

use foldhash::HashMap;
use std::sync::{Arc, Mutex};

use plexus_core::ServiceName;
use plexus_core::policy::ConnectionLimits;
use tokio::sync::Notify;

use crate::error::ProxyError;

/// The connection limiters of every destination Service port, kept across config reloads.
#[derive(Default)]
pub struct Limits {
    limiters: Mutex<HashMap<(ServiceName, u16), Arc<Limiter>>>,
}

/// One Service port's limiter.
#[derive(Default)]
struct Limiter {
    state: Mutex<State>,
    freed: Notify,
}

#[derive(Debug, Default)]
struct State {
    max_in_flight: u32,
    max_pending: u32,
    in_flight: u32,
    pending: u32,
}

/// A slot taken from a limiter; dropping it frees the slot.
#[must_use = "the slot is freed when the permit is dropped"]
pub struct LimitPermit {
    limiter: Option<Arc<Limiter>>,
}

impl LimitPermit {
    /// A permit that limits nothing (no `maxConnections`).
    pub fn unlimited() -> LimitPermit {
        LimitPermit { limiter: None }
    }

    /// Whether this permit holds a slot (so it must live as long as the response body).
    pub fn limits(&self) -> bool {
        self.limiter.is_some()
    }
}

impl Drop for LimitPermit {
    fn drop(&mut self) {
        if let Some(l) = self.limiter.take() {
            if let Ok(mut s) = l.state.lock() {
                s.in_flight = s.in_flight.saturating_sub(1);
            }
            l.freed.notify_one();
        }
    }
}

/// Counts a waiting request out of `pending` if its wait ends without a slot (the request
/// was given up, e.g. by a timeout dropping the future).
struct Waiting<'a> {
    limiter: &'a Limiter,
    admitted: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.admitted {
            return;
        }
        if let Ok(mut s) = self.limiter.state.lock() {
            s.pending = s.pending.saturating_sub(1);
        }
        // A slot this waiter may have been woken for goes to the next one.
        self.limiter.freed.notify_one();
    }
}

impl Limits {
    pub fn new() -> Limits {
        Limits::default()
    }

    /// Takes a slot for one request to `service:port` under `limits`: at once when one is
    /// free, after waiting when fewer than `max_pending_requests` already wait, else refused.
    /// Without `max_connections` nothing is limited.
    pub async fn acquire(
        &self,
        service: &ServiceName,
        port: u16,
        limits: &ConnectionLimits,
    ) -> Result<LimitPermit, ProxyError> {
        let Some(max) = limits.max_connections else {
            return Ok(LimitPermit::unlimited());
        };
        let limiter = self.limiter(service, port);
        {
            let mut s = limiter.state.lock().map_err(|_| overloaded(service, port))?;
            if s.max_in_flight != max || s.max_pending != limits.max_pending_requests {
                let grew = max > s.max_in_flight;
                s.max_in_flight = max;
                s.max_pending = limits.max_pending_requests;
                if grew {
                    // New slots: let every waiter look again.
                    limiter.freed.notify_waiters();
                }
            }
            // Waiters go first: a new request only takes a free slot when nobody waits.
            if s.in_flight < s.max_in_flight && s.pending == 0 {
                s.in_flight += 1;
                return Ok(LimitPermit { limiter: Some(limiter.clone()) });
            }
            if s.pending >= s.max_pending {
                return Err(overloaded(service, port));
            }
            s.pending += 1;
        }
        let mut waiting = Waiting { limiter: &limiter, admitted: false };
        loop {
            let freed = limiter.freed.notified();
            tokio::pin!(freed);
            // Registered before looking, so a slot freed in between is not missed.
            freed.as_mut().enable();
            {
                let mut s = limiter.state.lock().map_err(|_| overloaded(service, port))?;
                if s.in_flight < s.max_in_flight {
                    s.in_flight += 1;
                    s.pending = s.pending.saturating_sub(1);
                    waiting.admitted = true;
                    return Ok(LimitPermit { limiter: Some(limiter.clone()) });
                }
            }
            freed.await;
        }
    }

    fn limiter(&self, service: &ServiceName, port: u16) -> Arc<Limiter> {
        let Ok(mut map) = self.limiters.lock() else { return Arc::default() };
        map.entry((service.clone(), port)).or_default().clone()
    }

    /// Requests in flight and waiting for `service:port` (for tests and diagnostics).
    pub fn usage(&self, service: &ServiceName, port: u16) -> (u32, u32) {
        let Ok(map) = self.limiters.lock() else { return (0, 0) };
        map.get(&(service.clone(), port))
            .and_then(|l| l.state.lock().ok().map(|s| (s.in_flight, s.pending)))
            .unwrap_or((0, 0))
    }

    /// Forgets the limiters of Service ports no longer configured with limits. A limiter
    /// with requests in flight or waiting is kept, so its count stays right.
    pub fn retain(&self, live: impl Fn(&ServiceName, u16) -> bool) {
        if let Ok(mut map) = self.limiters.lock() {
            map.retain(|(s, p), l| live(s, *p) || l.state.lock().map(|s| s.in_flight + s.pending > 0).unwrap_or(false));
        }
    }
}

fn overloaded(service: &ServiceName, port: u16) -> ProxyError {
    ProxyError::Overloaded(format!("too many pending requests to {service}:{port}"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(max: u32, pending: u32) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: Some(max),
            max_pending_requests: pending,
            max_requests_per_connection: None,
        }
    }

    fn svc() -> ServiceName {
        ServiceName::new("slow", "default")
    }

    #[tokio::test]
    async fn refuses_at_once_when_full_without_pending() {
        let l = Limits::new();
        let a = l.acquire(&svc(), 80, &limits(2, 0)).await.expect("first");
        let b = l.acquire(&svc(), 80, &limits(2, 0)).await.expect("second");
        let err = l.acquire(&svc(), 80, &limits(2, 0)).await.err().expect("third is refused");
        assert_eq!(err.status(), 503);
        assert_eq!(err.to_string(), "circuit open: too many pending requests to slow.default:80");
        assert!(l.acquire(&svc(), 81, &limits(2, 0)).await.is_ok(), "another port has its own limit");
        drop(a);
        let c = l.acquire(&svc(), 80, &limits(2, 0)).await.expect("a freed slot is reused");
        assert_eq!(l.usage(&svc(), 80), (2, 0));
        drop((b, c));
        assert_eq!(l.usage(&svc(), 80), (0, 0));
    }

    #[tokio::test]
    async fn pending_requests_wait_in_order_up_to_the_limit() {
        let l = Arc::new(Limits::new());
        let held = l.acquire(&svc(), 80, &limits(1, 2)).await.expect("first");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for i in 0..2 {
            let (waiter, order) = (l.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let p = waiter.acquire(&svc(), 80, &limits(1, 2)).await.expect("waits for a slot");
                order.lock().expect("order").push(i);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(p);
            }));
            while l.usage(&svc(), 80).1 < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(l.usage(&svc(), 80), (1, 2));
        assert!(l.acquire(&svc(), 80, &limits(1, 2)).await.is_err(), "a third waiter is refused");
        drop(held);
        for w in waiters {
            w.await.expect("waiter");
        }
        assert_eq!(*order.lock().expect("order"), [0, 1]);
        assert_eq!(l.usage(&svc(), 80), (0, 0));
    }

    #[tokio::test]
    async fn a_given_up_wait_frees_its_place() {
        let l = Limits::new();
        let held = l.acquire(&svc(), 80, &limits(1, 1)).await.expect("first");
        let timed_out = tokio::time::timeout(Duration::from_millis(20), l.acquire(&svc(), 80, &limits(1, 1))).await;
        assert!(timed_out.is_err(), "waits while the slot is held");
        assert_eq!(l.usage(&svc(), 80), (1, 0), "the abandoned wait is no longer pending");
        drop(held);
        let _p = l.acquire(&svc(), 80, &limits(1, 1)).await.expect("slot");
    }

    #[tokio::test]
    async fn new_limits_apply_at_once() {
        let l = Arc::new(Limits::new());
        let held = l.acquire(&svc(), 80, &limits(1, 5)).await.expect("first");
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.acquire(&svc(), 80, &limits(1, 5)).await.map(drop).is_ok() })
        };
        while l.usage(&svc(), 80).1 < 1 {
            tokio::task::yield_now().await;
        }
        // The policy now allows 3 in flight: the waiter and a newcomer get in while `held` stays.
        let _newcomer = l.acquire(&svc(), 80, &limits(3, 5)).await;
        assert!(tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").expect("task"));
        // Shrunk to 1 with one in flight: full.
        assert!(l.acquire(&svc(), 80, &limits(1, 0)).await.is_err());
        drop(held);
        let unlimited = ConnectionLimits { max_connections: None, ..limits(0, 0) };
        assert!(l.acquire(&svc(), 80, &unlimited).await.is_ok(), "no maxConnections: no limit");
    }
}
