//! The latest report of every device, in memory: the `agent-status` bucket's one
//! follower ([`iot_nats::BucketFollower`]: one ordered consumer, whatever the fleet
//! size) feeds it, and the status aggregator reads it.
//!
//! Reports are taken as [`harmony_reconciler_contracts::report`] says: only under
//! their own device's key, and a bad one keeps the previous one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use harmony_reconciler_contracts::report;
use harmony_reconciler_contracts::{AGENT_STATUS_BUCKET, Id};
use iot_nats::{BucketEntry, BucketFollower, BucketIndex};

use crate::fleet_aggregate::DeviceReport;

/// The latest report of every device, fed by one watch of the `agent-status` bucket.
pub struct DeviceIndex {
    reports: Mutex<HashMap<Id, DeviceReport>>,
    dirty: AtomicBool,
    /// Server time of the oldest report not yet aggregated: the aggregator's lag.
    pending_since: Mutex<Option<DateTime<Utc>>>,
    processed: AtomicU64,
    follower: BucketFollower,
}

impl Default for DeviceIndex {
    fn default() -> Self {
        Self {
            reports: Mutex::new(HashMap::new()),
            dirty: AtomicBool::new(false),
            pending_since: Mutex::new(None),
            processed: AtomicU64::new(0),
            follower: BucketFollower::new(AGENT_STATUS_BUCKET),
        }
    }
}

impl DeviceIndex {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Id, DeviceReport>> {
        self.reports.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every device's latest report, held while the guard lives.
    pub fn reports(&self) -> std::sync::MutexGuard<'_, HashMap<Id, DeviceReport>> {
        self.lock()
    }

    /// One device's latest report.
    pub fn report(&self, device: &Id) -> Option<DeviceReport> {
        self.lock().get(device).cloned()
    }

    /// Whether anything changed since the last call.
    pub fn take_changed(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }

    /// Records one KV entry of the agent-status bucket, stored at `received_at` by
    /// the server.
    pub fn record(&self, key: &str, value: Option<&[u8]>, received_at: DateTime<Utc>) {
        let device = match report::report_device(key) {
            Ok(device) => device,
            Err(e) => {
                tracing::debug!(error = %e, "ignoring an agent-status key");
                return;
            }
        };
        self.processed.fetch_add(1, Ordering::Relaxed);
        match value.map(|bytes| report::decode_report(&device, bytes)) {
            None => {
                self.lock().remove(&device);
            }
            Some(Ok(status)) => {
                let mut reports = self.lock();
                let report = DeviceReport::new(status, received_at).follow(reports.get(&device));
                reports.insert(device, report);
            }
            // One writer per key, and one bad report must not erase a device: keep
            // the previous one.
            Some(Err(e)) => tracing::warn!(error = %e, "device report refused; keeping the previous one"),
        }
        {
            let mut since = self.pending_since.lock().unwrap_or_else(PoisonError::into_inner);
            *since = Some(since.map_or(received_at, |s| s.min(received_at)));
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// KV entries recorded so far (for benchmarks of ingestion).
    pub fn reports_processed(&self) -> u64 {
        self.processed.load(Ordering::Relaxed)
    }

    /// Server time of the oldest change not yet aggregated (the aggregator's lag),
    /// and forgets it.
    pub fn take_pending_since(&self) -> Option<DateTime<Utc>> {
        self.pending_since.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the index has caught up with the bucket.
    pub fn is_caught_up(&self) -> bool {
        self.follower.is_caught_up()
    }

    /// Waits until the index has caught up with the bucket.
    pub async fn wait_caught_up(&self) {
        self.follower.wait_caught_up().await;
    }

    /// Follows the bucket forever, replaying it after errors and reconnects.
    pub async fn follow(&self, store: kv::Store, connects: Option<tokio::sync::watch::Receiver<u64>>) {
        self.follower.run(store, connects, self).await;
    }
}

impl BucketIndex for DeviceIndex {
    fn apply(&self, entry: BucketEntry) {
        self.record(&entry.key, entry.value.as_deref(), entry.stored_at);
    }

    fn caught_up(&self) {
        // Replayed history is not lag.
        self.take_pending_since();
    }
}
