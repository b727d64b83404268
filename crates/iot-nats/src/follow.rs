//! A device following its own desired state without any JetStream consumer.
//!
//! Two inputs, one output:
//! - a core subscription on `$KV.desired-state.<device>.>` says that this device's
//!   keys changed, while the connection is up;
//! - a full read of the device's keys (through the read responder, or a batched
//!   direct get) says what they are. It runs at start, after every reconnect, on a
//!   timer, and after every change signal.
//!
//! **A message on the subscription is only a signal.** Its body and headers are never
//! applied: NATS delivers on a subject whatever anyone allowed to publish there, or
//! any server answer whose reply subject someone pointed there, sends. What the
//! device acts on always comes from a read of the stream. The signal's body is used
//! for one thing only: to tell whether a read already reflects the change it
//! announces. A read that does not (the stream had not stored it yet) is repeated a
//! few times with a short backoff; a signal that no read ever confirms (a forged
//! one) is dropped.
//!
//! **A read never takes the device back.** On a JetStream cluster every replica
//! answers direct gets, and a replica may be behind the leader; after a reconnect
//! the operator's index may be rebuilt from one. So each key's revision (its stream
//! sequence) is remembered, and a read that shows a key at an older revision than
//! the device already applied is discarded and repeated shortly, until the source
//! has caught up.
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
use crate::direct::{KvRecord, last_values_for};
use crate::error::NatsError;
use iot_timing::{backoff, jittered, spread};

/// Reads made for one burst of unconfirmed signals before they are dropped. With
/// the backoff below they span about 6 s: far longer than the stream needs to store
/// a write, even under load.
const MAX_CONFIRM_READS: u32 = 8;

/// Delay before the n-th read that tries to confirm a signal: 25 ms doubling.
fn confirm_delay(attempt: u32) -> Duration {
    Duration::from_millis(25u64 << attempt.saturating_sub(1).min(7))
}

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

/// Change signals no read has confirmed yet: per key, what the latest signal
/// announced (a value, or `None` for a delete or purge).
#[derive(Debug, Default)]
struct Unconfirmed {
    announced: BTreeMap<String, Option<Bytes>>,
    /// Reads since the oldest of them arrived.
    reads: u32,
}

impl Unconfirmed {
    /// Records a signal; false if `current` (the last read) already shows what it
    /// announces, so no read is needed.
    fn signal(&mut self, key: &str, announced: Option<Bytes>, current: &BTreeMap<String, Bytes>) -> bool {
        if current.get(key) == announced.as_ref() {
            // The last read shows it: an older announcement for the key is moot
            // (the key went A -> B -> A, say).
            self.announced.remove(key);
            return false;
        }
        if self.announced.is_empty() {
            self.reads = 0;
        }
        self.announced.insert(key.to_owned(), announced);
        true
    }

    /// Drops the signals `current` confirms; true if some are left.
    fn confirm(&mut self, current: &BTreeMap<String, Bytes>) -> bool {
        self.reads += 1;
        self.announced.retain(|k, v| current.get(k) != v.as_ref());
        !self.announced.is_empty()
    }
}

/// Per key, the newest revision (stream sequence) the follower has published.
#[derive(Debug, Default)]
struct Revisions {
    applied: BTreeMap<String, u64>,
}

impl Revisions {
    /// The first key that `records` show at an older revision than already applied.
    /// Revision 0 means "unknown" (the operator's own write, before its watch has
    /// seen it: always the newest value) and is never called older.
    fn regression<'a>(&self, records: &'a [KvRecord]) -> Option<(&'a str, u64, u64)> {
        records.iter().find_map(|r| {
            let held = *self.applied.get(&r.key)?;
            (r.sequence != 0 && r.sequence < held).then_some((r.key.as_str(), r.sequence, held))
        })
    }

    /// Takes `records` as the new state (keys absent from it are forgotten).
    fn accept(&mut self, records: &[KvRecord]) {
        let before = std::mem::take(&mut self.applied);
        for r in records {
            let held = before.get(&r.key).copied().unwrap_or(0);
            self.applied.insert(r.key.clone(), r.sequence.max(held));
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
) -> Result<(), NatsError> {
    let NatsConnection { client, mut connects } = conn;
    let filter = desired_state_device_filter(&device);
    // Subscribe before the first read so no change between the two is lost.
    let mut sub = client.subscribe(filter.clone()).await.map_err(|e| NatsError::Request {
        subject: filter.clone(),
        message: e.to_string(),
    })?;
    let key_prefix = format!("{device}.>");
    let mut view = DesiredView::default();
    // The values of the last complete read, by key (deleted keys absent).
    let mut current: BTreeMap<String, Bytes> = BTreeMap::new();
    let mut unconfirmed = Unconfirmed::default();
    let mut revisions = Revisions::default();
    // Reads in a row that showed an older revision than applied.
    let mut stale_reads: u32 = 0;
    let mut failures: u32 = 0;
    // Start with an immediate read.
    let mut next_read = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = out.closed() => return Ok(()),
            msg = sub.next() => {
                let Some(msg) = msg else {
                    return Err(NatsError::Request { subject: filter, message: "subscription closed".into() });
                };
                let Some(key) = key_from_subject(DESIRED_STATE_BUCKET, &msg.subject) else { continue };
                let op = msg.headers.as_ref().and_then(|h| h.get("KV-Operation")).map(|v| v.as_str().to_owned());
                let deleted = matches!(op.as_deref(), Some("DEL") | Some("PURGE"));
                let announced = (!deleted).then(|| msg.payload.clone());
                if unconfirmed.signal(key, announced, &current) {
                    // Read now, unless a read is already due sooner (a failure backoff
                    // is kept: the reads would fail the same way).
                    if failures == 0 {
                        next_read = next_read.min(tokio::time::Instant::now());
                    }
                }
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
                        if let Some((key, seen, held)) = revisions.regression(&records) {
                            stale_reads += 1;
                            let delay = confirm_delay(stale_reads.min(MAX_CONFIRM_READS));
                            tracing::info!(%device, key, seen, held, retry_in = ?delay, "read an older revision than already applied (a replica behind); reading again");
                            next_read = tokio::time::Instant::now() + delay;
                            continue;
                        }
                        stale_reads = 0;
                        revisions.accept(&records);
                        current = values_of(&records);
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
                        if unconfirmed.confirm(&current) {
                            if unconfirmed.reads >= MAX_CONFIRM_READS {
                                let keys: Vec<&String> = unconfirmed.announced.keys().collect();
                                tracing::warn!(%device, ?keys, "change signals that no read of the stream confirms; ignored (only what the stream holds is applied)");
                                unconfirmed = Unconfirmed::default();
                            } else {
                                next_read = tokio::time::Instant::now() + confirm_delay(unconfirmed.reads);
                            }
                        }
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

/// The present values of a read, by key.
fn values_of(records: &[KvRecord]) -> BTreeMap<String, Bytes> {
    records
        .iter()
        .filter_map(|r| Some((r.key.clone(), r.value.clone()?)))
        .collect()
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
    fn a_signal_counts_only_once_a_read_shows_what_it_announced() {
        let v = |s: &'static str| Bytes::from_static(s.as_bytes());
        let mut current = BTreeMap::from([("d.ns_web".to_owned(), v("v1"))]);
        let mut u = Unconfirmed::default();
        // What the last read already shows needs no read.
        assert!(!u.signal("d.ns_web", Some(v("v1")), &current));
        assert!(u.signal("d.ns_web", Some(v("v2")), &current));
        assert!(
            !u.signal("d.ns_db", None, &current),
            "a delete of a key the last read did not have needs no read"
        );
        // The latest signal for a key replaces an earlier one.
        assert!(u.signal("d.ns_web", Some(v("v3")), &current));
        // A read from before the write was stored confirms nothing.
        assert!(u.confirm(&current));
        current.insert("d.ns_web".into(), v("v2"));
        assert!(u.confirm(&current), "v2 is not what the latest signal announced");
        current.insert("d.ns_web".into(), v("v3"));
        assert!(!u.confirm(&current), "v3 is stored; the absent key confirms the delete");
        assert_eq!(u.reads, 3);
        // A delete is confirmed by the key's absence, not by a value.
        assert!(u.signal("d.ns_web", None, &current));
        assert!(u.confirm(&current));
        current.remove("d.ns_web");
        assert!(!u.confirm(&current));
        // Back to what the last read shows: the announcement in between is moot.
        let mut u = Unconfirmed::default();
        current.insert("d.ns_web".into(), v("v1"));
        assert!(u.signal("d.ns_web", Some(v("v2")), &current));
        assert!(!u.signal("d.ns_web", Some(v("v1")), &current));
        assert!(u.announced.is_empty(), "{:?}", u.announced);
        assert_eq!(confirm_delay(1), Duration::from_millis(25));
        assert_eq!(confirm_delay(4), Duration::from_millis(200));
        let waited: Duration = (1..MAX_CONFIRM_READS).map(confirm_delay).sum();
        assert!(
            waited > Duration::from_secs(3) && waited < Duration::from_secs(10),
            "{waited:?}"
        );
    }

    #[test]
    fn a_read_older_than_what_was_applied_is_refused() {
        let rec = |key: &str, sequence: u64| KvRecord {
            key: key.into(),
            sequence,
            stored_at: None,
            value: Some(Bytes::from_static(b"x")),
        };
        let mut r = Revisions::default();
        assert_eq!(r.regression(&[rec("d.a", 5)]), None, "nothing applied yet");
        r.accept(&[rec("d.a", 5), rec("d.b", 9)]);
        assert_eq!(r.regression(&[rec("d.a", 4), rec("d.b", 9)]), Some(("d.a", 4, 5)));
        assert_eq!(r.regression(&[rec("d.a", 5), rec("d.b", 10)]), None);
        assert_eq!(r.regression(&[rec("d.a", 0)]), None, "revision 0 is unknown, not old");
        // Unknown keeps what was known; a key absent from a read is forgotten.
        r.accept(&[rec("d.a", 0)]);
        assert_eq!(r.regression(&[rec("d.a", 4)]), Some(("d.a", 4, 5)));
        assert_eq!(r.regression(&[rec("d.b", 1)]), None);
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
