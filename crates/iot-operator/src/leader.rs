//! Leader election on a `coordination.k8s.io/v1` Lease, so that `replicas: 2` (and a
//! rolling update, where old and new pods overlap) never has two writers of KV and
//! `.status`.
//!
//! Acquiring and renewing is `kube-lease-manager`'s (server-side apply, conflict
//! detection). On top of it this module adds the rule that makes a lease safe to
//! lean on: a leader that cannot *confirm* it still holds the lease steps down. The
//! library reports a lost lease only when it reads one; if the API server stops
//! answering, it retries and keeps quiet. So a watchdog reads the Lease itself and
//! steps down shortly before the last hold it saw expires (by this replica's
//! clock), before another replica may take it over.
//!
//! Losing leadership ends the process (non-zero): the controller, caches and
//! indexes are not built to be paused, and a restarted pod comes back as a standby.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};

/// Where and how long the lease is held.
#[derive(Debug, Clone)]
pub struct LeaderElection {
    pub namespace: String,
    pub lease_name: String,
    /// Unique per replica: the pod name in a cluster.
    pub identity: String,
    /// A lease not renewed for this long may be taken over.
    pub duration: Duration,
    /// The holder renews this long before expiry; also the clock skew tolerated.
    pub grace: Duration,
}

impl LeaderElection {
    /// Rejects settings the lease cannot honour (checked before anything starts).
    pub fn validate(&self) -> Result<(), String> {
        if self.duration.as_secs() < 2 {
            return Err(format!("lease duration {:?} is under 2 s", self.duration));
        }
        if self.grace.is_zero() || self.grace >= self.duration {
            return Err(format!(
                "lease grace {:?} must be above 0 and below the lease duration {:?}",
                self.grace, self.duration
            ));
        }
        if self.identity.is_empty() {
            return Err("leader identity is empty (set POD_NAME or --leader-identity)".to_owned());
        }
        Ok(())
    }
}

/// What one read of the Lease says about this replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Held by `me` and, by our clock, unexpired until the given time.
    Ours { until: DateTime<Utc> },
    /// Held by someone else, or by nobody, or expired.
    NotOurs,
}

/// The pure rule: is this lease, read at `now`, still ours?
pub fn hold_of(lease: &Lease, me: &str, now: DateTime<Utc>) -> Hold {
    let Some(spec) = &lease.spec else { return Hold::NotOurs };
    if spec.holder_identity.as_deref() != Some(me) {
        return Hold::NotOurs;
    }
    let (Some(renewed), Some(secs)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return Hold::NotOurs;
    };
    let until_us = renewed.0.as_microsecond() + i64::from(secs) * 1_000_000;
    match DateTime::from_timestamp_micros(until_us) {
        Some(until) if until > now => Hold::Ours { until },
        _ => Hold::NotOurs,
    }
}

/// This replica holds the lease. [`Leadership::lost`] resolves when it no longer
/// does (or can no longer tell); [`Leadership::release`] hands it over at shutdown.
pub struct Leadership {
    manager: Arc<LeaseManager>,
    cfg: LeaderElection,
    leases: Api<Lease>,
}

/// Blocks until this replica holds the lease. Errors only on settings that can
/// never work; API errors while waiting are retried.
pub async fn acquire(client: kube::Client, cfg: LeaderElection) -> anyhow::Result<Leadership> {
    cfg.validate().map_err(|e| anyhow::anyhow!(e))?;
    tracing::info!(lease = %cfg.lease_name, namespace = %cfg.namespace, identity = %cfg.identity, "standby: waiting for the leader lease");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let manager = loop {
        let manager = build_manager(&client, &cfg).await;
        // The library sleeps until the holder's lease would expire, from what it
        // last read. A holder that stops cleanly releases the lease first; watching
        // for that and starting over with a fresh manager turns a rollout's
        // handover from up to a lease duration into about a second.
        tokio::select! {
            () = until_leader(&manager) => break manager,
            () = released(&leases, &cfg.lease_name) => {
                tracing::debug!("the leader lease was released; trying to take it");
            }
        }
    };
    tracing::info!(lease = %cfg.lease_name, identity = %cfg.identity, "acquired the leader lease");
    Ok(Leadership {
        manager: Arc::new(manager),
        cfg,
        leases,
    })
}

async fn build_manager(client: &kube::Client, cfg: &LeaderElection) -> LeaseManager {
    let secs = |d: Duration| d.as_secs().max(1);
    loop {
        match LeaseManagerBuilder::new(client.clone(), &cfg.lease_name)
            .with_namespace(&cfg.namespace)
            .with_identity(&cfg.identity)
            .with_duration(secs(cfg.duration))
            .with_grace(secs(cfg.grace))
            .with_field_manager(format!("iot-operator-{}", cfg.identity))
            .build()
            .await
        {
            Ok(m) => return m,
            Err(e) => {
                tracing::warn!(error = %e, lease = %cfg.lease_name, namespace = %cfg.namespace, "cannot set up the leader lease; retrying in 2 s");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

async fn until_leader(manager: &LeaseManager) {
    loop {
        match manager.changed().await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "leader lease: API error while waiting; retrying in 2 s");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Resolves once the Lease exists with no holder (released), polling every second.
async fn released(leases: &Api<Lease>, name: &str) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok(Some(lease)) = leases.get_opt(name).await
            && lease.spec.and_then(|s| s.holder_identity).is_none_or(|h| h.is_empty())
        {
            return;
        }
    }
}

impl Leadership {
    /// Keeps the lease renewed; resolves with the reason once it is lost or can no
    /// longer be confirmed. Call once.
    pub async fn lost(&self) -> anyhow::Error {
        let check_every = (self.cfg.grace / 2).max(Duration::from_millis(500));
        // Step down a little before the last confirmed hold expires by our clock, so
        // a standby (which waits for expiry by its clock) never overlaps with us.
        let safety = (self.cfg.grace / 4).max(Duration::from_millis(250));
        let mut deadline = tokio::time::Instant::now() + self.cfg.duration.saturating_sub(safety);
        let renew = async {
            loop {
                match self.manager.changed().await {
                    Ok(true) => {}
                    Ok(false) => return anyhow::anyhow!("another replica took the leader lease"),
                    Err(e) => {
                        // The watchdog below decides when an unrenewed lease is lost.
                        tracing::warn!(error = %e, "cannot renew the leader lease; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        };
        tokio::pin!(renew);
        let mut tick = tokio::time::interval(check_every);
        loop {
            tokio::select! {
                e = &mut renew => return e,
                _ = tick.tick() => {
                    match tokio::time::timeout(check_every, self.leases.get(&self.cfg.lease_name)).await {
                        Ok(Ok(lease)) => {
                            let now = Utc::now();
                            match hold_of(&lease, &self.cfg.identity, now) {
                                Hold::Ours { until } => {
                                    let left = (until - now).to_std().unwrap_or_default();
                                    deadline = tokio::time::Instant::now() + left.saturating_sub(safety);
                                }
                                Hold::NotOurs => return anyhow::anyhow!("the leader lease is no longer ours"),
                            }
                        }
                        Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the leader lease"),
                        Err(_) => tracing::warn!("reading the leader lease timed out"),
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return anyhow::anyhow!("could not confirm the leader lease before it expires; stepping down");
                    }
                }
            }
        }
    }

    /// Gives the lease up so a standby takes over at once rather than after expiry.
    pub async fn release(&self) {
        match tokio::time::timeout(Duration::from_secs(3), self.manager.release()).await {
            Ok(Ok(())) => tracing::info!(lease = %self.cfg.lease_name, "released the leader lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot release the leader lease; it expires on its own"),
            Err(_) => tracing::warn!("releasing the leader lease timed out; it expires on its own"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(holder: Option<&str>, renewed: Option<DateTime<Utc>>, secs: Option<i32>) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                renew_time: renewed.and_then(|t| {
                    k8s_openapi::jiff::Timestamp::from_microsecond(t.timestamp_micros())
                        .ok()
                        .map(MicroTime)
                }),
                lease_duration_seconds: secs,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_fresh_hold_by_me_is_mine_until_renew_plus_duration() {
        // Lease times have microsecond precision.
        let now = DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).expect("in range");
        let l = lease(Some("a"), Some(now - chrono::Duration::seconds(3)), Some(15));
        assert_eq!(
            hold_of(&l, "a", now),
            Hold::Ours {
                until: now + chrono::Duration::seconds(12)
            }
        );
    }

    #[test]
    fn another_holder_an_expired_hold_or_missing_fields_are_not_mine() {
        let now = Utc::now();
        assert_eq!(hold_of(&lease(Some("b"), Some(now), Some(15)), "a", now), Hold::NotOurs);
        assert_eq!(
            hold_of(
                &lease(Some("a"), Some(now - chrono::Duration::seconds(15)), Some(15)),
                "a",
                now
            ),
            Hold::NotOurs
        );
        assert_eq!(hold_of(&lease(None, Some(now), Some(15)), "a", now), Hold::NotOurs);
        assert_eq!(hold_of(&lease(Some("a"), None, Some(15)), "a", now), Hold::NotOurs);
        assert_eq!(hold_of(&lease(Some("a"), Some(now), None), "a", now), Hold::NotOurs);
        assert_eq!(hold_of(&Lease::default(), "a", now), Hold::NotOurs);
    }

    #[test]
    fn settings_that_cannot_work_are_rejected() {
        let ok = LeaderElection {
            namespace: "ns".into(),
            lease_name: "iot-operator".into(),
            identity: "pod-a".into(),
            duration: Duration::from_secs(15),
            grace: Duration::from_secs(5),
        };
        assert!(ok.validate().is_ok());
        let mut bad = ok.clone();
        bad.grace = Duration::from_secs(15);
        assert!(bad.validate().expect_err("rejected").contains("grace"));
        let mut bad = ok.clone();
        bad.identity.clear();
        assert!(bad.validate().expect_err("rejected").contains("identity"));
        let mut bad = ok;
        bad.duration = Duration::from_secs(1);
        assert!(bad.validate().expect_err("rejected").contains("duration"));
    }
}
