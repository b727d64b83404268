//! The write path's side of progressive rollouts: gathers what one step of
//! [`crate::rollout`] needs, turns its decision into per-device payloads, and
//! keeps `.status.rollout` in the API server.
//!
//! `.status.rollout` is written here, by server-side apply with a field manager of
//! its own, and only that field: the status writer owns the rest of `.status`. A
//! decision that stops the rollout (suspends it, or rolls back) is written before
//! KV changes; one that dispatches right after, KV being the record of dispatch
//! (see the controller). Counts alone are written at most every [`COUNTS_EVERY`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use harmony_reconciler_contracts::report::Staleness;
use harmony_reconciler_contracts::{DeploymentRef, Id};
use iot_api::{ABORT_ANNOTATION, Deployment, PROMOTE_ANNOTATION, RolloutPlan, RolloutStatus};
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};

use crate::device_index::DeviceIndex;
use crate::rollout::{DeviceView, Newcomers, RolloutDecision, RolloutInput, step};

/// Field manager of `.status.rollout`.
pub const ROLLOUT_FIELD_MANAGER: &str = "iot-operator-rollout";
/// Count-only changes of `.status.rollout` are written at most this often.
pub const COUNTS_EVERY: Duration = Duration::from_secs(2);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct RolloutConfig {
    /// How often an unfinished rollout is stepped (gates are checked continuously
    /// at this resolution).
    pub tick: Duration,
    /// A device whose last report is older than this is offline when its batch
    /// reaches it.
    pub staleness: Staleness,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            staleness: Staleness::default(),
        }
    }
}

/// What the write path needs to run rollouts.
pub struct Rollouts {
    pub reports: Arc<DeviceIndex>,
    pub config: RolloutConfig,
    /// Per deployment: the last `.status.rollout` this process wrote (or decided
    /// and failed to write), and when it was written.
    last: Mutex<HashMap<DeploymentRef, (Option<RolloutStatus>, std::time::Instant)>>,
}

#[derive(Debug, thiserror::Error)]
#[error("writing .status.rollout of {deployment}: {message}")]
pub struct RolloutWriteError {
    deployment: DeploymentRef,
    message: String,
}

/// One step's result for the write path.
pub struct Stepped {
    /// Desired payload per device; devices absent get nothing (their key, if any,
    /// is purged unless the caller keeps it).
    pub desired: BTreeMap<Id, Bytes>,
    pub status: RolloutStatus,
    /// Step again after this long (unfinished rollouts).
    pub again: Option<Duration>,
}

/// The inputs of a step that the controller resolves.
pub struct StepContext<'a> {
    pub obj: &'a Deployment,
    pub dep: &'a DeploymentRef,
    pub revision: u64,
    pub plan: &'a RolloutPlan,
    pub targets: &'a BTreeSet<Id>,
    pub new_payload: &'a Bytes,
    /// The hash devices report once they run the new revision.
    pub spec_hash: &'a harmony_reconciler_contracts::SpecHash,
    /// The stable (last good) revision's payload, when its score is known.
    pub stable: Option<(u64, Bytes)>,
    pub existing: &'a BTreeMap<Id, (Bytes, chrono::DateTime<Utc>)>,
    /// The targets' labels (for failure clusters).
    pub labels: &'a BTreeMap<Id, BTreeMap<String, String>>,
    /// Devices in maintenance (`Device.spec.paused`).
    pub paused: &'a BTreeSet<Id>,
}

impl Rollouts {
    pub fn new(reports: Arc<DeviceIndex>, config: RolloutConfig) -> Self {
        Self {
            reports,
            config,
            last: Mutex::new(HashMap::new()),
        }
    }

    fn last(&self) -> std::sync::MutexGuard<'_, HashMap<DeploymentRef, (Option<RolloutStatus>, std::time::Instant)>> {
        self.last.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The rollout status to continue from: this process's latest, else the
    /// object's (after a restart or a leader change).
    pub fn previous(&self, obj: &Deployment, dep: &DeploymentRef) -> Option<RolloutStatus> {
        if let Some((s, _)) = self.last().get(dep) {
            return s.clone();
        }
        obj.status.as_ref().and_then(|s| s.rollout.clone())
    }

    /// The stable revision a step would use: the rollout's own, else the last good.
    pub fn stable_revision(&self, obj: &Deployment, dep: &DeploymentRef, revision: u64) -> Option<u64> {
        match self.previous(obj, dep) {
            Some(p) if p.revision == revision => p.stable_revision,
            _ => obj
                .status
                .as_ref()
                .and_then(|s| s.aggregate.as_ref())
                .and_then(|a| a.last_good_revision)
                .filter(|n| *n != revision),
        }
    }

    /// Runs one step and maps its decision onto payloads.
    pub fn step(&self, cx: &StepContext<'_>) -> Stepped {
        let now = Utc::now();
        let spec_hash = cx.spec_hash.clone();
        let default_spec = iot_api::RolloutSpec::default();
        let spec = cx.obj.spec.rollout.as_ref().unwrap_or(&default_spec);
        let plan: Vec<Vec<Id>> = cx
            .plan
            .batches
            .iter()
            .map(|b| b.iter().filter_map(|d| Id::new(d.as_str()).ok()).collect())
            .collect();
        let previous = self.previous(cx.obj, cx.dep);
        let decision: RolloutDecision = {
            let reports = self.reports.reports();
            let views: BTreeMap<Id, DeviceView<'_>> = cx
                .targets
                .iter()
                .map(|d| {
                    let dispatched_at = cx.existing.get(d).filter(|(v, _)| v == cx.new_payload).map(|(_, t)| *t);
                    let view = DeviceView {
                        dispatched_at,
                        paused: cx.paused.contains(d),
                        report: reports.get(d),
                        labels: cx.labels.get(d),
                    };
                    (d.clone(), view)
                })
                .collect();
            let annotations = cx.obj.annotations();
            step(&RolloutInput {
                deployment: cx.dep,
                spec,
                revision: cx.revision,
                spec_hash: &spec_hash,
                plan: &plan,
                previous: previous.as_ref(),
                last_good: cx.stable.as_ref().map(|(n, _)| *n),
                stable_available: cx.stable.is_some(),
                devices: &views,
                now,
                promote: annotations.get(PROMOTE_ANNOTATION).map(String::as_str),
                abort: annotations.get(ABORT_ANNOTATION).map(String::as_str),
                staleness: self.config.staleness,
            })
        };
        let stable = cx.stable.as_ref().map(|(_, p)| p);
        let mut desired = BTreeMap::new();
        for d in cx.targets {
            let held = cx.existing.get(d).map(|(v, _)| v);
            let holds_new = held == Some(cx.new_payload);
            let payload = if decision.roll_back.contains(d) {
                stable
            } else if decision.dispatch.contains(d) || holds_new {
                Some(cx.new_payload)
            } else if let Some(v) = held {
                // Not reached yet: keeps what it runs.
                Some(v)
            } else if decision.newcomers == Newcomers::New {
                Some(cx.new_payload)
            } else {
                stable
            };
            if let Some(p) = payload {
                desired.insert(d.clone(), p.clone());
            }
        }
        let again = (!decision.status.phase.is_final() || !decision.roll_back.is_empty()).then_some(self.config.tick);
        Stepped {
            desired,
            status: decision.status,
            again,
        }
    }

    /// Writes `.status.rollout` when it changed: at once when `urgent` (the step
    /// is about to change KV, or its phase or batch moved), else at most every
    /// [`COUNTS_EVERY`]. `None` removes the field (the deployment has no rollout).
    pub async fn persist(
        &self,
        client: &kube::Client,
        dep: &DeploymentRef,
        obj: &Deployment,
        status: Option<&RolloutStatus>,
        acting: bool,
    ) -> Result<(), RolloutWriteError> {
        let live = obj.status.as_ref().and_then(|s| s.rollout.as_ref());
        let (last, last_at) = match self.last().get(dep) {
            Some((s, at)) => (s.clone(), Some(*at)),
            None => (live.cloned(), None),
        };
        if last.as_ref() == status && (last_at.is_some() || live == status) {
            return Ok(());
        }
        let moved = match (&last, status) {
            (Some(a), Some(b)) => {
                a.revision != b.revision
                    || a.phase != b.phase
                    || a.current_batch != b.current_batch
                    || a.batches
                        .iter()
                        .map(|x| (x.started_at, x.passed_at))
                        .ne(b.batches.iter().map(|x| (x.started_at, x.passed_at)))
            }
            _ => true,
        };
        let due = last_at.is_none_or(|t| t.elapsed() >= COUNTS_EVERY);
        if !(acting || moved || due) {
            return Ok(());
        }
        let api: Api<Deployment> = Api::namespaced(client.clone(), dep.namespace());
        let body = match status {
            Some(s) => serde_json::json!({"rollout": s}),
            None => serde_json::json!({}),
        };
        let patch = serde_json::json!({
            "apiVersion": "iot.nationtech.io/v1alpha1",
            "kind": "Deployment",
            "status": body,
        });
        let params = PatchParams::apply(ROLLOUT_FIELD_MANAGER).force();
        let fail = |message: String| RolloutWriteError {
            deployment: dep.clone(),
            message,
        };
        match tokio::time::timeout(
            WRITE_TIMEOUT,
            api.patch_status(dep.name(), &params, &Patch::Apply(&patch)),
        )
        .await
        {
            Err(_) => return Err(fail(format!("no answer within {WRITE_TIMEOUT:?}"))),
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Ok(Ok(_)) => {}
        }
        self.last()
            .insert(dep.clone(), (status.cloned(), std::time::Instant::now()));
        Ok(())
    }

    pub fn forget(&self, dep: &DeploymentRef) {
        self.last().remove(dep);
    }
}
