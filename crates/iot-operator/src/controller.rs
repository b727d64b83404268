//! The write path: `Deployment` resources -> per-device desired state in KV.
//!
//! Level-triggered with kube-runtime's Controller: every reconcile compares the
//! whole resource with what KV holds (via the index) and writes only differences.
//! A finalizer guarantees the resource's keys are removed before it disappears.
//! Only changes of the spec (generation) or finalizers trigger a reconcile: the
//! operator's own status writes do not, and neither do devices' reports. A resync
//! timer still looks at everything.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt as _;
use harmony_reconciler_contracts::{DESIRED_STATE_BUCKET, DeploymentRef};
use iot_api::conditions::{
    REASON_IMAGE_NOT_RESOLVED, REASON_INVALID_SPEC, REASON_KUBERNETES_UNAVAILABLE, REASON_NATS_UNAVAILABLE,
    REASON_REGISTRY_UNAVAILABLE,
};
use iot_api::{CONFIRM_SHRINK_ANNOTATION, Deployment, Device};
use iot_nats::write::{DEFAULT_WINDOW, write_batch};
use kube::runtime::Predicate;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, ResourceExt};

use crate::conditions::{HeldRemovals, WriteOutcome};
use crate::desired_index::DesiredIndex;
use crate::kv_plan::{plan_apply_each, plan_cleanup, target_ids, without_paused};
use crate::metrics::OperatorMetrics;
use crate::revisions::Revisions;
use crate::status_writer::StatusInbox;
use crate::targeting::{Resolved, ShrinkLedger, TargetBook, guard_removals, select};

pub const FINALIZER: &str = "iot.nationtech.io/desired-state";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("resource has no namespace")]
    NoNamespace,
    #[error("invalid resource: {0}")]
    Invalid(String),
    #[error("NATS is not available yet: {0}")]
    NatsNotReady(&'static str),
    #[error("writing desired state to NATS failed ({acked} of {total} writes acknowledged): {source}")]
    Nats {
        acked: usize,
        total: usize,
        #[source]
        source: iot_nats::NatsError,
    },
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("the Device inventory is not loaded yet")]
    DevicesNotReady,
    #[error(transparent)]
    Revision(#[from] crate::revisions::RevisionError),
    #[error(transparent)]
    RolloutStatus(#[from] crate::rollout_write::RolloutWriteError),
    /// A tag of a new revision could not be resolved: nothing was recorded or
    /// written, so the devices keep the previous revision.
    #[error("{source}; the devices keep the revision they run until it resolves")]
    Images {
        deployment: DeploymentRef,
        #[source]
        source: iot_registry::resolve::ResolveError,
    },
}

impl Error {
    /// Label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NoNamespace | Error::Invalid(_) => "invalid",
            Error::NatsNotReady(_) | Error::Nats { .. } => "nats",
            Error::Finalizer(_) | Error::DevicesNotReady | Error::Revision(_) | Error::RolloutStatus(_) => "kubernetes",
            Error::Images { .. } => "registry",
        }
    }
}

/// Shared state of the controller.
pub struct Ctx {
    pub client: kube::Client,
    pub js: jetstream::Context,
    pub index: Arc<DesiredIndex>,
    pub status: StatusInbox,
    pub resync: Duration,
    pub metrics: Arc<OperatorMetrics>,
    /// The Device inventory (a reflector), for selectors.
    pub devices: Store<Device>,
    /// What each reconcile decided, for the aggregator and the Device watch.
    pub book: Arc<TargetBook>,
    revisions: Revisions,
    /// Pins image tags on the platform's registries (`None`: none is managed).
    pub pinner: crate::images::SharedPinner,
    rollouts: crate::rollout_write::Rollouts,
    ledger: ShrinkLedger,
    failures: Mutex<HashMap<DeploymentRef, u32>>,
}

impl Ctx {
    // Each part is shared with another task of the daemon; a builder would only
    // move the list elsewhere.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: kube::Client,
        js: jetstream::Context,
        index: Arc<DesiredIndex>,
        status: StatusInbox,
        resync: Duration,
        metrics: Arc<OperatorMetrics>,
        fleet: Fleet,
        rollouts: crate::rollout_write::Rollouts,
    ) -> Self {
        Self {
            client,
            js,
            index,
            status,
            resync,
            metrics,
            devices: fleet.devices,
            book: fleet.book,
            revisions: Revisions::default(),
            pinner: None,
            rollouts,
            ledger: ShrinkLedger::default(),
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<DeploymentRef, u32>> {
        self.failures.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Retry delay after the n-th consecutive failure of one resource: 1 s doubling to 60 s.
pub fn error_backoff(failures: u32) -> Duration {
    iot_timing::backoff(failures, Duration::from_secs(60))
}

fn deployment_ref(obj: &Deployment) -> Result<DeploymentRef, Error> {
    let ns = obj.namespace().ok_or(Error::NoNamespace)?;
    DeploymentRef::new(ns, obj.name_any()).map_err(|e| Error::Invalid(e.to_string()))
}

pub async fn reconcile(obj: Arc<Deployment>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let dep = deployment_ref(&obj)?;
    tracing::info!(namespace = dep.namespace(), name = dep.name(), generation = ?obj.metadata.generation, "reconcile");
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), dep.namespace());
    // A new Deployment's keys go out before the finalizer round trip (a patch of the
    // whole object, then waiting for its watch event), which at 10,000 targets came
    // to half a second before any device heard of it (BENCHMARKS.md, fan-out). If the
    // Deployment is deleted before the finalizer lands, the orphan collector removes
    // what this wrote.
    if obj.metadata.deletion_timestamp.is_none() && !obj.finalizers().iter().any(|f| f == FINALIZER) {
        apply(&obj, &dep, &ctx).await?;
    }
    let result = finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Event::Apply(obj) => apply(&obj, &dep, &ctx).await,
            Event::Cleanup(_) => cleanup(&dep, &ctx).await,
        }
    })
    .await;
    match result {
        Ok(action) => {
            ctx.failures().remove(&dep);
            ctx.metrics
                .reconciles
                .get_or_create(&crate::metrics::result("ok"))
                .inc();
            Ok(action)
        }
        Err(kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e)) => {
            Err(e)
        }
        Err(e) => Err(Error::Finalizer(e.to_string())),
    }
}

fn ready_js(ctx: &Ctx) -> Result<&jetstream::Context, Error> {
    // The controller starts after the index has caught up; it is reset (and so not
    // ready) only while its watch is being rebuilt.
    if !ctx.index.is_ready() {
        return Err(Error::NatsNotReady("desired-state index is being rebuilt"));
    }
    Ok(&ctx.js)
}

async fn apply(obj: &Deployment, dep: &DeploymentRef, ctx: &Ctx) -> Result<Action, Error> {
    let generation = obj.metadata.generation;
    let invalid = |message: String| {
        // Not retried quickly: only a spec change can fix it.
        tracing::warn!(deployment = %dep, error = %message, "invalid resource");
        ctx.status.written(
            dep.clone(),
            generation,
            WriteOutcome::Failed {
                reason: REASON_INVALID_SPEC,
                message,
            },
        );
        Ok(Action::requeue(ctx.resync))
    };
    if let Some(selector) = &obj.spec.selector
        && let Err(e) = selector.validate()
    {
        return invalid(e.to_string());
    }
    if let Some(rollout) = &obj.spec.rollout
        && let Err(e) = rollout.validate()
    {
        return invalid(e.to_string());
    }
    let listed = match target_ids(&obj.spec) {
        Ok(t) => t,
        Err(e) => return invalid(format!("spec.targetDevices: {e}")),
    };
    let js = ready_js(ctx)?;
    let problems = harmony_reconciler_contracts::validate_score(&obj.spec.score.to_wire());
    if !problems.is_empty() {
        // The schema cannot express every rule (unique service names, say); devices
        // would each reject it, so say it once, here.
        return invalid(format!(
            "spec.score: {}",
            harmony_reconciler_contracts::describe_problems(&problems)
        ));
    }
    // Before the inventory is loaded, every selector would match nothing (the
    // deployment would be taken off every device) and no device would be paused.
    if !devices_ready(&ctx.devices).await {
        return Err(Error::DevicesNotReady);
    }
    let existing = ctx.index.existing(dep);
    let mut shrink = None;
    let (targets, matched, held) = match &obj.spec.selector {
        None => (listed, None, None),
        Some(selector) => {
            let matched = select(ctx.devices.state().iter().map(|d| d.as_ref()), selector);
            let holding = existing.keys().cloned().collect();
            let confirmation = obj.annotations().get(CONFIRM_SHRINK_ANNOTATION).map(String::as_str);
            let recent = ctx.ledger.recent(dep);
            let guarded = guard_removals(matched, &holding, &recent, obj.spec.max_shrink_percent(), confirmation);
            shrink = Some((guarded.removals.clone(), guarded.confirmed));
            let held = guarded.held.map(|h| {
                tracing::warn!(deployment = %dep, held = h.devices.len(), matched = guarded.matched, "selector shrank by too much at once; holding the removals");
                HeldRemovals {
                    count: h.devices.len(),
                    token: h.token,
                    namespace: dep.namespace().to_owned(),
                    name: dep.name().to_owned(),
                }
            });
            (guarded.targets, Some(guarded.matched), held)
        }
    };
    // The revision exists before any device is told its number; with a rollout
    // it carries the batches, decided over the devices matched now.
    // Batch selectors and failure clusters read the targets' labels.
    let labels = match &obj.spec.rollout {
        Some(_) => target_labels(&ctx.devices, &targets),
        None => Default::default(),
    };
    let current = ctx
        .revisions
        .ensure(&ctx.client, obj, dep, ctx.pinner.as_deref(), || {
            let spec = obj.spec.rollout.as_ref()?;
            let batches = crate::rollout_plan::plan_batches(dep, spec, &targets, &labels);
            Some(iot_api::RolloutPlan {
                batches: batches
                    .into_iter()
                    .map(|b| b.into_iter().map(|d| d.to_string()).collect())
                    .collect(),
            })
        })
        .await?;
    let revision = current.number;
    let paused = paused_devices(&ctx.devices);
    let new_payload = crate::kv_plan::payload_of(dep, &current.score, Some(revision));
    let mut requeue = ctx.resync;
    let mut rollout_status = None;
    let desired: std::collections::BTreeMap<harmony_reconciler_contracts::Id, bytes::Bytes> =
        match (&obj.spec.rollout, &current.plan) {
            (Some(_), Some(rollout_plan)) => {
                let stable_revision = ctx.rollouts.stable_revision(obj, dep, revision);
                let stable = match stable_revision {
                    Some(n) => ctx
                        .revisions
                        .score_of(&ctx.client, dep, n)
                        .await?
                        .map(|score| (n, crate::kv_plan::payload_of(dep, &score, Some(n)))),
                    None => None,
                };
                let stored = ctx.index.existing_stored(dep);
                let stepped = ctx.rollouts.step(&crate::rollout_write::StepContext {
                    obj,
                    dep,
                    revision,
                    plan: rollout_plan,
                    targets: &targets,
                    new_payload: &new_payload,
                    spec_hash: &current.spec_hash,
                    stable,
                    existing: &stored,
                    labels: &labels,
                    paused: &paused,
                });
                if let Some(again) = stepped.again {
                    requeue = requeue.min(again);
                }
                rollout_status = Some(stepped.status);
                stepped.desired
            }
            _ => targets.iter().map(|d| (d.clone(), new_payload.clone())).collect(),
        };
    let plan = without_paused(plan_apply_each(&desired, &existing), &paused);
    // A rollout that stops (suspended, rolling back) says so in the API server before
    // KV changes on its word: KV alone would not tell a restarted operator that the
    // devices without the new revision were rolled back rather than not reached yet.
    // A step that only dispatches is written after KV, which records the dispatch
    // itself (a restarted operator finds the batch from it), so that the status
    // write of a large object does not delay the devices (BENCHMARKS.md, rollouts).
    let stops = rollout_status.as_ref().is_some_and(|s| {
        matches!(
            s.phase,
            iot_api::RolloutPhase::Suspended | iot_api::RolloutPhase::RollingBack | iot_api::RolloutPhase::RolledBack
        )
    });
    if stops || plan.is_empty() {
        ctx.rollouts
            .persist(&ctx.client, dep, obj, rollout_status.as_ref(), !plan.is_empty())
            .await?;
    }
    ctx.status.rollout(dep.clone(), rollout_status.clone());
    if !plan.is_empty() {
        // A Device event during the write must find this deployment among the
        // holders of both the old and the new targets.
        let mut during: std::collections::BTreeSet<harmony_reconciler_contracts::Id> =
            ctx.book.get(dep).map(|r| r.targets.clone()).unwrap_or_default();
        during.extend(targets.iter().cloned());
        ctx.book.set(
            dep.clone(),
            Resolved {
                targets: during,
                revision: Some(revision),
                spec_hash: Some(current.spec_hash.clone()),
                generation,
            },
        );
        tracing::info!(deployment = %dep, puts = plan.puts.len(), purges = plan.purges.len(), revision, "writing desired state");
        write(js, ctx, dep, &plan).await?;
        if !stops {
            ctx.rollouts
                .persist(&ctx.client, dep, obj, rollout_status.as_ref(), true)
                .await?;
        }
    }
    match shrink {
        Some((_, true)) => ctx.ledger.clear(dep),
        Some((removed, false)) => ctx
            .ledger
            .record(dep, removed.into_iter().filter(|d| plan.purges.contains(d))),
        None => {}
    }
    let devices = targets.len();
    ctx.book.set(
        dep.clone(),
        Resolved {
            targets,
            revision: Some(revision),
            spec_hash: Some(current.spec_hash.clone()),
            generation,
        },
    );
    ctx.status.written(
        dep.clone(),
        generation,
        WriteOutcome::Written {
            devices,
            matched,
            held,
            revision: Some(revision),
            images: current.images.clone(),
        },
    );
    Ok(Action::requeue(requeue))
}

/// The labels of the target Devices (for batch selectors).
fn target_labels(
    devices: &Store<Device>,
    targets: &std::collections::BTreeSet<harmony_reconciler_contracts::Id>,
) -> std::collections::BTreeMap<harmony_reconciler_contracts::Id, std::collections::BTreeMap<String, String>> {
    targets
        .iter()
        .filter_map(|d| {
            let obj = devices.get(&reflector::ObjectRef::new(d.as_str()))?;
            Some((d.clone(), obj.labels().clone()))
        })
        .collect()
}

/// Devices in maintenance (`spec.paused`).
fn paused_devices(devices: &Store<Device>) -> std::collections::BTreeSet<harmony_reconciler_contracts::Id> {
    devices
        .state()
        .iter()
        .filter(|d| d.spec.paused)
        .filter_map(|d| harmony_reconciler_contracts::Id::new(d.metadata.name.clone()?).ok())
        .collect()
}

/// Whether the Device reflector has its first full list (waits a little for it).
async fn devices_ready(devices: &Store<Device>) -> bool {
    tokio::time::timeout(Duration::from_secs(5), devices.wait_until_ready())
        .await
        .is_ok_and(|r| r.is_ok())
}

async fn cleanup(dep: &DeploymentRef, ctx: &Ctx) -> Result<Action, Error> {
    let js = ready_js(ctx)?;
    let plan = plan_cleanup(&ctx.index.existing(dep));
    tracing::info!(deployment = %dep, purges = plan.purges.len(), "deployment deleted; removing its desired state");
    write(js, ctx, dep, &plan).await?;
    ctx.revisions.delete_all(&ctx.client, dep).await?;
    ctx.rollouts.forget(dep);
    ctx.book.forget(dep);
    ctx.ledger.clear(dep);
    ctx.status.forget(dep);
    Ok(Action::await_change())
}

async fn write(
    js: &jetstream::Context,
    ctx: &Ctx,
    dep: &DeploymentRef,
    plan: &crate::kv_plan::KvPlan,
) -> Result<(), Error> {
    let ops = plan.ops(dep);
    let (acked, err) = write_batch(js, DESIRED_STATE_BUCKET, &ops, DEFAULT_WINDOW).await;
    record_kv_writes(&ctx.metrics, &ops, acked, err.is_none());
    // Acks may complete out of order, so only a fully acknowledged batch is recorded
    // here; after a partial failure the watch brings the index up to date.
    if err.is_none() {
        for op in &ops {
            match op {
                iot_nats::KvOp::Put { key, value } => ctx.index.record(key, Some(value.clone())),
                iot_nats::KvOp::Purge { key } => ctx.index.record(key, None),
            }
        }
    }
    match err {
        None => Ok(()),
        Some(source) => Err(Error::Nats {
            acked,
            total: ops.len(),
            source,
        }),
    }
}

/// Counts writes by kind; after a failure, the ones not acknowledged count as errors.
pub fn record_kv_writes(metrics: &OperatorMetrics, ops: &[iot_nats::KvOp], acked: usize, complete: bool) {
    let puts = ops.iter().filter(|o| matches!(o, iot_nats::KvOp::Put { .. })).count() as u64;
    let purges = ops.len() as u64 - puts;
    if complete {
        metrics.kv_write("put", true, puts);
        metrics.kv_write("purge", true, purges);
    } else {
        // Acks complete out of order; only the total is known.
        metrics.kv_write("any", true, acked as u64);
        metrics.kv_write("any", false, (ops.len() - acked) as u64);
    }
}

pub fn error_policy(obj: Arc<Deployment>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let Ok(dep) = deployment_ref(&obj) else {
        tracing::warn!(error = %err, "reconcile failed for a resource without a usable name");
        return Action::requeue(Duration::from_secs(60));
    };
    let n = {
        let mut failures = ctx.failures();
        let n = failures.entry(dep.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let delay = error_backoff(n);
    ctx.metrics
        .reconciles
        .get_or_create(&crate::metrics::result(err.kind()))
        .inc();
    tracing::warn!(deployment = %dep, error = %err, kind = err.kind(), attempt = n, retry_in = ?delay, "reconcile failed");
    let reason = match err {
        Error::NatsNotReady(_) | Error::Nats { .. } => Some(REASON_NATS_UNAVAILABLE),
        Error::Invalid(_) => Some(REASON_INVALID_SPEC),
        // The inventory loads within moments of a start: not worth a status flap.
        Error::DevicesNotReady => None,
        Error::Revision(_) | Error::RolloutStatus(_) => Some(REASON_KUBERNETES_UNAVAILABLE),
        Error::Images { source, .. } if source.is_transient() => Some(REASON_REGISTRY_UNAVAILABLE),
        Error::Images { .. } => Some(REASON_IMAGE_NOT_RESOLVED),
        _ => None,
    };
    if let Some(reason) = reason {
        ctx.status.written(
            dep,
            obj.metadata.generation,
            WriteOutcome::Failed {
                reason,
                message: err.to_string(),
            },
        );
    }
    Action::requeue(delay)
}

/// The Device inventory and the write path's decisions, shared by the controller,
/// the aggregator and the Device status writer.
#[derive(Clone)]
pub struct Fleet {
    pub devices: Store<Device>,
    pub book: Arc<TargetBook>,
}

/// The controller and the reflector store it fills. Only generation (spec),
/// finalizer and shrink-confirmation changes trigger reconciles; the store still
/// sees every change, status included, for the aggregator and the status writer.
///
/// Devices are watched too (a reflector the selectors read): a Device whose labels,
/// revocation or existence change wakes the selector deployments it matches now
/// and those that hold it, so membership follows the labels.
pub fn controller(client: kube::Client) -> (Controller<Deployment>, Store<Deployment>, Fleet) {
    let api: Api<Deployment> = Api::all(client.clone());
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(
            predicates::generation
                .combine(predicates::finalizers)
                .combine(shrink_confirmation),
            Default::default(),
        );
    let (device_reader, device_writer) = reflector::store();
    let device_stream = watcher(Api::<Device>::all(client), watcher::Config::default())
        .default_backoff()
        .reflect(device_writer)
        .scan(MembershipSeen::default(), |seen, event| {
            std::future::ready(Some(futures::stream::iter(membership_change(seen, event))))
        })
        .flatten();
    let book = Arc::new(TargetBook::default());
    let fleet = Fleet {
        devices: device_reader,
        book: book.clone(),
    };
    let deployments = reader.clone();
    let controller = Controller::for_stream(stream, reader.clone())
        .watches_stream(device_stream, move |device: Device| {
            affected_by(&device, &deployments, &book)
        });
    (controller, reader, fleet)
}

/// Changes of the annotations people act with (shrink confirmation, rollout
/// promote and abort) count as a change to act on.
fn shrink_confirmation(obj: &Deployment) -> Option<u64> {
    let a = obj.annotations();
    let acts = [
        CONFIRM_SHRINK_ANNOTATION,
        iot_api::PROMOTE_ANNOTATION,
        iot_api::ABORT_ANNOTATION,
    ]
    .map(|k| a.get(k));
    acts.iter().any(Option::is_some).then(|| hash_str(&format!("{acts:?}")))
}

/// What the Device watch has seen, to pass on only events that can change what a
/// device gets.
#[derive(Default)]
struct MembershipSeen {
    /// Device name -> its membership fingerprint, as last passed on.
    known: HashMap<String, u64>,
    /// Objects of a re-list under way (between `Init` and `InitDone`).
    relist: Option<HashMap<String, Device>>,
}

/// Device events that can change what a device gets: every delete, and applies
/// that change its labels, revocation, pause or deletion mark. The operator's own
/// status writes (and anything else) pass no further. (kube's `predicate_filter`
/// would also drop a delete whose object looks like the last one it saw.)
///
/// A re-list (the first list, or after the watch lost its place) is passed on at
/// its end, when the reflector's store holds it: the first one wakes nothing
/// (every Deployment is reconciled when the controller starts anyway, and mapping
/// 10,000 Devices over 1,000 selectors would hold up the inventory by seconds);
/// later ones pass on the Devices that changed, appeared or vanished meanwhile.
fn membership_change(
    seen: &mut MembershipSeen,
    event: Result<watcher::Event<Device>, watcher::Error>,
) -> Vec<Result<Device, watcher::Error>> {
    match event {
        Err(e) => {
            tracing::warn!(error = %e, "the Device watch failed; retrying");
            vec![Err(e)]
        }
        Ok(watcher::Event::Delete(d)) => {
            seen.known.remove(&d.name_any());
            vec![Ok(d)]
        }
        Ok(watcher::Event::Apply(d)) => {
            let key = device_membership(&d);
            if seen.known.insert(d.name_any(), key) == Some(key) {
                vec![]
            } else {
                vec![Ok(d)]
            }
        }
        Ok(watcher::Event::Init) => {
            seen.relist = Some(HashMap::new());
            vec![]
        }
        Ok(watcher::Event::InitApply(d)) => {
            seen.relist.get_or_insert_default().insert(d.name_any(), d);
            vec![]
        }
        Ok(watcher::Event::InitDone) => {
            let listed = seen.relist.take().unwrap_or_default();
            let first = seen.known.is_empty();
            let mut changed = Vec::new();
            // Vanished while the watch was away: as deletes (an object with the
            // name alone finds the deployments that hold it).
            for name in seen.known.keys() {
                if !listed.contains_key(name) {
                    changed.push(Ok(Device::new(name, Default::default())));
                }
            }
            let mut known = HashMap::with_capacity(listed.len());
            for (name, d) in listed {
                let key = device_membership(&d);
                if !first && seen.known.get(&name) != Some(&key) {
                    changed.push(Ok(d));
                }
                known.insert(name, key);
            }
            seen.known = known;
            changed
        }
    }
}

/// What of a Device decides what it gets: its labels, revocation, pause, deletion.
fn device_membership(obj: &Device) -> u64 {
    let mut key = format!("{:?}|{:?}|{}", obj.label_map(), obj.revoked_at(), obj.spec.paused);
    if obj.metadata.deletion_timestamp.is_some() {
        key.push_str("|deleting");
    }
    hash_str(&key)
}

fn hash_str(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// The deployments a change of `device` may concern.
fn affected_by(
    device: &Device,
    deployments: &Store<Deployment>,
    book: &TargetBook,
) -> Vec<reflector::ObjectRef<Deployment>> {
    let Some(id) = device
        .metadata
        .name
        .as_deref()
        .and_then(|n| harmony_reconciler_contracts::Id::new(n).ok())
    else {
        return Vec::new();
    };
    let mut refs: Vec<reflector::ObjectRef<Deployment>> = book
        .holding(&id)
        .into_iter()
        .map(|d| reflector::ObjectRef::new(d.name()).within(d.namespace()))
        .collect();
    for dep in deployments.state() {
        if dep
            .spec
            .selector
            .as_ref()
            .is_some_and(|s| s.matches(device.label_map()))
        {
            refs.push(reflector::ObjectRef::from_obj(dep.as_ref()));
        }
    }
    refs.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    refs.dedup();
    refs
}

#[cfg(test)]
mod tests {
    use super::*;
    use iot_api::DeviceSpec;

    fn device(name: &str, site: &str) -> Device {
        let mut d = Device::new(name, DeviceSpec::default());
        d.metadata.labels = Some([("site".to_owned(), site.to_owned())].into());
        d
    }

    fn names(out: Vec<Result<Device, watcher::Error>>) -> Vec<String> {
        let mut v: Vec<String> = out.into_iter().filter_map(|r| r.ok()).map(|d| d.name_any()).collect();
        v.sort();
        v
    }

    fn relist(seen: &mut MembershipSeen, devices: &[Device]) -> Vec<String> {
        assert!(names(membership_change(seen, Ok(watcher::Event::Init))).is_empty());
        for d in devices {
            assert!(names(membership_change(seen, Ok(watcher::Event::InitApply(d.clone())))).is_empty());
        }
        names(membership_change(seen, Ok(watcher::Event::InitDone)))
    }

    #[test]
    fn only_membership_changes_wake_deployments() {
        let mut seen = MembershipSeen::default();
        // The first list wakes nothing.
        assert!(relist(&mut seen, &[device("a", "x"), device("b", "x")]).is_empty());
        // A status write (same labels) wakes nothing; a label change does.
        let mut a = device("a", "x");
        a.status = Some(Default::default());
        assert!(names(membership_change(&mut seen, Ok(watcher::Event::Apply(a)))).is_empty());
        assert_eq!(
            names(membership_change(
                &mut seen,
                Ok(watcher::Event::Apply(device("a", "y")))
            )),
            ["a"]
        );
        // Pausing and revoking do too.
        let mut paused = device("a", "y");
        paused.spec.paused = true;
        assert_eq!(
            names(membership_change(&mut seen, Ok(watcher::Event::Apply(paused)))),
            ["a"]
        );
        // A delete always does, even of an object that looks like the last one.
        assert_eq!(
            names(membership_change(
                &mut seen,
                Ok(watcher::Event::Delete(device("b", "x")))
            )),
            ["b"]
        );
        // A new device does.
        assert_eq!(
            names(membership_change(
                &mut seen,
                Ok(watcher::Event::Apply(device("c", "x")))
            )),
            ["c"]
        );
    }

    #[test]
    fn a_relist_wakes_what_changed_appeared_or_vanished_meanwhile() {
        let mut seen = MembershipSeen::default();
        relist(&mut seen, &[device("a", "x"), device("b", "x"), device("c", "x")]);
        // While the watch was away: a relabelled, b deleted, d created, c unchanged.
        let woken = relist(&mut seen, &[device("a", "y"), device("c", "x"), device("d", "x")]);
        assert_eq!(woken, ["a", "b", "d"]);
        // And the next relist with nothing new wakes nothing.
        assert!(relist(&mut seen, &[device("a", "y"), device("c", "x"), device("d", "x")]).is_empty());
    }
}
