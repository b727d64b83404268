//! The single writer of `Deployment.status`.
//!
//! The controller (write path) and the aggregator (fleet truth) send what they know
//! here; this task merges it, writes only when the computed status differs from what
//! it last wrote, and at most once per `min_interval` per resource, so bursts of
//! device reports coalesce. Writes are server-side apply on the status subresource
//! with field manager `iot-operator`, so fields that disappear are removed.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use harmony_reconciler_contracts::DeploymentRef;
use kube::Api;
use kube::api::{Patch, PatchParams};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::conditions::{StatusInputs, WriteOutcome, build_status};
use crate::crd::{AggregateStatus, Deployment, DeploymentStatus};

pub const FIELD_MANAGER: &str = "iot-operator";

#[derive(Debug, Clone)]
pub enum StatusUpdate {
    Written {
        deployment: DeploymentRef,
        generation: Option<i64>,
        outcome: WriteOutcome,
    },
    Aggregate {
        deployment: DeploymentRef,
        aggregate: AggregateStatus,
    },
    Forget {
        deployment: DeploymentRef,
    },
}

#[derive(Debug, Default)]
struct Entry {
    inputs: StatusInputs,
    written: Option<DeploymentStatus>,
    last_write: Option<Instant>,
    dirty: bool,
}

pub struct StatusWriter {
    client: kube::Client,
    rx: mpsc::Receiver<StatusUpdate>,
    min_interval: Duration,
}

impl StatusWriter {
    pub fn new(client: kube::Client, min_interval: Duration) -> (Self, mpsc::Sender<StatusUpdate>) {
        let (tx, rx) = mpsc::channel(4096);
        (
            Self {
                client,
                rx,
                min_interval,
            },
            tx,
        )
    }

    pub async fn run(mut self) {
        let mut entries: HashMap<DeploymentRef, Entry> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100).min(self.min_interval));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = self.rx.recv() => {
                    let Some(msg) = msg else { return };
                    apply(&mut entries, msg);
                    // Drain whatever else is queued before writing.
                    while let Ok(msg) = self.rx.try_recv() {
                        apply(&mut entries, msg);
                    }
                }
                _ = tick.tick() => self.flush(&mut entries).await,
            }
        }
    }

    async fn flush(&self, entries: &mut HashMap<DeploymentRef, Entry>) {
        let now = Instant::now();
        for (dep, entry) in entries.iter_mut() {
            if !entry.dirty
                || entry
                    .last_write
                    .is_some_and(|t| now.duration_since(t) < self.min_interval)
            {
                continue;
            }
            entry.dirty = false;
            let status = build_status(entry.written.as_ref(), &entry.inputs, Utc::now());
            if entry.written.as_ref() == Some(&status) {
                continue;
            }
            match self.write(dep, &status).await {
                Ok(()) => {
                    entry.written = Some(status);
                    entry.last_write = Some(Instant::now());
                }
                Err(e) => {
                    entry.dirty = true;
                    entry.last_write = Some(Instant::now());
                    tracing::warn!(deployment = %dep, error = %e, "status write failed; will retry");
                }
            }
        }
        entries.retain(|_, e| e.dirty || e.written.is_some() || e.inputs != StatusInputs::default());
    }

    async fn write(&self, dep: &DeploymentRef, status: &DeploymentStatus) -> Result<(), kube::Error> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), dep.namespace());
        let patch = serde_json::json!({
            "apiVersion": "iot.nationtech.io/v1alpha1",
            "kind": "Deployment",
            "status": status,
        });
        api.patch_status(
            dep.name(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map(drop)
    }
}

fn apply(entries: &mut HashMap<DeploymentRef, Entry>, msg: StatusUpdate) {
    match msg {
        StatusUpdate::Written {
            deployment,
            generation,
            outcome,
        } => {
            let e = entries.entry(deployment).or_default();
            e.inputs.generation = generation;
            e.inputs.write = Some(outcome);
            e.dirty = true;
        }
        StatusUpdate::Aggregate { deployment, aggregate } => {
            let e = entries.entry(deployment).or_default();
            if e.inputs.aggregate.as_ref() != Some(&aggregate) {
                e.inputs.aggregate = Some(aggregate);
                e.dirty = true;
            }
        }
        StatusUpdate::Forget { deployment } => {
            entries.remove(&deployment);
        }
    }
}
