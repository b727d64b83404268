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
use crate::desired_read::read_via_responder;
use crate::direct::last_values_for;
use crate::error::KvError;
use crate::timing::{backoff, jittered, spread};

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
    /// The full read after a reconnect waits a random delay below this. After a server
    /// restart the whole fleet reconnects within seconds; without the spread every
    /// device would re-read in the same instant. Changes published after the
    /// reconnect still arrive at once through the subscription.
    pub reconnect_read_spread: Duration,
    /// How full reads are made.
    pub read_path: ReadPath,
}

/// How a follower reads its whole desired state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReadPath {
    /// Batched direct get: needs JetStream API permissions on the bucket.
    #[default]
    Direct,
    /// Through the read responder: needs only `iot.desired.read.<device>` (what a
    /// device with scoped permissions has).
    Responder,
}

impl Default for FollowConfig {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(10),
            read_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(30),
            reconnect_read_spread: Duration::from_secs(3),
            read_path: ReadPath::Direct,
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
                let delay = if view.synced { spread(config.reconnect_read_spread) } else { Duration::ZERO };
                tracing::info!(%device, read_in = ?delay, "reconnected; re-reading desired state");
                next_read = tokio::time::Instant::now() + delay;
            }
            _ = tokio::time::sleep_until(next_read) => {
                let read = match config.read_path {
                    ReadPath::Direct => last_values_for(&client, DESIRED_STATE_BUCKET, &key_prefix, config.read_timeout).await,
                    ReadPath::Responder => read_via_responder(&client, &device, config.read_timeout).await,
                };
                match read {
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

#[cfg(test)]
mod tests {
    use super::*;

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
