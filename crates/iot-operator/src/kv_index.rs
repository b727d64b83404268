//! In-memory index of the desired-state bucket, fed by ONE KV watch over the whole
//! bucket (one ordered consumer, whatever the fleet size).
//!
//! The write path compares against it to write only changed bytes and to find keys
//! of devices dropped from a deployment. It is "ready" once the watch has caught up
//! with the bucket; reconciles wait for that, which is what keeps an operator
//! restart from re-putting or deleting anything.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use futures::StreamExt;
use harmony_reconciler_contracts::{DeploymentRef, Id, parse_desired_state_key};
use tokio::sync::watch;

/// The bucket's keys, by deployment (for the write path) and by device (for the
/// devices' reads).
#[derive(Debug, Default)]
struct Keys {
    by_deployment: HashMap<DeploymentRef, BTreeMap<Id, Bytes>>,
    by_device: HashMap<Id, BTreeMap<DeploymentRef, Bytes>>,
}

#[derive(Debug)]
pub struct DesiredIndex {
    keys: Mutex<Keys>,
    ready: watch::Sender<bool>,
}

impl Default for DesiredIndex {
    fn default() -> Self {
        Self {
            keys: Mutex::new(Keys::default()),
            ready: watch::channel(false).0,
        }
    }
}

impl iot_kv::desired_read::DesiredSource for DesiredIndex {
    /// A device's keys from the index: what the read responder answers with once
    /// the index has caught up (no request to the server per read). The index
    /// follows the stream, so a read may come a moment before it has a write the
    /// device was just told about; the device then reads again (see
    /// `iot_kv::follow`).
    fn records_for(&self, device: &Id) -> Option<Vec<iot_kv::KvRecord>> {
        if !self.is_ready() {
            return None;
        }
        let keys = self.lock();
        Some(
            keys.by_device
                .get(device)
                .map(|deps| {
                    deps.iter()
                        .map(|(dep, value)| iot_kv::KvRecord {
                            key: harmony_reconciler_contracts::desired_state_key(device, dep),
                            sequence: 0,
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

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until the index has caught up with the bucket.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        if rx.wait_for(|r| *r).await.is_err() {
            tracing::debug!("desired-state index dropped while waiting");
        }
    }

    /// Current values of one deployment's keys.
    pub fn existing(&self, deployment: &DeploymentRef) -> BTreeMap<Id, Bytes> {
        self.lock().by_deployment.get(deployment).cloned().unwrap_or_default()
    }

    /// Records a write (from the watch, or from our own acknowledged write).
    pub fn record(&self, key: &str, value: Option<Bytes>) {
        let Ok((device, deployment)) = parse_desired_state_key(key) else {
            tracing::warn!(key, "desired-state key that names no device/deployment; ignored");
            return;
        };
        let mut keys = self.lock();
        match value {
            Some(v) => {
                keys.by_device
                    .entry(device.clone())
                    .or_default()
                    .insert(deployment.clone(), v.clone());
                keys.by_deployment.entry(deployment).or_default().insert(device, v);
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

    fn reset(&self) {
        self.ready.send_replace(false);
        *self.lock() = Keys::default();
    }

    /// Follows the bucket forever, rebuilding from scratch if the watch breaks.
    pub async fn run(&self, store: kv::Store) {
        loop {
            if let Err(e) = self.follow_once(&store).await {
                tracing::warn!(error = %e, "desired-state index watch failed; rebuilding in 1 s");
            }
            self.reset();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn follow_once(&self, store: &kv::Store) -> anyhow::Result<()> {
        let pending_at_start = store.status().await?.values();
        let mut watch = store.watch_with_history(">").await?;
        if pending_at_start == 0 {
            self.mark_ready();
        }
        loop {
            // Messages counted at the start can expire (purge markers have a TTL)
            // before the watch delivers them; an empty bucket then never says
            // "caught up", so look again while waiting.
            let next = if self.is_ready() {
                watch.next().await
            } else {
                match tokio::time::timeout(Duration::from_secs(2), watch.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        if store.status().await?.values() == 0 {
                            self.mark_ready();
                        }
                        continue;
                    }
                }
            };
            let Some(entry) = next else { break };
            let entry = entry?;
            let value = match entry.operation {
                Operation::Put => Some(entry.value),
                Operation::Delete | Operation::Purge => None,
            };
            self.record(&entry.key, value);
            if entry.delta == 0 && !self.is_ready() {
                self.mark_ready();
            }
        }
        anyhow::bail!("watch ended")
    }

    fn mark_ready(&self) {
        tracing::info!(keys = self.key_count(), "desired-state index caught up");
        self.ready.send_replace(true);
    }
}
