//! A device following its own desired state without any JetStream consumer.
//!
//! Two inputs, one output:
//! - a core subscription on `$KV.desired-state.<device>.>` delivers every put,
//!   delete and purge of this device's keys while the connection is up;
//! - a full re-read (batched direct get) at start, after every reconnect and on a
//!   timer repairs anything the at-most-once subscription may have missed.
//!
//! The output is a [`DesiredView`] on a `watch` channel: the whole current desired
//! state, so the reconciler downstream is level-triggered and never needs to know
//! which event caused a change.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use harmony_reconciler_contracts::keys::{desired_state_device_filter, key_from_subject};
use harmony_reconciler_contracts::{DESIRED_STATE_BUCKET, DeploymentRef, Id, parse_desired_state_key};
use tokio::sync::watch;

use crate::connect::NatsConnection;
use crate::direct::last_values_for;
use crate::error::KvError;

/// The device's desired state as last seen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DesiredView {
    /// Raw payload per deployment. Decoding is the reader's job, so one bad payload
    /// only affects its own deployment.
    pub entries: BTreeMap<DeploymentRef, Bytes>,
    /// Keys under this device's prefix that are not valid deployment keys.
    pub invalid_keys: Vec<String>,
    /// False until the first full read succeeded. A reader must not remove anything
    /// before that: an empty view then means "unknown", not "nothing desired".
    pub synced: bool,
}

/// Timing knobs of a follower.
#[derive(Debug, Clone)]
pub struct FollowConfig {
    /// Full re-read period.
    pub resync: Duration,
    /// Timeout of one full read.
    pub read_timeout: Duration,
    /// Cap of the retry backoff after a failed full read.
    pub max_backoff: Duration,
}

impl Default for FollowConfig {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(10),
            read_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// Follows `device`'s keys until `out` has no receivers left. Returns only on a
/// fatal error (the subscription could not be created).
pub async fn follow_desired_state(
    conn: NatsConnection,
    device: Id,
    config: FollowConfig,
    out: watch::Sender<DesiredView>,
) -> Result<(), KvError> {
    let NatsConnection { client, mut connects } = conn;
    let filter = desired_state_device_filter(&device);
    // Subscribe before the first read so no change between the two is lost.
    let mut sub = client.subscribe(filter.clone()).await.map_err(|e| KvError::Request {
        subject: filter.clone(),
        message: e.to_string(),
    })?;
    let key_prefix = format!("{device}.>");
    let mut view = DesiredView::default();
    let mut failures: u32 = 0;
    // Start with an immediate read.
    let mut next_read = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = out.closed() => return Ok(()),
            msg = sub.next() => {
                let Some(msg) = msg else {
                    return Err(KvError::Request { subject: filter, message: "subscription closed".into() });
                };
                let Some(key) = key_from_subject(DESIRED_STATE_BUCKET, &msg.subject) else { continue };
                let op = msg.headers.as_ref().and_then(|h| h.get("KV-Operation")).map(|v| v.as_str().to_owned());
                let deleted = matches!(op.as_deref(), Some("DEL") | Some("PURGE"));
                apply_record(&mut view, key, (!deleted).then(|| msg.payload.clone()));
                publish(&out, &view);
            }
            changed = connects.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                tracing::info!(%device, "reconnected; re-reading desired state");
                next_read = tokio::time::Instant::now();
            }
            _ = tokio::time::sleep_until(next_read) => {
                match last_values_for(&client, DESIRED_STATE_BUCKET, &key_prefix, config.read_timeout).await {
                    Ok(records) => {
                        failures = 0;
                        // Published only if it differs from what readers already have, so an
                        // unchanged periodic re-read does not cause an extra reconcile pass.
                        let mut fresh = DesiredView { synced: true, ..Default::default() };
                        for r in records {
                            apply_record(&mut fresh, &r.key, r.value);
                        }
                        if !view.synced {
                            tracing::info!(%device, deployments = fresh.entries.len(), "watching KV keys (consumer-free follow)");
                        }
                        view = fresh;
                        publish(&out, &view);
                        next_read = tokio::time::Instant::now() + jittered(config.resync);
                    }
                    Err(e) => {
                        failures += 1;
                        let delay = backoff(failures, config.max_backoff);
                        tracing::warn!(%device, error = %e, retry_in = ?delay, "full read of desired state failed; keeping last known state");
                        next_read = tokio::time::Instant::now() + delay;
                    }
                }
            }
        }
    }
}

fn apply_record(view: &mut DesiredView, key: &str, value: Option<Bytes>) {
    match parse_desired_state_key(key) {
        Ok((_, deployment)) => {
            match value {
                Some(v) => view.entries.insert(deployment, v),
                None => view.entries.remove(&deployment),
            };
        }
        Err(e) => {
            if value.is_some() && !view.invalid_keys.iter().any(|k| k == key) {
                tracing::warn!(key, error = %e, "ignoring desired-state key that names no valid deployment");
                view.invalid_keys.push(key.to_owned());
            }
        }
    }
}

fn publish(out: &watch::Sender<DesiredView>, view: &DesiredView) {
    out.send_if_modified(|current| {
        if current == view {
            false
        } else {
            *current = view.clone();
            true
        }
    });
}

/// `period` +/- 10 %, so a fleet that (re)connected at the same moment does not
/// re-read in lockstep forever.
pub fn jittered(period: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // A fraction in [0.9, 1.1) from the clock's low bits: cheap and good enough here.
    let factor = 0.9 + f64::from(nanos % 1000) / 5000.0;
    period.mul_f64(factor)
}

/// Retry delay after the n-th consecutive failure: 1 s, 2 s, 4 s ... capped at `cap`.
/// The one backoff rule of the platform (follower, agent reconciler, operator).
pub fn backoff(failures: u32, cap: Duration) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(16);
    Duration::from_secs(secs).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(10));
            assert!(d >= Duration::from_secs(9) && d < Duration::from_secs(11), "{d:?}");
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let cap = Duration::from_secs(30);
        let got: Vec<u64> = (1..=7).map(|n| backoff(n, cap).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 30, 30]);
    }

    #[test]
    fn records_update_and_delete_entries() {
        let mut view = DesiredView::default();
        apply_record(&mut view, "dev1.ns_web", Some(Bytes::from_static(b"x")));
        apply_record(&mut view, "dev1.ns_db", Some(Bytes::from_static(b"y")));
        apply_record(&mut view, "dev1.ns_web", None);
        apply_record(&mut view, "dev1.garbage", Some(Bytes::from_static(b"z")));
        let keys: Vec<String> = view.entries.keys().map(ToString::to_string).collect();
        assert_eq!(keys, ["ns/db"]);
        assert_eq!(view.invalid_keys, ["dev1.garbage"]);
    }
}
