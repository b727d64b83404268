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
use harmony_reconciler_contracts::{DESIRED_STATE_BUCKET, DeploymentRef};
use iot_api::Deployment;
use iot_api::conditions::{REASON_INVALID_SPEC, REASON_NATS_UNAVAILABLE};
use iot_nats::write::{DEFAULT_WINDOW, write_batch};
use kube::runtime::Predicate;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, ResourceExt};

use crate::conditions::WriteOutcome;
use crate::desired_index::DesiredIndex;
use crate::kv_plan::{payload, plan_apply, plan_cleanup, target_ids};
use crate::metrics::OperatorMetrics;
use crate::status_writer::StatusInbox;

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
}

impl Error {
    /// Label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NoNamespace | Error::Invalid(_) => "invalid",
            Error::NatsNotReady(_) | Error::Nats { .. } => "nats",
            Error::Finalizer(_) => "kubernetes",
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
    failures: Mutex<HashMap<DeploymentRef, u32>>,
}

impl Ctx {
    pub fn new(
        client: kube::Client,
        js: jetstream::Context,
        index: Arc<DesiredIndex>,
        status: StatusInbox,
        resync: Duration,
        metrics: Arc<OperatorMetrics>,
    ) -> Self {
        Self {
            client,
            js,
            index,
            status,
            resync,
            metrics,
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
    let targets = match target_ids(&obj.spec) {
        Ok(t) => t,
        Err(e) => {
            // Not retried quickly: only a spec change can fix it.
            let message = format!("spec.targetDevices: {e}");
            tracing::warn!(deployment = %dep, error = %message, "invalid resource");
            ctx.status.written(
                dep.clone(),
                generation,
                WriteOutcome::Failed {
                    reason: REASON_INVALID_SPEC,
                    message,
                },
            );
            return Ok(Action::requeue(ctx.resync));
        }
    };
    let js = ready_js(ctx)?;
    let problems = harmony_reconciler_contracts::validate_score(&obj.spec.score.to_wire());
    if !problems.is_empty() {
        // The schema cannot express every rule (unique service names, say); devices
        // would each reject it, so say it once, here.
        let message = format!(
            "spec.score: {}",
            harmony_reconciler_contracts::describe_problems(&problems)
        );
        tracing::warn!(deployment = %dep, error = %message, "invalid resource");
        ctx.status.written(
            dep.clone(),
            generation,
            WriteOutcome::Failed {
                reason: REASON_INVALID_SPEC,
                message,
            },
        );
        return Ok(Action::requeue(ctx.resync));
    }
    let plan = plan_apply(&targets, &payload(dep, &obj.spec), &ctx.index.existing(dep));
    if !plan.is_empty() {
        tracing::info!(deployment = %dep, puts = plan.puts.len(), purges = plan.purges.len(), "writing desired state");
        write(js, ctx, dep, &plan).await?;
    }
    ctx.status.written(
        dep.clone(),
        generation,
        WriteOutcome::Written { devices: targets.len() },
    );
    Ok(Action::requeue(ctx.resync))
}

async fn cleanup(dep: &DeploymentRef, ctx: &Ctx) -> Result<Action, Error> {
    let js = ready_js(ctx)?;
    let plan = plan_cleanup(&ctx.index.existing(dep));
    tracing::info!(deployment = %dep, purges = plan.purges.len(), "deployment deleted; removing its desired state");
    write(js, ctx, dep, &plan).await?;
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

/// The controller and the reflector store it fills. Only generation (spec) and
/// finalizer changes trigger reconciles; the store still sees every change, status
/// included, for the aggregator and the status writer.
pub fn controller(client: kube::Client) -> (Controller<Deployment>, Store<Deployment>) {
    let api: Api<Deployment> = Api::all(client);
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(
            predicates::generation.combine(predicates::finalizers),
            Default::default(),
        );
    (Controller::for_stream(stream, reader.clone()), reader)
}
