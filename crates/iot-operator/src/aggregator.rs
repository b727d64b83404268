//! The aggregator task: ONE watch over the whole `agent-status` bucket (one ordered
//! consumer, whatever the fleet size) keeps the latest report of every device in
//! memory; on changes (and on a timer, because staleness is a function of time) it
//! recomputes every deployment's aggregate and hands it to the status writer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use chrono::Utc;
use futures::StreamExt;
use harmony_reconciler_contracts::{AgentStatus, DeploymentRef, Id, parse_agent_status_key};
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use tokio::sync::mpsc;

use crate::aggregate::{AggregateLimits, DeviceReport, aggregate, damp_heartbeat};
use crate::aggregate_types::AggregateStatus;
use crate::crd::Deployment;
use crate::kv_plan::target_ids;
use crate::status_writer::StatusUpdate;

#[derive(Debug, Default)]
pub struct AggregatorMetrics {
    pub reports_processed: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    /// A device whose last heartbeat is older than this counts as unreported.
    pub stale_after: Duration,
    /// Recompute at least this often (staleness moves with the clock).
    pub recompute_every: Duration,
    /// Smallest change of `last_heartbeat_at` worth a status write on its own.
    pub heartbeat_granularity: Duration,
    pub limits: AggregateLimits,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        Self {
            stale_after: Duration::from_secs(30),
            recompute_every: Duration::from_secs(1),
            heartbeat_granularity: Duration::from_secs(10),
            limits: AggregateLimits::default(),
        }
    }
}

#[derive(Default)]
pub struct DeviceIndex {
    reports: Mutex<HashMap<Id, DeviceReport>>,
    dirty: AtomicBool,
    pub metrics: AggregatorMetrics,
}

impl DeviceIndex {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Id, DeviceReport>> {
        self.reports.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records one KV entry of the agent-status bucket.
    pub fn record(&self, key: &str, value: Option<&[u8]>) {
        let Ok(device) = parse_agent_status_key(key) else {
            tracing::debug!(key, "ignoring agent-status key that is not status.<device>");
            return;
        };
        self.metrics.reports_processed.fetch_add(1, Ordering::Relaxed);
        match value {
            None => {
                self.lock().remove(&device);
            }
            Some(bytes) => match serde_json::from_slice::<AgentStatus>(bytes) {
                Ok(status) if status.device_id == device => {
                    self.lock().insert(device, DeviceReport::from(status));
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
        self.dirty.store(true, Ordering::Release);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Follows the bucket forever, re-watching after failures.
    pub async fn follow(&self, store: kv::Store) {
        loop {
            match store.watch_with_history(">").await {
                Ok(mut watch) => {
                    while let Some(entry) = watch.next().await {
                        match entry {
                            Ok(e) => match e.operation {
                                Operation::Put => self.record(&e.key, Some(&e.value)),
                                Operation::Delete | Operation::Purge => self.record(&e.key, None),
                            },
                            Err(err) => {
                                tracing::warn!(error = %err, "agent-status watch error");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot watch agent-status"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Computes aggregates for every known deployment, forever.
pub async fn run_aggregator(
    index: Arc<DeviceIndex>,
    deployments: Store<Deployment>,
    status: mpsc::Sender<StatusUpdate>,
    config: AggregatorConfig,
) {
    let mut sent: HashMap<DeploymentRef, AggregateStatus> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_full = tokio::time::Instant::now();
    let stale_after = chrono::Duration::from_std(config.stale_after).unwrap_or(chrono::Duration::seconds(30));
    let granularity = chrono::Duration::from_std(config.heartbeat_granularity).unwrap_or(chrono::Duration::seconds(10));
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
            for obj in deployments.state() {
                let (Some(ns), name) = (obj.namespace(), obj.name_any()) else {
                    continue;
                };
                if obj.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let (Ok(dep), Ok(targets)) = (DeploymentRef::new(ns, name), target_ids(&obj.spec)) else {
                    continue;
                };
                let agg = aggregate(
                    &dep,
                    &obj.spec.score.spec_hash(),
                    &targets,
                    &reports,
                    now,
                    stale_after,
                    config.limits,
                );
                fresh.push((dep, agg));
            }
        }
        let live: std::collections::HashSet<DeploymentRef> = fresh.iter().map(|(d, _)| d.clone()).collect();
        sent.retain(|d, _| live.contains(d));
        for (dep, agg) in fresh {
            let agg = damp_heartbeat(sent.get(&dep), agg, granularity);
            if sent.get(&dep) == Some(&agg) {
                continue;
            }
            sent.insert(dep.clone(), agg.clone());
            if status
                .send(StatusUpdate::Aggregate {
                    deployment: dep,
                    aggregate: agg,
                })
                .await
                .is_err()
            {
                tracing::error!("status writer stopped; aggregator exits");
                return;
            }
        }
    }
}
