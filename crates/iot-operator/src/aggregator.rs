//! The aggregator task: ONE watch over the whole `agent-status` bucket (one ordered
//! consumer, whatever the fleet size) keeps the latest report of every device in
//! memory; on changes (and on a timer, because staleness is a function of time) it
//! recomputes every deployment's aggregate and hands it to the status writer.
//!
//! It starts computing only once the watch has caught up with the bucket: before
//! that, every device would look unreported, and a restarted operator would write a
//! false outage into every resource.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use harmony_reconciler_contracts::{AgentStatus, DeploymentRef, Id, parse_agent_status_key};
use iot_api::Deployment;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use tokio::sync::watch;

use crate::aggregate::{AggregateInput, AggregateLimits, DeviceReport, aggregate, without_heartbeat_churn};
use crate::metrics::OperatorMetrics;
use crate::status_writer::StatusInbox;

#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    /// A device whose last report reached NATS longer ago than this is unreported.
    pub stale_after: Duration,
    /// Recompute at least this often (staleness moves with the clock).
    pub recompute_every: Duration,
    pub limits: AggregateLimits,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        Self {
            stale_after: Duration::from_secs(30),
            recompute_every: Duration::from_secs(1),
            limits: AggregateLimits::default(),
        }
    }
}

/// The latest report of every device, fed by one watch of the `agent-status` bucket.
pub struct DeviceIndex {
    reports: Mutex<HashMap<Id, DeviceReport>>,
    dirty: AtomicBool,
    /// Server time of the oldest report not yet aggregated: the aggregator's lag.
    pending_since: Mutex<Option<DateTime<Utc>>>,
    processed: AtomicU64,
    caught_up: watch::Sender<bool>,
}

impl Default for DeviceIndex {
    fn default() -> Self {
        Self {
            reports: Mutex::new(HashMap::new()),
            dirty: AtomicBool::new(false),
            pending_since: Mutex::new(None),
            processed: AtomicU64::new(0),
            caught_up: watch::channel(false).0,
        }
    }
}

impl DeviceIndex {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Id, DeviceReport>> {
        self.reports.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records one KV entry of the agent-status bucket, stored at `received_at` by
    /// the server.
    pub fn record(&self, key: &str, value: Option<&[u8]>, received_at: DateTime<Utc>) {
        let Ok(device) = parse_agent_status_key(key) else {
            tracing::debug!(key, "ignoring agent-status key that is not status.<device>");
            return;
        };
        self.processed.fetch_add(1, Ordering::Relaxed);
        match value {
            None => {
                self.lock().remove(&device);
            }
            Some(bytes) => match serde_json::from_slice::<AgentStatus>(bytes) {
                Ok(status) if status.device_id == device => {
                    self.lock().insert(device, DeviceReport::new(status, received_at));
                }
                Ok(status) => {
                    // One writer per key: a report under someone else's key is ignored.
                    tracing::warn!(key, claimed = %status.device_id, "status names a different device than its key; ignored");
                }
                Err(e) => {
                    tracing::warn!(key, error = %e, "undecodable device status; keeping the previous one");
                }
            },
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

    fn take_pending_since(&self) -> Option<DateTime<Utc>> {
        self.pending_since.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the watch has delivered everything the bucket held when it started.
    pub fn is_caught_up(&self) -> bool {
        *self.caught_up.borrow()
    }

    /// Waits until the index has caught up with the bucket.
    pub async fn wait_caught_up(&self) {
        let mut rx = self.caught_up.subscribe();
        if rx.wait_for(|c| *c).await.is_err() {
            tracing::debug!("device index dropped while waiting");
        }
    }

    /// Follows the bucket forever, re-watching after failures.
    pub async fn follow(&self, store: kv::Store) {
        loop {
            let pending = match store.status().await {
                Ok(s) => s.values(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read agent-status bucket info; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if pending == 0 {
                self.caught_up.send_replace(true);
            }
            match store.watch_with_history(">").await {
                Ok(mut watch) => loop {
                    // As in the desired-state index: counted messages may expire before
                    // the watch delivers them, so an empty bucket is checked again.
                    let next = if self.is_caught_up() {
                        watch.next().await
                    } else {
                        match tokio::time::timeout(Duration::from_secs(2), watch.next()).await {
                            Ok(next) => next,
                            Err(_) => {
                                if store.status().await.is_ok_and(|s| s.values() == 0) {
                                    self.caught_up.send_replace(true);
                                }
                                continue;
                            }
                        }
                    };
                    let Some(entry) = next else { break };
                    {
                        match entry {
                            Ok(e) => {
                                match e.operation {
                                    Operation::Put => self.record(&e.key, Some(&e.value), e.created),
                                    Operation::Delete | Operation::Purge => self.record(&e.key, None, e.created),
                                }
                                if e.delta == 0 && !self.is_caught_up() {
                                    tracing::info!(devices = self.len(), "device index caught up");
                                    // Replayed history is not lag.
                                    self.take_pending_since();
                                    self.caught_up.send_replace(true);
                                }
                            }
                            Err(err) => {
                                tracing::warn!(error = %err, "agent-status watch error");
                                break;
                            }
                        }
                    }
                },
                Err(e) => tracing::warn!(error = %e, "cannot watch agent-status"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Computes aggregates for every known deployment, forever. Call it once the index
/// has caught up.
pub async fn run_aggregator(
    index: Arc<DeviceIndex>,
    deployments: Store<Deployment>,
    status: StatusInbox,
    config: AggregatorConfig,
    metrics: Arc<OperatorMetrics>,
) {
    let mut sent: HashMap<DeploymentRef, iot_api::AggregateStatus> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_full = tokio::time::Instant::now();
    let stale_after = chrono::Duration::from_std(config.stale_after).unwrap_or(chrono::Duration::seconds(30));
    loop {
        tick.tick().await;
        let due = last_full.elapsed() >= config.recompute_every;
        if !index.dirty.swap(false, Ordering::AcqRel) && !due {
            continue;
        }
        last_full = tokio::time::Instant::now();
        let now = Utc::now();
        let mut fresh = Vec::new();
        {
            let reports = index.lock();
            let objects = deployments.state();
            for obj in &objects {
                let (Some(ns), name) = (obj.namespace(), obj.name_any()) else {
                    continue;
                };
                if obj.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let (Ok(dep), Ok(targets)) = (DeploymentRef::new(ns, name), obj.spec.target_ids()) else {
                    continue;
                };
                let agg = aggregate(
                    AggregateInput {
                        deployment: &dep,
                        generation: obj.metadata.generation,
                        spec_hash: &obj.spec.score.spec_hash(),
                        targets: &targets,
                    },
                    &reports,
                    now,
                    stale_after,
                    config.limits,
                );
                fresh.push((dep, agg));
            }
            let targeted: BTreeSet<Id> = objects
                .iter()
                .flat_map(|o| o.spec.target_devices.iter())
                .filter_map(|d| Id::new(d.as_str()).ok())
                .collect();
            metrics.record_devices(&reports, &targeted, now, stale_after);
        }
        if let Some(since) = index.take_pending_since() {
            metrics
                .aggregator_lag
                .set((now - since).num_milliseconds().max(0) as f64 / 1000.0);
        }
        let live: std::collections::HashSet<DeploymentRef> = fresh.iter().map(|(d, _)| d.clone()).collect();
        sent.retain(|d, _| live.contains(d));
        for (dep, agg) in fresh {
            let previous = sent.get(&dep).cloned().or_else(|| status.live_aggregate(&dep));
            let agg = without_heartbeat_churn(previous.as_ref(), agg);
            if sent.get(&dep) == Some(&agg) && status.has_aggregate(&dep) {
                continue;
            }
            sent.insert(dep.clone(), agg.clone());
            status.aggregate(dep, agg);
        }
    }
}
