//! The single writer of `Deployment.status`.
//!
//! The controller (write path) and the aggregator (fleet truth) drop what they know
//! into a [`StatusInbox`]; that never blocks them, however slow the API server is.
//! The writer merges the inputs with the object's *live* status (from the
//! controller's reflector), and writes only when the result differs from it, at most
//! once per `min_interval` per resource, a few resources at a time. Keeping the live
//! `lastTransitionTime`s and comparing with the live status is what makes an
//! operator restart write nothing at all.
//!
//! Writes are server-side apply on the status subresource with field manager
//! `iot-operator`, so fields that disappear are removed. A 404 means the resource is
//! gone: its entry is dropped. A 422 means the API server rejects what we computed:
//! it is logged and not retried until the inputs change. Anything else is retried
//! with a backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use harmony_reconciler_contracts::DeploymentRef;
use iot_api::{AggregateStatus, Deployment, DeploymentStatus};
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::conditions::{StatusInputs, WriteOutcome, build_status};
use crate::metrics::OperatorMetrics;

pub const FIELD_MANAGER: &str = "iot-operator";
/// Status writes in flight at once.
const CONCURRENT_WRITES: usize = 8;
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// An entry whose resource has not been in the reflector for this long is dropped.
const FORGET_ABSENT_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Entry {
    inputs: StatusInputs,
    /// What this operator process last wrote. The reflector can lag behind our own
    /// writes by a watch round trip; comparisons and transition times use this when
    /// there is one, the live object otherwise (after a restart).
    written: Option<DeploymentStatus>,
    dirty: bool,
    last_write: Option<Instant>,
    failures: u32,
    retry_at: Option<Instant>,
    /// The API server refused the status computed from these inputs (422).
    rejected: Option<StatusInputs>,
    /// The reflector has had the object: its absence now means a delete.
    seen: bool,
    absent_since: Option<Instant>,
}

struct Shared {
    entries: Mutex<HashMap<DeploymentRef, Entry>>,
    wake: Notify,
    store: Store<Deployment>,
}

/// Where status inputs go. Cheap to clone; sending never blocks.
#[derive(Clone)]
pub struct StatusInbox {
    shared: Arc<Shared>,
}

impl StatusInbox {
    pub fn new(store: Store<Deployment>) -> Self {
        Self {
            shared: Arc::new(Shared {
                entries: Mutex::new(HashMap::new()),
                wake: Notify::new(),
                store,
            }),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<DeploymentRef, Entry>> {
        self.shared.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The write path's outcome for `generation`.
    pub fn written(&self, deployment: DeploymentRef, generation: Option<i64>, outcome: WriteOutcome) {
        {
            let mut entries = self.entries();
            let e = entries.entry(deployment).or_default();
            if e.inputs.write_generation == generation && e.inputs.write.as_ref() == Some(&outcome) {
                return;
            }
            e.inputs.write_generation = generation;
            if matches!(outcome, WriteOutcome::Written { .. }) {
                e.inputs.last_written = Some(outcome.clone());
            }
            e.inputs.write = Some(outcome);
            e.dirty = true;
        }
        self.shared.wake.notify_one();
    }

    /// A fresh fleet aggregate (it carries its generation).
    pub fn aggregate(&self, deployment: DeploymentRef, aggregate: AggregateStatus) {
        {
            let mut entries = self.entries();
            let e = entries.entry(deployment).or_default();
            if e.inputs.aggregate.as_ref() == Some(&aggregate) {
                return;
            }
            e.inputs.aggregate = Some(aggregate);
            e.dirty = true;
        }
        self.shared.wake.notify_one();
    }

    /// The rollout's status (its conditions come from it; `.status.rollout` itself
    /// is written by the write path).
    pub fn rollout(&self, deployment: DeploymentRef, rollout: Option<iot_api::RolloutStatus>) {
        {
            let mut entries = self.entries();
            let e = entries.entry(deployment).or_default();
            if e.inputs.rollout == rollout {
                return;
            }
            e.inputs.rollout = rollout;
            e.dirty = true;
        }
        self.shared.wake.notify_one();
    }

    /// The resource is gone; nothing more is written for it.
    pub fn forget(&self, deployment: &DeploymentRef) {
        self.entries().remove(deployment);
    }

    /// Whether an aggregate for `deployment` is held (the aggregator re-sends it if
    /// not, say after the entry was dropped and the resource came back).
    pub fn has_aggregate(&self, deployment: &DeploymentRef) -> bool {
        self.entries()
            .get(deployment)
            .is_some_and(|e| e.inputs.aggregate.is_some())
    }

    /// The aggregate the live object carries, if any.
    pub fn live_aggregate(&self, deployment: &DeploymentRef) -> Option<AggregateStatus> {
        self.live(deployment)?.aggregate
    }

    fn live(&self, deployment: &DeploymentRef) -> Option<DeploymentStatus> {
        let key = ObjectRef::new(deployment.name()).within(deployment.namespace());
        Some(self.shared.store.get(&key)?.status.clone().unwrap_or_default())
    }

    fn in_store(&self, deployment: &DeploymentRef) -> bool {
        let key = ObjectRef::new(deployment.name()).within(deployment.namespace());
        self.shared.store.get(&key).is_some()
    }

    pub fn pending(&self) -> usize {
        self.entries().values().filter(|e| e.dirty).count()
    }
}

/// Whether `inputs` say something about every part `live` has. After a restart the
/// write outcome and the aggregate arrive one after the other; writing with only
/// one of them would drop the other's part from the status and put it back a moment
/// later with new transition times: a false flap for everyone watching.
fn covers(inputs: &StatusInputs, live: &DeploymentStatus) -> bool {
    let has_written = live
        .conditions
        .iter()
        .any(|c| c.type_ == iot_api::conditions::DESIRED_STATE_WRITTEN);
    (live.aggregate.is_none() || inputs.aggregate.is_some()) && (!has_written || inputs.write.is_some())
}

pub struct StatusWriter {
    client: kube::Client,
    inbox: StatusInbox,
    min_interval: Duration,
    metrics: Arc<OperatorMetrics>,
}

enum WriteResult {
    Written(Box<DeploymentStatus>),
    Unchanged,
    Gone,
    Rejected(String),
    Failed(String),
}

impl StatusWriter {
    pub fn new(
        client: kube::Client,
        inbox: StatusInbox,
        min_interval: Duration,
        metrics: Arc<OperatorMetrics>,
    ) -> Self {
        Self {
            client,
            inbox,
            min_interval,
            metrics,
        }
    }

    /// Runs forever.
    pub async fn run(self) {
        let tick = Duration::from_millis(100).min(self.min_interval);
        loop {
            tokio::select! {
                () = self.inbox.shared.wake.notified() => {}
                () = tokio::time::sleep(tick) => {}
            }
            self.flush().await;
        }
    }

    /// Computes what is due and writes it, a few resources at a time.
    async fn flush(&self) {
        let now = Instant::now();
        let mut due: Vec<(DeploymentRef, StatusInputs, Option<DeploymentStatus>)> = Vec::new();
        {
            let mut entries = self.inbox.entries();
            entries.retain(|dep, e| {
                if self.inbox.in_store(dep) {
                    e.seen = true;
                    e.absent_since = None;
                    return true;
                }
                if e.seen {
                    // The reflector saw it deleted.
                    return false;
                }
                // Not in the reflector yet: give a new resource time to show up.
                let since = *e.absent_since.get_or_insert(now);
                now.duration_since(since) < FORGET_ABSENT_AFTER
            });
            for (dep, e) in entries.iter_mut().filter(|(_, e)| e.dirty) {
                let waiting = e.last_write.is_some_and(|t| now.duration_since(t) < self.min_interval)
                    || e.retry_at.is_some_and(|t| t > now)
                    || e.rejected.as_ref() == Some(&e.inputs);
                if waiting {
                    continue;
                }
                let Some(live) = self.inbox.live(dep) else { continue };
                let baseline = e.written.clone().unwrap_or(live);
                if covers(&e.inputs, &baseline) {
                    e.dirty = false;
                    due.push((dep.clone(), e.inputs.clone(), Some(baseline)));
                }
            }
        }
        let mut writes: FuturesUnordered<_> = FuturesUnordered::new();
        let mut queue = due.into_iter();
        loop {
            while writes.len() < CONCURRENT_WRITES {
                let Some((dep, inputs, baseline)) = queue.next() else {
                    break;
                };
                writes.push(async move {
                    let result = self.write_one(&dep, &inputs, baseline).await;
                    (dep, inputs, result)
                });
            }
            let Some((dep, inputs, result)) = writes.next().await else {
                break;
            };
            self.settle(dep, inputs, result);
        }
    }

    async fn write_one(
        &self,
        dep: &DeploymentRef,
        inputs: &StatusInputs,
        baseline: Option<DeploymentStatus>,
    ) -> WriteResult {
        let status = build_status(baseline.as_ref(), inputs, Utc::now());
        // `.status.rollout` has a writer of its own (the write path); this one
        // neither writes nor compares it.
        let baseline = baseline.map(|mut b| {
            b.rollout = None;
            b
        });
        if baseline.as_ref() == Some(&status) {
            return WriteResult::Unchanged;
        }
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), dep.namespace());
        let patch = serde_json::json!({
            "apiVersion": "iot.nationtech.io/v1alpha1",
            "kind": "Deployment",
            "status": status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let patch = Patch::Apply(&patch);
        let call = api.patch_status(dep.name(), &params, &patch);
        match tokio::time::timeout(WRITE_TIMEOUT, call).await {
            Err(_) => WriteResult::Failed(format!("no answer within {WRITE_TIMEOUT:?}")),
            Ok(Ok(_)) => WriteResult::Written(Box::new(status)),
            Ok(Err(kube::Error::Api(e))) if e.code == 404 => WriteResult::Gone,
            Ok(Err(kube::Error::Api(e))) if e.code == 422 => WriteResult::Rejected(e.message),
            Ok(Err(e)) => WriteResult::Failed(e.to_string()),
        }
    }

    fn settle(&self, dep: DeploymentRef, inputs: StatusInputs, result: WriteResult) {
        let now = Instant::now();
        let label = match &result {
            WriteResult::Written(_) => "ok",
            WriteResult::Unchanged => "unchanged",
            WriteResult::Gone => "not_found",
            WriteResult::Rejected(_) => "invalid",
            WriteResult::Failed(_) => "error",
        };
        self.metrics
            .status_writes
            .get_or_create(&crate::metrics::result(label))
            .inc();
        let gone_for_good = matches!(result, WriteResult::Gone) && !self.inbox.in_store(&dep);
        let mut entries = self.inbox.entries();
        if gone_for_good {
            tracing::debug!(deployment = %dep, "resource gone; dropping its status");
            entries.remove(&dep);
            return;
        }
        let Some(e) = entries.get_mut(&dep) else { return };
        match result {
            WriteResult::Written(status) => {
                e.written = Some(*status);
                e.last_write = Some(now);
                e.failures = 0;
                e.retry_at = None;
            }
            WriteResult::Unchanged => {}
            WriteResult::Gone => {
                // A 404 while the reflector still has the object: the API server may be
                // restarting (its CRDs not loaded yet). Try again later.
                e.failures += 1;
                e.retry_at = Some(now + iot_timing::backoff(e.failures, Duration::from_secs(30)));
                e.dirty = true;
            }
            WriteResult::Rejected(message) => {
                tracing::error!(deployment = %dep, error = %message, "the API server rejects the status; not retrying until it changes");
                e.rejected = Some(inputs);
            }
            WriteResult::Failed(message) => {
                e.failures += 1;
                let delay = iot_timing::backoff(e.failures, Duration::from_secs(30));
                tracing::warn!(deployment = %dep, error = %message, retry_in = ?delay, "status write failed");
                e.retry_at = Some(now + delay);
                e.dirty = true;
            }
        }
    }
}
