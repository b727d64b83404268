//! Leader election on a `coordination.k8s.io/v1` Lease, so that `replicas: 2` (and a
//! rolling update, where old and new pods overlap) never has two writers of KV and
//! `.status`.
//!
//! Acquiring and renewing is `kube-lease-manager`'s (server-side apply, conflict
//! detection). On top of it this module adds what makes a lease safe to lean on:
//! - **A watchdog.** The library reports a lost lease only when it reads one; if
//!   the API server stops answering it retries and keeps quiet. The watchdog reads
//!   the Lease itself, and if it cannot confirm its own hold it declares the lease
//!   lost `safety` before the last confirmed hold expires by this replica's clock.
//!   `safety` (half the renew grace) is the clock skew between replicas tolerated.
//! - **A checked acquisition.** The library counts a Lease that names us as ours
//!   even when it has expired (a restarted pod keeps its name); leadership starts
//!   only once a read shows an unexpired hold, and the watchdog starts from it.
//! - **A guarded release.** Released only at a clean stop, with a JSON patch that
//!   first tests that the holder is still us, so it can never clear another
//!   replica's hold.
//!
//! Losing leadership ends the process at once (see `run`): the controller, caches
//! and indexes are not built to be paused, and a restarted pod comes back as a
//! standby.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::time::Instant;

/// Where and how long the lease is held.
#[derive(Debug, Clone)]
pub struct LeaderElection {
    pub namespace: String,
    pub lease_name: String,
    /// Unique per replica: the pod name in a cluster.
    pub identity: String,
    /// A lease not renewed for this long may be taken over. Whole seconds (the
    /// Lease stores seconds).
    pub duration: Duration,
    /// The holder renews this long before expiry. Whole seconds.
    pub grace: Duration,
}

impl LeaderElection {
    /// Rejects settings the lease cannot honour (checked before anything starts).
    pub fn validate(&self) -> Result<(), String> {
        if self.duration.subsec_nanos() != 0 || self.grace.subsec_nanos() != 0 {
            return Err(format!(
                "lease duration {:?} and renew grace {:?} must be whole seconds",
                self.duration, self.grace
            ));
        }
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

    /// How long before the last confirmed hold expires the leader gives up: the
    /// clock skew between replicas this tolerates.
    pub fn safety(&self) -> Duration {
        self.grace / 2
    }

    /// How often the leader reads the Lease to confirm its hold: at least twice
    /// between a renewal (at `grace` before expiry) and the step-down point.
    fn check_every(&self) -> Duration {
        (self.grace / 4).max(Duration::from_millis(250))
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

/// The monotonic instant at which a hold confirmed until `until` must be given up.
fn step_down_at(until: DateTime<Utc>, now: DateTime<Utc>, safety: Duration) -> Instant {
    let left = (until - now).to_std().unwrap_or_default();
    Instant::now() + left.saturating_sub(safety)
}

/// This replica holds the lease. [`Leadership::lost`] resolves when it no longer
/// does (or can no longer tell); [`Leadership::release`] hands it over at a clean stop.
pub struct Leadership {
    manager: LeaseManager,
    cfg: LeaderElection,
    leases: Api<Lease>,
    /// The step-down point of the hold confirmed at acquisition.
    first_deadline: Instant,
}

/// How a standby is doing, for its readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standby {
    /// The Lease is readable and writable; waiting for it.
    Waiting,
    /// The Lease cannot be set up or taken (RBAC, namespace, API errors).
    Broken(String),
}

/// Why this replica cannot lead, or stopped leading.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("leader election settings: {0}")]
    Settings(String),
    #[error("another replica took the leader lease")]
    TakenOver,
    #[error("the leader lease is no longer ours")]
    NotOurs,
    #[error("could not confirm the leader lease before it expires; stepping down")]
    Unconfirmed,
}

/// Blocks until this replica holds the lease, reporting its standby state through
/// `report` (a standby that can never lead must not look healthy). Errors only on
/// settings that can never work.
pub async fn acquire(
    client: kube::Client,
    cfg: LeaderElection,
    report: impl Fn(Standby),
) -> Result<Leadership, LeaderError> {
    cfg.validate().map_err(LeaderError::Settings)?;
    tracing::info!(lease = %cfg.lease_name, namespace = %cfg.namespace, identity = %cfg.identity, "standby: waiting for the leader lease");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    loop {
        let manager = build_manager(&client, &cfg, &report).await;
        report(Standby::Waiting);
        // The library sleeps until the holder's lease would expire, from what it
        // last read. A holder that stops cleanly releases the lease first; watching
        // for that and starting over with a fresh manager turns a rollout's
        // handover from up to a lease duration into about a second.
        let won = tokio::select! {
            () = until_leader(&manager, &report) => true,
            () = released(&leases, &cfg.lease_name) => {
                tracing::debug!("the leader lease was released; trying to take it");
                false
            }
        };
        if !won {
            continue;
        }
        // The library also says "ours" for an expired hold in our name; wait for a
        // read that shows the renewed, unexpired hold (it renews such a hold at once).
        let confirm_by = Instant::now() + cfg.grace;
        let confirmed = loop {
            let read = tokio::time::timeout(cfg.check_every(), leases.get(&cfg.lease_name)).await;
            if let Ok(Ok(lease)) = read {
                let now = Utc::now();
                if let Hold::Ours { until } = hold_of(&lease, &cfg.identity, now) {
                    break Some(step_down_at(until, now, cfg.safety()));
                }
            }
            if Instant::now() >= confirm_by {
                break None;
            }
            let renew = manager.changed();
            if tokio::time::timeout(Duration::from_millis(200), renew)
                .await
                .is_ok_and(|r| r.is_ok_and(|held| !held))
            {
                break None;
            }
        };
        match confirmed {
            Some(first_deadline) => {
                tracing::info!(lease = %cfg.lease_name, identity = %cfg.identity, "acquired the leader lease");
                return Ok(Leadership {
                    manager,
                    cfg,
                    leases,
                    first_deadline,
                });
            }
            None => tracing::warn!("the library reported the lease as ours but no read confirmed it; starting over"),
        }
    }
}

async fn build_manager(client: &kube::Client, cfg: &LeaderElection, report: &impl Fn(Standby)) -> LeaseManager {
    loop {
        match LeaseManagerBuilder::new(client.clone(), &cfg.lease_name)
            .with_namespace(&cfg.namespace)
            .with_identity(&cfg.identity)
            .with_duration(cfg.duration.as_secs())
            .with_grace(cfg.grace.as_secs())
            .with_field_manager(format!("iot-operator-{}", cfg.identity))
            .build()
            .await
        {
            Ok(m) => return m,
            Err(e) => {
                report(Standby::Broken(format!("cannot set up the leader lease: {e}")));
                tracing::warn!(error = %e, lease = %cfg.lease_name, namespace = %cfg.namespace, "cannot set up the leader lease; retrying in 2 s");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

async fn until_leader(manager: &LeaseManager, report: &impl Fn(Standby)) {
    loop {
        match manager.changed().await {
            Ok(true) => return,
            Ok(false) => report(Standby::Waiting),
            Err(e) => {
                report(Standby::Broken(format!("leader lease: {e}")));
                tracing::warn!(error = %e, "leader lease: API error while waiting; retrying in 2 s");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Resolves once a Lease seen held is seen with no holder (released), polling
/// every second. Only a seen transition counts: an empty Lease may be the one this
/// replica is taking right now. The first look is immediate: a new standby in a
/// rollout must see the old leader's hold before that leader is told to stop.
async fn released(leases: &Api<Lease>, name: &str) {
    let mut seen_held = false;
    loop {
        if let Ok(Some(lease)) = leases.get_opt(name).await {
            let held = lease
                .spec
                .and_then(|s| s.holder_identity)
                .is_some_and(|h| !h.is_empty());
            if seen_held && !held {
                return;
            }
            seen_held = held;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl Leadership {
    /// Keeps the lease renewed; resolves with the reason once it is lost or can no
    /// longer be confirmed. Call once; then stop writing at once and do not release.
    pub async fn lost(&self) -> LeaderError {
        let check_every = self.cfg.check_every();
        let safety = self.cfg.safety();
        let (deadline_tx, mut deadline_rx) = tokio::sync::watch::channel(self.first_deadline);
        let renew = async {
            loop {
                match self.manager.changed().await {
                    Ok(true) => {}
                    Ok(false) => return LeaderError::TakenOver,
                    Err(e) => {
                        // The deadline below decides when an unrenewed lease is lost.
                        tracing::warn!(error = %e, "cannot renew the leader lease; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        };
        let confirm = async {
            let mut tick = tokio::time::interval(check_every);
            loop {
                tick.tick().await;
                match tokio::time::timeout(check_every, self.leases.get(&self.cfg.lease_name)).await {
                    Ok(Ok(lease)) => {
                        let now = Utc::now();
                        match hold_of(&lease, &self.cfg.identity, now) {
                            Hold::Ours { until } => {
                                deadline_tx.send_replace(step_down_at(until, now, safety));
                            }
                            Hold::NotOurs => return LeaderError::NotOurs,
                        }
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the leader lease"),
                    Err(_) => tracing::warn!("reading the leader lease timed out"),
                }
            }
        };
        tokio::pin!(renew, confirm);
        loop {
            let deadline = *deadline_rx.borrow_and_update();
            tokio::select! {
                e = &mut renew => return e,
                e = &mut confirm => return e,
                () = tokio::time::sleep_until(deadline) => {
                    return LeaderError::Unconfirmed;
                }
                _ = deadline_rx.changed() => {}
            }
        }
    }

    /// Gives the lease up at a clean stop, so a standby takes over at once rather
    /// than after expiry. The patch tests that we still hold it: if another replica
    /// does, it fails and changes nothing.
    pub async fn release(&self) {
        let patch = serde_json::json!([
            {"op": "test", "path": "/spec/holderIdentity", "value": self.cfg.identity},
            {"op": "remove", "path": "/spec/holderIdentity"},
        ]);
        let patch: Patch<()> = match serde_json::from_value::<json_patch::Patch>(patch) {
            Ok(p) => Patch::Json(p),
            Err(e) => {
                tracing::warn!(error = %e, "cannot build the release patch; the lease expires on its own");
                return;
            }
        };
        let params = PatchParams::default();
        let call = self.leases.patch(&self.cfg.lease_name, &params, &patch);
        match tokio::time::timeout(Duration::from_secs(3), call).await {
            Ok(Ok(_)) => tracing::info!(lease = %self.cfg.lease_name, "released the leader lease"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "did not release the leader lease (no longer ours, or the API failed); it expires on its own")
            }
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
