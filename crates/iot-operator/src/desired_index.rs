//! In-memory index of the desired-state bucket, fed by the bucket's one follower
//! ([`iot_nats::BucketFollower`]: one ordered consumer, whatever the fleet size).
//!
//! The write path compares against it to write only changed bytes and to find keys
//! of devices dropped from a deployment. It is "ready" once the watch has caught up
//! with the bucket; reconciles wait for that, which is what keeps an operator
//! restart from re-putting or deleting anything.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use harmony_reconciler_contracts::{DESIRED_STATE_BUCKET, DeploymentRef, Id, parse_desired_state_key};
use iot_nats::{BucketEntry, BucketFollower, BucketIndex};

/// The bucket's keys, by deployment (for the write path) and by device (for the
/// devices' reads).
#[derive(Debug, Default)]
struct Keys {
    /// Each value with when it was stored (the server's clock once the watch has
    /// seen it; this process's clock for a moment after its own write).
    by_deployment: HashMap<DeploymentRef, BTreeMap<Id, (Bytes, DateTime<Utc>)>>,
    /// Each value with its stream sequence (0 until the watch brings our own write).
    by_device: HashMap<Id, BTreeMap<DeploymentRef, (Bytes, u64)>>,
}

#[derive(Debug)]
pub struct DesiredIndex {
    keys: Mutex<Keys>,
    follower: BucketFollower,
}

impl Default for DesiredIndex {
    fn default() -> Self {
        Self {
            keys: Mutex::new(Keys::default()),
            follower: BucketFollower::new(DESIRED_STATE_BUCKET),
        }
    }
}

impl crate::device_services::desired_read::DesiredSource for DesiredIndex {
    /// A device's keys from the index: what the read responder answers with once
    /// the index has caught up (no request to the server per read). The index
    /// follows the stream, so a read may come a moment before it has a write the
    /// device was just told about; the device then reads again (see
    /// `iot_nats::follow`).
    fn records_for(&self, device: &Id) -> Option<Vec<iot_nats::KvRecord>> {
        if !self.is_ready() {
            return None;
        }
        let keys = self.lock();
        Some(
            keys.by_device
                .get(device)
                .map(|deps| {
                    deps.iter()
                        .map(|(dep, (value, sequence))| iot_nats::KvRecord {
                            key: harmony_reconciler_contracts::desired_state_key(device, dep),
                            sequence: *sequence,
                            stored_at: None,
                            value: Some(value.clone()),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        )
    }
}

impl DesiredIndex {
    fn lock(&self) -> std::sync::MutexGuard<'_, Keys> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the index has caught up with the bucket.
    pub fn is_ready(&self) -> bool {
        self.follower.is_caught_up()
    }

    /// Waits until the index has caught up with the bucket.
    pub async fn wait_ready(&self) {
        self.follower.wait_caught_up().await;
    }

    /// Current values of one deployment's keys.
    pub fn existing(&self, deployment: &DeploymentRef) -> BTreeMap<Id, Bytes> {
        self.lock()
            .by_deployment
            .get(deployment)
            .map(|m| m.iter().map(|(d, (v, _))| (d.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// Current values of one deployment's keys, with when each was stored: when a
    /// device was given what it holds (a rollout's dispatch time, on the NATS
    /// server's clock, so it survives an operator restart).
    pub fn existing_stored(&self, deployment: &DeploymentRef) -> BTreeMap<Id, (Bytes, DateTime<Utc>)> {
        self.lock().by_deployment.get(deployment).cloned().unwrap_or_default()
    }

    /// Records our own acknowledged write (stamped now, until the watch brings the
    /// server's time).
    pub fn record(&self, key: &str, value: Option<Bytes>) {
        self.record_at(key, value, None, 0);
    }

    /// Records a write seen by the watch (`stored_at` from the server), or our own
    /// (`None`). An unchanged value keeps its time: re-recording our own write must
    /// not move a dispatch time. `sequence` is the stream's (0 for our own write:
    /// devices then take the value without comparing revisions, as it is the newest).
    /// A change older than what the index holds (a replay from a replica that is
    /// behind) is ignored.
    fn record_at(&self, key: &str, value: Option<Bytes>, stored_at: Option<DateTime<Utc>>, sequence: u64) {
        let Ok((device, deployment)) = parse_desired_state_key(key) else {
            tracing::warn!(key, "desired-state key that names no device/deployment; ignored");
            return;
        };
        let mut keys = self.lock();
        let held = keys
            .by_device
            .get(&device)
            .and_then(|deps| deps.get(&deployment))
            .map(|(_, seq)| *seq)
            .unwrap_or(0);
        if sequence != 0 && sequence < held {
            tracing::debug!(key, sequence, held, "older change than the index holds; ignored");
            return;
        }
        match value {
            Some(v) => {
                let kept = if sequence == 0 { held } else { sequence };
                keys.by_device
                    .entry(device.clone())
                    .or_default()
                    .insert(deployment.clone(), (v.clone(), kept));
                let slot = keys.by_deployment.entry(deployment).or_default();
                let at = match (stored_at, slot.get(&device)) {
                    (Some(at), _) => at,
                    (None, Some((old, at))) if *old == v => *at,
                    (None, _) => Utc::now(),
                };
                slot.insert(device, (v, at));
            }
            None => {
                if let Some(devices) = keys.by_deployment.get_mut(&deployment) {
                    devices.remove(&device);
                    if devices.is_empty() {
                        keys.by_deployment.remove(&deployment);
                    }
                }
                if let Some(deps) = keys.by_device.get_mut(&device) {
                    deps.remove(&deployment);
                    if deps.is_empty() {
                        keys.by_device.remove(&device);
                    }
                }
            }
        }
    }

    /// Every deployment that has at least one key.
    pub fn deployments(&self) -> std::collections::BTreeSet<DeploymentRef> {
        self.lock().by_deployment.keys().cloned().collect()
    }

    pub fn key_count(&self) -> usize {
        self.lock().by_deployment.values().map(BTreeMap::len).sum()
    }

    /// Follows the bucket forever, replaying it after errors and reconnects.
    pub async fn run(&self, store: kv::Store, connects: Option<tokio::sync::watch::Receiver<u64>>) {
        self.follower.run(store, connects, self).await;
    }
}

impl BucketIndex for DesiredIndex {
    fn apply(&self, entry: BucketEntry) {
        self.record_at(&entry.key, entry.value, Some(entry.stored_at), entry.sequence);
    }
}
