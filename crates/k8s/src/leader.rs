//! Leader election on the coordination.k8s.io/v1 Lease `plexus-control` in `plexus-system`:
//! singleton duties (status write-back, [`crate::status`]) run only on the leader; every
//! replica serves proxies.
//!
//! The usual Lease protocol (as client-go's leaderelection): the holder renews `renewTime`
//! every `renew_interval`; another replica takes the Lease over once `renewTime` is older than
//! `leaseDurationSeconds`. Every write carries the `resourceVersion` it read, so two replicas
//! never both win (the API server refuses the second with a conflict). A leader that cannot
//! renew for a whole lease duration steps down by itself, before anyone can take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

/// Who holds which Lease, for how long.
#[derive(Debug, Clone)]
pub struct LeaderSettings {
    pub namespace: String,
    pub name: String,
    /// This replica (its pod name).
    pub identity: String,
    /// A Lease not renewed for this long may be taken over.
    pub lease_duration: Duration,
    /// How often the holder renews (and the others look).
    pub renew_interval: Duration,
}

impl LeaderSettings {
    /// The Lease `plexus-control` in `plexus-system`, as `identity`.
    pub fn new(identity: String, lease_duration: Duration, renew_interval: Duration) -> LeaderSettings {
        LeaderSettings {
            namespace: crate::install::NAMESPACE.into(),
            name: crate::install::CONTROL.into(),
            identity,
            lease_duration,
            renew_interval,
        }
    }
}

/// What one look at the Lease decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Write this spec (create, renew or take over).
    Claim(Box<LeaseSpec>),
    /// Someone else holds it.
    Follow { holder: String },
}

/// The pure part: what to do about `current` (None: no Lease yet) at `now`.
pub fn decide(current: Option<&LeaseSpec>, settings: &LeaderSettings, now: Timestamp) -> Decision {
    let me = settings.identity.as_str();
    let duration = i32::try_from(settings.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let claim = |acquire: Option<MicroTime>, transitions: i32| {
        Decision::Claim(Box::new(LeaseSpec {
            holder_identity: Some(me.to_string()),
            lease_duration_seconds: Some(duration),
            acquire_time: acquire.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }))
    };
    let Some(spec) = current else { return claim(None, 0) };
    let transitions = spec.lease_transitions.unwrap_or(0);
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == me => claim(spec.acquire_time.clone(), transitions),
        Some(holder) if !holder.is_empty() => {
            let held_for = spec.lease_duration_seconds.unwrap_or(duration).max(1);
            let expired = spec
                .renew_time
                .as_ref()
                .is_none_or(|renewed| now.as_second() > renewed.0.as_second().saturating_add(i64::from(held_for)));
            if expired {
                claim(None, transitions.saturating_add(1))
            } else {
                Decision::Follow { holder: holder.to_string() }
            }
        }
        _ => claim(None, transitions.saturating_add(1)),
    }
}

/// Runs the election until the task is dropped, publishing whether this replica leads.
pub async fn run(client: kube::Client, settings: LeaderSettings, leading: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let mut last_renewal: Option<tokio::time::Instant> = None;
    loop {
        let outcome = step(&api, &settings).await;
        match outcome {
            Ok(true) => {
                last_renewal = Some(tokio::time::Instant::now());
                if !*leading.borrow() {
                    tracing::info!(identity = %settings.identity, lease = %settings.name, "became the leader");
                }
                leading.send_if_modified(|l| !std::mem::replace(l, true));
            }
            Ok(false) => {
                last_renewal = None;
                if leading.send_if_modified(|l| std::mem::replace(l, false)) {
                    tracing::info!(identity = %settings.identity, "lost the leadership");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, lease = %settings.name, "leader election: cannot read or write the Lease");
                // Step down before another replica may take over.
                let stale = last_renewal
                    .is_none_or(|t| t.elapsed() >= settings.lease_duration.saturating_sub(settings.renew_interval));
                if stale && leading.send_if_modified(|l| std::mem::replace(l, false)) {
                    tracing::warn!(identity = %settings.identity, "stepped down: the Lease could not be renewed");
                }
            }
        }
        tokio::time::sleep(settings.renew_interval).await;
    }
}

/// One look at the Lease: `Ok(true)` when this replica holds it afterwards.
async fn step(api: &Api<Lease>, settings: &LeaderSettings) -> Result<bool, kube::Error> {
    let current = api.get_opt(&settings.name).await?;
    let decision = decide(current.as_ref().and_then(|l| l.spec.as_ref()), settings, Timestamp::now());
    let Decision::Claim(spec) = decision else { return Ok(false) };
    let result = match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(settings.name.clone()),
                    namespace: Some(settings.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(*spec),
            };
            api.create(&PostParams::default(), &lease).await
        }
        Some(mut lease) => {
            // The resourceVersion read above makes this a compare-and-swap.
            lease.spec = Some(*spec);
            api.replace(&settings.name, &PostParams::default(), &lease).await
        }
    };
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(me: &str) -> LeaderSettings {
        LeaderSettings::new(me.into(), Duration::from_secs(15), Duration::from_secs(5))
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).expect("time")
    }

    fn held(by: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(by.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(renewed))),
            acquire_time: Some(MicroTime(at(100))),
            lease_transitions: Some(2),
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_is_claimed_renewed_followed_and_taken_over_when_expired() {
        let Decision::Claim(first) = decide(None, &settings("a"), at(1000)) else { panic!("no lease: claim") };
        assert_eq!(first.holder_identity.as_deref(), Some("a"));
        assert_eq!(first.lease_duration_seconds, Some(15));

        let Decision::Claim(renewed) = decide(Some(&held("a", 1000)), &settings("a"), at(1005)) else {
            panic!("the holder renews")
        };
        assert_eq!(renewed.renew_time, Some(MicroTime(at(1005))));
        assert_eq!(renewed.acquire_time, Some(MicroTime(at(100))), "acquired once");
        assert_eq!(renewed.lease_transitions, Some(2), "no transition");

        assert_eq!(
            decide(Some(&held("a", 1000)), &settings("b"), at(1010)),
            Decision::Follow { holder: "a".into() },
            "held and fresh"
        );
        assert_eq!(
            decide(Some(&held("a", 1000)), &settings("b"), at(1015)),
            Decision::Follow { holder: "a".into() },
            "exactly at the duration: still held"
        );
        let Decision::Claim(taken) = decide(Some(&held("a", 1000)), &settings("b"), at(1016)) else {
            panic!("expired: taken over")
        };
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.lease_transitions, Some(3));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(1016))));

        let released = LeaseSpec { holder_identity: Some(String::new()), ..held("a", 1000) };
        assert!(matches!(decide(Some(&released), &settings("b"), at(1001)), Decision::Claim(_)), "released");
    }
}
