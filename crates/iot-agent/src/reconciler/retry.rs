//! Retry bookkeeping: which deployments wait before their next attempt, until
//! when, and with which error. Pure: the caller passes the time.
//!
//! Two kinds of attempts wait on their own backoff:
//! - an attempt at a deployment's current spec (create, replace, start): 1 s
//!   doubling to 60 s, or, after an upgrade that was rolled back, 30 s doubling to
//!   10 min (each retry of a service with host ports briefly stops the version that
//!   works);
//! - a start of the previous version while its upgrade waits
//!   ([`crate::plan::Action::StartPrevious`]): 1 s doubling to 60 s, so podman's
//!   events do not trigger the next try at once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use harmony_reconciler_contracts::{DeploymentRef, SpecHash};
use tokio::time::Instant;

use crate::plan::DesiredContent;

/// Backoff after the n-th consecutive failure: 1 s, 2 s, 4 s ... capped at 60 s.
pub fn failure_backoff(attempts: u32) -> Duration {
    iot_timing::backoff(attempts, Duration::from_secs(60))
}

/// Backoff after the n-th consecutive rolled-back upgrade: 30 s doubling to 10 min.
pub fn rollback_backoff(attempts: u32) -> Duration {
    (Duration::from_secs(30) * 2u32.saturating_pow(attempts.saturating_sub(1).min(8))).min(Duration::from_secs(600))
}

/// Consecutive failed attempts and when the next may run.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attempts {
    count: u32,
    retry_at: Instant,
}

/// The last failure of a deployment's spec.
#[derive(Debug, Clone)]
struct Failure {
    spec_hash: Option<SpecHash>,
    attempts: Attempts,
    error: String,
}

#[derive(Debug, Default)]
pub struct RetryBook {
    failures: BTreeMap<DeploymentRef, Failure>,
    previous: BTreeMap<DeploymentRef, Attempts>,
}

impl RetryBook {
    /// An attempt at `spec_hash` failed with `error`. A failure of another spec
    /// than the last starts counting again.
    pub fn failed(
        &mut self,
        dep: &DeploymentRef,
        spec_hash: Option<SpecHash>,
        error: String,
        rolled_back: bool,
        now: Instant,
    ) {
        let count = match self.failures.get(dep) {
            Some(f) if f.spec_hash == spec_hash => f.attempts.count + 1,
            _ => 1,
        };
        let delay = if rolled_back {
            rollback_backoff(count)
        } else {
            failure_backoff(count)
        };
        let attempts = Attempts {
            count,
            retry_at: now + delay,
        };
        self.failures.insert(
            dep.clone(),
            Failure {
                spec_hash,
                attempts,
                error,
            },
        );
    }

    /// The deployment runs its spec: its failures are forgotten.
    pub fn succeeded(&mut self, dep: &DeploymentRef) {
        self.failures.remove(dep);
    }

    /// The error that holds `dep` back.
    pub fn last_error(&self, dep: &DeploymentRef) -> Option<&str> {
        self.failures.get(dep).map(|f| f.error.as_str())
    }

    /// Deployments whose last attempt at their *current* spec failed and whose
    /// retry is not due yet. A new spec is tried at once.
    pub fn backing_off(
        &self,
        desired: &BTreeMap<DeploymentRef, DesiredContent>,
        now: Instant,
    ) -> BTreeSet<DeploymentRef> {
        self.failures
            .iter()
            .filter(|(dep, f)| {
                f.attempts.retry_at > now
                    && f.spec_hash.as_ref() == desired.get(*dep).and_then(DesiredContent::spec_hash)
            })
            .map(|(dep, _)| dep.clone())
            .collect()
    }

    /// Records how starting `dep`'s previous version went.
    pub fn previous_started(&mut self, dep: &DeploymentRef, failed: bool, now: Instant) {
        if failed {
            let count = self.previous.get(dep).map_or(1, |a| a.count + 1);
            self.previous.insert(
                dep.clone(),
                Attempts {
                    count,
                    retry_at: now + failure_backoff(count),
                },
            );
        } else {
            self.previous.remove(dep);
        }
    }

    /// Whether the next start of `dep`'s previous version must wait.
    pub fn previous_waits(&self, dep: &DeploymentRef, now: Instant) -> bool {
        self.previous.get(dep).is_some_and(|a| a.retry_at > now)
    }

    /// Forgets deployments that are no longer desired.
    pub fn retain(&mut self, keep: impl Fn(&DeploymentRef) -> bool) {
        self.failures.retain(|d, _| keep(d));
        self.previous.retain(|d, _| keep(d));
    }
}

#[cfg(test)]
mod tests {
    use harmony_reconciler_contracts::SpecHash;

    use super::*;

    fn dep() -> DeploymentRef {
        DeploymentRef::new("default", "web").unwrap_or_else(|e| panic!("{e}"))
    }

    fn desired(hash: &str) -> BTreeMap<DeploymentRef, DesiredContent> {
        BTreeMap::from([(
            dep(),
            DesiredContent::Invalid {
                error: "x".into(),
                spec_hash: Some(SpecHash::from_reported(hash)),
                revision: None,
            },
        )])
    }

    #[test]
    fn backoff_doubles_per_failure_of_the_same_spec_and_a_new_spec_goes_at_once() {
        let mut book = RetryBook::default();
        let t0 = Instant::now();
        let h1 = Some(SpecHash::from_reported("h1"));
        book.failed(&dep(), h1.clone(), "boom".into(), false, t0);
        assert!(book.backing_off(&desired("h1"), t0).contains(&dep()));
        assert!(
            !book
                .backing_off(&desired("h1"), t0 + Duration::from_secs(1))
                .contains(&dep())
        );
        book.failed(&dep(), h1.clone(), "boom".into(), false, t0);
        assert!(
            book.backing_off(&desired("h1"), t0 + Duration::from_millis(1999))
                .contains(&dep())
        );
        assert!(
            !book
                .backing_off(&desired("h1"), t0 + Duration::from_secs(2))
                .contains(&dep())
        );
        // Another spec is not held by the old one's failures.
        assert!(book.backing_off(&desired("h2"), t0).is_empty());
        assert_eq!(book.last_error(&dep()), Some("boom"));
        book.succeeded(&dep());
        assert!(book.backing_off(&desired("h1"), t0).is_empty());
        assert_eq!(book.last_error(&dep()), None);
    }

    #[test]
    fn a_rolled_back_upgrade_waits_longer_and_a_new_spec_restarts_the_count() {
        let mut book = RetryBook::default();
        let t0 = Instant::now();
        let h1 = Some(SpecHash::from_reported("h1"));
        book.failed(&dep(), h1.clone(), "bad".into(), true, t0);
        assert!(
            book.backing_off(&desired("h1"), t0 + Duration::from_secs(29))
                .contains(&dep())
        );
        assert!(
            !book
                .backing_off(&desired("h1"), t0 + Duration::from_secs(30))
                .contains(&dep())
        );
        book.failed(&dep(), Some(SpecHash::from_reported("h2")), "bad".into(), false, t0);
        assert!(
            !book
                .backing_off(&desired("h2"), t0 + Duration::from_secs(1))
                .contains(&dep())
        );
        assert_eq!(rollback_backoff(20), Duration::from_secs(600));
        assert_eq!(failure_backoff(20), Duration::from_secs(60));
    }

    #[test]
    fn starts_of_the_previous_version_wait_on_their_own_count() {
        let mut book = RetryBook::default();
        let t0 = Instant::now();
        book.previous_started(&dep(), true, t0);
        book.previous_started(&dep(), true, t0);
        assert!(book.previous_waits(&dep(), t0 + Duration::from_millis(1999)));
        assert!(!book.previous_waits(&dep(), t0 + Duration::from_secs(2)));
        assert!(
            book.backing_off(&desired("h1"), t0).is_empty(),
            "the upgrade itself is not held"
        );
        book.previous_started(&dep(), false, t0);
        assert!(!book.previous_waits(&dep(), t0));
        book.previous_started(&dep(), true, t0);
        book.retain(|_| false);
        assert!(!book.previous_waits(&dep(), t0));
    }
}
