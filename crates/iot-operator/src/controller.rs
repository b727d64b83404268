//! The write path: `Deployment` resources -> per-device desired state in KV.
//!
//! Level-triggered with kube-runtime's Controller: every reconcile compares the
//! whole resource with what KV holds (via the index) and writes only differences.
//! A finalizer guarantees the resource's keys are removed before it disappears.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use harmony_reconciler_contracts::{DESIRED_STATE_BUCKET, DeploymentRef};
use iot_kv::write::{DEFAULT_WINDOW, write_batch};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tokio::sync::mpsc;

use crate::conditions::{REASON_INVALID_SPEC, REASON_NATS_UNAVAILABLE, WriteOutcome};
use crate::crd::Deployment;
use crate::kv_index::DesiredIndex;
use crate::kv_plan::{payload, plan_apply, plan_cleanup, target_ids};
use crate::status_writer::StatusUpdate;

pub const FINALIZER: &str = "iot.nationtech.io/desired-state";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("resource has no namespace")]
    NoNamespace,
    #[error("invalid resource: {0}")]
    Invalid(String),
    #[error("NATS is not available yet: {0}")]
    NatsNotReady(&'static str),
    #[error("writing desired state to NATS failed after {acked} of {total} writes: {source}")]
    Nats {
        acked: usize,
        total: usize,
        #[source]
        source: iot_kv::KvError,
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
    /// Set once the buckets exist (NATS may come up after the operator).
    pub js: Arc<OnceLock<jetstream::Context>>,
    pub index: Arc<DesiredIndex>,
    pub status: mpsc::Sender<StatusUpdate>,
    pub resync: Duration,
    failures: Mutex<HashMap<DeploymentRef, u32>>,
}

impl Ctx {
    pub fn new(
        client: kube::Client,
        js: Arc<OnceLock<jetstream::Context>>,
        index: Arc<DesiredIndex>,
        status: mpsc::Sender<StatusUpdate>,
        resync: Duration,
    ) -> Self {
        Self {
            client,
            js,
            index,
            status,
            resync,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<DeploymentRef, u32>> {
        self.failures.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Retry delay after the n-th consecutive failure of one resource: 1 s doubling to 60 s.
pub fn error_backoff(failures: u32) -> Duration {
    iot_kv::backoff(failures, Duration::from_secs(60))
}

fn deployment_ref(obj: &Deployment) -> Result<DeploymentRef, Error> {
    let ns = obj.namespace().ok_or(Error::NoNamespace)?;
    DeploymentRef::new(ns, obj.name_any()).map_err(|e| Error::Invalid(e.to_string()))
}

async fn send_status(ctx: &Ctx, update: StatusUpdate) {
    if ctx.status.send(update).await.is_err() {
        tracing::error!("status writer stopped; status will not be updated");
    }
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
            Ok(action)
        }
        Err(kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e)) => {
            Err(e)
        }
        Err(e) => Err(Error::Finalizer(e.to_string())),
    }
}

fn ready_js(ctx: &Ctx) -> Result<&jetstream::Context, Error> {
    let js = ctx.js.get().ok_or(Error::NatsNotReady("KV buckets not ready"))?;
    if !ctx.index.is_ready() {
        return Err(Error::NatsNotReady("desired-state index still loading"));
    }
    Ok(js)
}

async fn apply(obj: &Deployment, dep: &DeploymentRef, ctx: &Ctx) -> Result<Action, Error> {
    let generation = obj.metadata.generation;
    let targets = match target_ids(&obj.spec) {
        Ok(t) => t,
        Err(e) => {
            // Not retried quickly: only a spec change can fix it.
            let message = format!("spec.target_devices: {e}");
            tracing::warn!(deployment = %dep, error = %message, "invalid resource");
            send_status(
                ctx,
                StatusUpdate::Written {
                    deployment: dep.clone(),
                    generation,
                    outcome: WriteOutcome::Failed {
                        reason: REASON_INVALID_SPEC,
                        message,
                    },
                },
            )
            .await;
            return Ok(Action::requeue(ctx.resync));
        }
    };
    let js = ready_js(ctx)?;
    let plan = plan_apply(
        &targets,
        &payload(dep, generation.unwrap_or(0), &obj.spec),
        &ctx.index.existing(dep),
    );
    if !plan.is_empty() {
        tracing::info!(deployment = %dep, puts = plan.puts.len(), purges = plan.purges.len(), "writing desired state");
        write(js, ctx, dep, &plan).await?;
    }
    send_status(
        ctx,
        StatusUpdate::Written {
            deployment: dep.clone(),
            generation,
            outcome: WriteOutcome::Written { devices: targets.len() },
        },
    )
    .await;
    Ok(Action::requeue(ctx.resync))
}

async fn cleanup(dep: &DeploymentRef, ctx: &Ctx) -> Result<Action, Error> {
    let js = ready_js(ctx)?;
    let plan = plan_cleanup(&ctx.index.existing(dep));
    tracing::info!(deployment = %dep, purges = plan.purges.len(), "deployment deleted; removing its desired state");
    write(js, ctx, dep, &plan).await?;
    send_status(
        ctx,
        StatusUpdate::Forget {
            deployment: dep.clone(),
        },
    )
    .await;
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
    // Acks may complete out of order, so only a fully acknowledged batch is recorded
    // here; after a partial failure the watch brings the index up to date.
    if err.is_none() {
        for op in &ops {
            match op {
                iot_kv::KvOp::Put { key, value } => ctx.index.record(key, Some(value.clone())),
                iot_kv::KvOp::Purge { key } => ctx.index.record(key, None),
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
    tracing::warn!(deployment = %dep, error = %err, kind = err.kind(), attempt = n, retry_in = ?delay, "reconcile failed");
    let reason = match err {
        Error::NatsNotReady(_) | Error::Nats { .. } => Some(REASON_NATS_UNAVAILABLE),
        Error::Invalid(_) => Some(REASON_INVALID_SPEC),
        _ => None,
    };
    if let Some(reason) = reason {
        let update = StatusUpdate::Written {
            deployment: dep,
            generation: obj.metadata.generation,
            outcome: WriteOutcome::Failed {
                reason,
                message: err.to_string(),
            },
        };
        if ctx.status.try_send(update).is_err() {
            tracing::warn!("status channel full; dropping a failure condition update");
        }
    }
    Action::requeue(delay)
}

/// The controller, built before it runs so its object store can be shared.
pub fn controller(client: kube::Client) -> Controller<Deployment> {
    let api: Api<Deployment> = Api::all(client);
    Controller::new(api, watcher::Config::default())
}

/// Runs the controller until the process is asked to stop.
pub async fn run_controller(controller: Controller<Deployment>, ctx: Arc<Ctx>) {
    controller
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
}
