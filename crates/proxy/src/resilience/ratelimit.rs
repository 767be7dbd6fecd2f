//! Local rate limiting at the destination sidecar (RateLimitPolicy).
//!
//! Each policy has a token bucket (rate `requestsPerSecond`, size `burst`) per sidecar, plus
//! one per override. The bucket is GCRA (the generic cell rate algorithm, equivalent to a
//! token bucket): one atomic "theoretical arrival time" updated with compare-and-swap, so
//! taking a token never locks. Buckets are kept by `(policy, bucket index)` across config
//! reloads, and start afresh (full) when the policy's numbers change.
//!
//! The inbound proxy enforces the limit of its own Service's port ([`RateLimiters::own_limit`]):
//! the Service named by `--service`/`--namespace` (or, without it, the Service whose endpoint
//! is this sidecar's inbound listener), port chosen by which endpoint is this workload.

use foldhash::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use plexus_core::authz::Authorization;
use plexus_core::model::{CompiledPort, CompiledService, Endpoint};
use plexus_core::policy::RateLimit;
use plexus_core::{MeshSnapshot, ServiceName};

use crate::settings::Settings;

/// A token bucket of `burst` tokens refilled at `rate` per second, lock-free.
#[derive(Debug)]
pub struct TokenBucket {
    rate: u32,
    burst: u32,
    /// Nanoseconds per token (`None`: rate 0, nothing is ever let through).
    interval_ns: Option<u64>,
    /// How far ahead of now the arrival time may run: `burst` tokens' worth.
    capacity_ns: u64,
    base: Instant,
    /// GCRA's theoretical arrival time, in ns since `base`: the bucket is full again then.
    tat: AtomicU64,
}

impl TokenBucket {
    /// A full bucket. A `burst` of 0 holds one token (a bucket must hold one to let anything
    /// through).
    pub fn new(rate: u32, burst: u32) -> TokenBucket {
        let interval_ns = (rate > 0).then(|| 1_000_000_000 / u64::from(rate));
        let capacity_ns = interval_ns.unwrap_or(0).saturating_mul(u64::from(burst.max(1)));
        TokenBucket { rate, burst, interval_ns, capacity_ns, base: Instant::now(), tat: AtomicU64::new(0) }
    }

    /// Takes a token, or says how long until the next one.
    pub fn take(&self) -> Result<(), Duration> {
        self.take_at(Instant::now())
    }

    fn take_at(&self, now: Instant) -> Result<(), Duration> {
        let Some(interval) = self.interval_ns else { return Err(Duration::from_secs(1)) };
        let now = u64::try_from(now.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX);
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let next = tat.max(now).saturating_add(interval);
            if next - now > self.capacity_ns {
                return Err(Duration::from_nanos(next - now - self.capacity_ns));
            }
            match self.tat.compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }

    fn same_numbers(&self, rate: u32, burst: u32) -> bool {
        self.rate == rate && self.burst == burst
    }
}

/// The limit this sidecar enforces on requests for its application.
#[derive(Debug, Clone)]
pub struct OwnLimit {
    /// The Service's name (the `destination_service` label).
    pub service: String,
    pub limit: Arc<RateLimit>,
}

/// This sidecar's own Service port for one application port ([`own_port`]) as found in one
/// snapshot: what the inbound side reads per request (authorization, the rate limit).
#[derive(Debug)]
pub struct OwnPort {
    pub service: ServiceName,
    pub port: u16,
    pub authorization: Arc<Authorization>,
    pub rate_limit: Option<Arc<RateLimit>>,
}

/// Own-port lookups of one snapshot, by application port.
struct OwnCache {
    snapshot: Weak<MeshSnapshot>,
    found: Vec<(Option<u16>, Option<Arc<OwnPort>>)>,
}

/// At most this many application ports are remembered per snapshot.
const MAX_OWN_PORTS: usize = 16;

/// A policy's buckets: `None` is the shared one, `Some(i)` override `i`'s.
type PolicyBuckets = HashMap<Option<usize>, Arc<TokenBucket>>;

/// The buckets of every rate limit this sidecar enforces.
#[derive(Default)]
pub struct RateLimiters {
    /// By policy (`namespace/name`).
    buckets: RwLock<HashMap<String, PolicyBuckets>>,
    own: ArcSwapOption<OwnCache>,
}

impl RateLimiters {
    pub fn new() -> RateLimiters {
        RateLimiters::default()
    }

    /// Takes a token for one request under `limit` from a source with SPIFFE ID `identity`
    /// (its override's bucket, else the shared one); `Err(retry_after)` when exhausted.
    pub fn check(&self, limit: &RateLimit, identity: Option<&str>) -> Result<(), Duration> {
        let index = limit.override_for(identity);
        let (rate, burst) = match index.and_then(|i| limit.overrides.get(i)) {
            Some(o) => (o.requests_per_second, o.burst),
            None => (limit.requests_per_second, limit.burst),
        };
        self.bucket(&limit.policy, index, rate, burst).take()
    }

    fn bucket(&self, policy: &str, index: Option<usize>, rate: u32, burst: u32) -> Arc<TokenBucket> {
        if let Ok(map) = self.buckets.read()
            && let Some(b) = map.get(policy).and_then(|m| m.get(&index))
            && b.same_numbers(rate, burst)
        {
            return b.clone();
        }
        let Ok(mut map) = self.buckets.write() else { return Arc::new(TokenBucket::new(rate, burst)) };
        let slot = map
            .entry(policy.to_string())
            .or_default()
            .entry(index)
            .or_insert_with(|| Arc::new(TokenBucket::new(rate, burst)));
        if !slot.same_numbers(rate, burst) {
            *slot = Arc::new(TokenBucket::new(rate, burst));
        }
        slot.clone()
    }

    /// The rate limit of this sidecar's own Service port for requests to `app_port`.
    pub fn own_limit(
        &self,
        snapshot: &Arc<MeshSnapshot>,
        settings: &Settings,
        app_port: Option<u16>,
    ) -> Option<OwnLimit> {
        let own = self.own_port(snapshot, settings, app_port)?;
        let limit = own.rate_limit.clone()?;
        Some(OwnLimit { service: own.service.name.clone(), limit })
    }

    /// This sidecar's own Service port for requests to `app_port` ([`own_port`]), looked up
    /// once per snapshot and application port: a lookup makes the Service's name and scans
    /// its endpoints, and every inbound request needs the port's authorization and limit.
    pub fn own_port(
        &self,
        snapshot: &Arc<MeshSnapshot>,
        settings: &Settings,
        app_port: Option<u16>,
    ) -> Option<Arc<OwnPort>> {
        let cached = self.own.load();
        let current = cached.as_ref().filter(|c| std::ptr::eq(c.snapshot.as_ptr(), Arc::as_ptr(snapshot)));
        if let Some(hit) = current.and_then(|c| c.found.iter().find(|(p, _)| *p == app_port)) {
            return hit.1.clone();
        }
        let found = own_port(snapshot, settings, app_port).map(|(s, p)| {
            Arc::new(OwnPort {
                service: s.name.clone(),
                port: p.port,
                authorization: p.authorization.clone(),
                rate_limit: p.rate_limit.clone(),
            })
        });
        let mut entries = current.map(|c| c.found.clone()).unwrap_or_default();
        if entries.len() >= MAX_OWN_PORTS {
            entries.clear();
        }
        entries.push((app_port, found.clone()));
        self.own.store(Some(Arc::new(OwnCache { snapshot: Arc::downgrade(snapshot), found: entries })));
        found
    }
}

/// The Service port this sidecar serves for requests to the application port `app_port`.
///
/// The Service is `--service` in `--namespace`; its port is, in order of preference, one with
/// an endpoint at this sidecar's inbound listener (a meshed Workload, explicit mode), one with
/// an endpoint of this workload (`--workload`), one whose endpoints' application port is
/// `app_port` (transparent mode: endpoints are the pod's own ports), the Service port numbered
/// `app_port`, else the Service's only port. Without `--service`, the Service port with an
/// endpoint at this sidecar's inbound listener.
pub fn own_port<'a>(
    snapshot: &'a MeshSnapshot,
    settings: &Settings,
    app_port: Option<u16>,
) -> Option<(&'a CompiledService, &'a CompiledPort)> {
    let inbound = settings.inbound;
    let serves_app = |e: &Endpoint| app_port.is_none_or(|p| e.app_port == p);
    let at_inbound = |e: &Endpoint| {
        e.addr.port() == inbound.port()
            && (e.addr.ip() == inbound.ip() || inbound.ip().is_unspecified())
            && serves_app(e)
    };
    let Some(name) = &settings.service else {
        return snapshot
            .services
            .values()
            .flat_map(|s| s.ports.iter().map(move |p| (s, p)))
            .find(|(_, p)| p.endpoints.iter().any(at_inbound));
    };
    let service = snapshot.services.get(&ServiceName::new(name.as_str(), settings.namespace.as_str()))?;
    let with = |pred: &dyn Fn(&Endpoint) -> bool| service.ports.iter().find(|p| p.endpoints.iter().any(pred));
    let this_workload = |e: &Endpoint| {
        settings.workload.as_deref() == Some(&*e.workload) && e.namespace == settings.namespace && serves_app(e)
    };
    let port = with(&at_inbound)
        .or_else(|| with(&this_workload))
        .or_else(|| app_port.and_then(|a| with(&|e: &Endpoint| e.app_port == a)))
        .or_else(|| app_port.and_then(|a| service.ports.iter().find(|p| p.port == a)))
        .or_else(|| if service.ports.len() == 1 { service.ports.first() } else { None })?;
    Some((service, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_core::parse_documents;

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let b = TokenBucket::new(10, 5);
        let t0 = b.base;
        for i in 0..5 {
            assert!(b.take_at(t0).is_ok(), "burst token {i}");
        }
        let wait = b.take_at(t0).expect_err("empty");
        assert_eq!(wait, Duration::from_millis(100), "one token every 100 ms");
        assert!(b.take_at(t0 + Duration::from_millis(99)).is_err());
        assert!(b.take_at(t0 + Duration::from_millis(100)).is_ok());
        assert_eq!(b.take_at(t0 + Duration::from_millis(150)).expect_err("empty"), Duration::from_millis(50));
        // Over 10 s of 1 ms steps: the burst refills once, then exactly the rate.
        let t1 = t0 + Duration::from_secs(100);
        let taken = (0..10_000).filter(|ms| b.take_at(t1 + Duration::from_millis(*ms)).is_ok()).count();
        assert_eq!(taken, 5 + 99, "a full bucket, then one token every 100 ms from 100 ms to 9.9 s");
        assert!(TokenBucket::new(0, 5).take().is_err(), "rate 0 lets nothing through");
        let one = TokenBucket::new(1, 0);
        assert!(one.take_at(one.base).is_ok() && one.take_at(one.base).is_err(), "burst 0 holds one token");
    }

    #[test]
    fn bucket_is_exact_under_contention() {
        let b = Arc::new(TokenBucket::new(1, 1000));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || (0..1000).filter(|_| b.take().is_ok()).count())
            })
            .collect();
        let total: usize = threads.into_iter().map(|t| t.join().expect("thread")).sum();
        assert!((1000..=1001).contains(&total), "{total} tokens taken from a bucket of 1000");
    }

    fn limit(policy: &str, rps: u32, burst: u32) -> RateLimit {
        RateLimit {
            policy: policy.into(),
            requests_per_second: rps,
            burst,
            overrides: vec![plexus_core::policy::RateLimitOverride {
                identities: vec!["spiffe://cluster.local/ns/default/sa/batch".into()],
                requests_per_second: 1,
                burst: 1,
            }],
        }
    }

    #[test]
    fn buckets_survive_reloads_and_reset_on_new_numbers() {
        let r = RateLimiters::new();
        let l = limit("default/rl", 1, 2);
        assert!(r.check(&l, None).is_ok());
        assert!(r.check(&l, None).is_ok());
        assert!(r.check(&l, None).is_err());
        assert!(r.check(&limit("default/rl", 1, 2), None).is_err(), "same policy after a reload: same bucket");
        assert!(r.check(&limit("default/other", 1, 2), None).is_ok(), "another policy, another bucket");
        let batch = Some("spiffe://cluster.local/ns/default/sa/batch");
        assert!(r.check(&l, batch).is_ok(), "an override has its own bucket");
        assert!(r.check(&l, batch).is_err());
        assert!(r.check(&limit("default/rl", 1, 3), None).is_ok(), "new numbers: a new, full bucket");
    }

    fn snapshot(yaml: &str) -> Arc<MeshSnapshot> {
        Arc::new(MeshSnapshot::compile(&parse_documents("t", yaml).expect("valid"), "1"))
    }

    const MESH: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: api}
spec:
  selector: {app: api}
  ports: [{name: http, port: 80}, {name: admin, port: 9000}]
---
apiVersion: plexus.dev/v1alpha1
kind: Workload
metadata: {name: api-1, labels: {app: api}}
spec: {address: 127.0.0.1, ports: [{name: http, port: 7711, targetPort: 8080}, {name: admin, port: 7711, targetPort: 9001}], meshed: true}
---
apiVersion: plexus.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: api-limit}
spec:
  targetRef: {kind: Service, name: api, port: 80}
  requestsPerSecond: 5
"#;

    #[test]
    fn finds_its_own_service_port() {
        let snap = snapshot(MESH);
        let mut settings = Settings {
            inbound: "127.0.0.1:7711".parse().expect("addr"),
            service: Some("api".into()),
            ..Settings::default()
        };
        let port = |settings: &Settings, app: Option<u16>| own_port(&snap, settings, app).map(|(_, p)| p.port);
        assert_eq!(port(&settings, Some(8080)), Some(80));
        assert_eq!(port(&settings, Some(9001)), Some(9000));
        settings.service = None;
        assert_eq!(port(&settings, Some(9001)), Some(9000), "found by its inbound listener");
        settings.inbound = "127.0.0.1:1".parse().expect("addr");
        assert_eq!(port(&settings, Some(8080)), None);
        settings.service = Some("api".into());
        assert_eq!(port(&settings, Some(8080)), Some(80), "found by the application port");
        assert_eq!(port(&settings, Some(80)), Some(80), "by the Service port number");
        settings.namespace = "prod".into();
        assert_eq!(port(&settings, Some(8080)), None, "another namespace's Service");

        let r = RateLimiters::new();
        settings.namespace = "default".into();
        let own = r.own_limit(&snap, &settings, Some(8080)).expect("limited");
        assert_eq!((own.service.as_str(), own.limit.policy.as_str()), ("api", "default/api-limit"));
        assert!(r.own_limit(&snap, &settings, Some(9001)).is_none(), "the admin port is not limited");
        assert!(r.own_limit(&snap, &settings, Some(8080)).is_some(), "cached");
        let without =
            snapshot(&MESH.replace("RateLimitPolicy", "ResiliencePolicy").replace("requestsPerSecond: 5", ""));
        assert!(r.own_limit(&without, &settings, Some(8080)).is_none(), "a new snapshot is looked at again");
    }
}
