//! The status aggregator: on every change of the device index (and on a timer,
//! because staleness is a function of time) it recomputes every deployment's
//! aggregate and hands it to the status writer.
//!
//! It starts computing only once the device index has caught up with its bucket:
//! before that, every device would look unreported, and a restarted operator would
//! write a false outage into every resource.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use harmony_reconciler_contracts::report::Staleness;
use harmony_reconciler_contracts::{DeploymentRef, Id};
use iot_api::Deployment;
use kube::ResourceExt;
use kube::runtime::reflector::Store;

use crate::controller::Fleet;
use crate::device_index::DeviceIndex;
use crate::fleet_aggregate::{AggregateInput, AggregateLimits, aggregate, last_good_revision, without_heartbeat_churn};
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
            stale_after: Staleness::DEFAULT_AFTER,
            recompute_every: Duration::from_secs(1),
            limits: AggregateLimits::default(),
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
    fleet: Fleet,
) {
    let mut sent: HashMap<DeploymentRef, iot_api::AggregateStatus> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_full = tokio::time::Instant::now();
    let staleness = Staleness::after(config.stale_after);
    loop {
        tick.tick().await;
        let due = last_full.elapsed() >= config.recompute_every;
        if !index.take_changed() && !due {
            continue;
        }
        last_full = tokio::time::Instant::now();
        let now = Utc::now();
        let mut fresh = Vec::new();
        let mut targeted: BTreeSet<Id> = BTreeSet::new();
        {
            let reports = index.reports();
            let objects = deployments.state();
            for obj in &objects {
                let (Some(ns), name) = (obj.namespace(), obj.name_any()) else {
                    continue;
                };
                if obj.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let Ok(dep) = DeploymentRef::new(ns, name) else {
                    continue;
                };
                // Count over the devices the write path gave it (a selector's
                // matches plus held removals); before its first reconcile, over the
                // listed devices, and a selector deployment waits.
                let resolved = fleet.book.get(&dep);
                let listed;
                let raw_hash = obj.spec.score.spec_hash();
                let (targets, revision, spec_hash, generation) = match &resolved {
                    Some(r) => match &r.spec_hash {
                        Some(h) => (&r.targets, r.revision, h, r.generation),
                        None => (&r.targets, r.revision, &raw_hash, obj.metadata.generation),
                    },
                    None if obj.spec.selector.is_some() => continue,
                    None => match obj.spec.target_ids() {
                        Ok(t) => {
                            listed = t;
                            (&listed, None, &raw_hash, obj.metadata.generation)
                        }
                        Err(_) => continue,
                    },
                };
                let agg = aggregate(
                    AggregateInput {
                        deployment: &dep,
                        generation,
                        spec_hash,
                        targets,
                        revision,
                    },
                    &reports,
                    now,
                    staleness,
                    config.limits,
                );
                targeted.extend(targets.iter().cloned());
                fresh.push((dep, agg));
            }
            metrics.record_devices(&reports, &targeted, now, staleness);
            metrics
                .unregistered_devices
                .set(crate::device_status::unregistered(reports.keys(), &fleet.devices).len() as i64);
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
            let mut agg = agg;
            agg.last_good_revision = last_good_revision(previous.as_ref(), &agg);
            let agg = without_heartbeat_churn(previous.as_ref(), agg);
            if sent.get(&dep) == Some(&agg) && status.has_aggregate(&dep) {
                continue;
            }
            sent.insert(dep.clone(), agg.clone());
            status.aggregate(dep, agg);
        }
    }
}
