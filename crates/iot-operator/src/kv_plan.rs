//! The pure write-path planner: one `Deployment` resource + what KV holds now ->
//! the puts and purges that make KV match. No I/O.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use harmony_reconciler_contracts::{DeploymentRef, DesiredState, Id, IdError, desired_state_key};
use iot_api::DeploymentSpec;
use iot_nats::KvOp;

/// Changes for one deployment, keyed by device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KvPlan {
    pub puts: Vec<(Id, Bytes)>,
    pub purges: Vec<Id>,
}

impl KvPlan {
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.purges.is_empty()
    }

    /// The plan as KV operations (purges first, then puts).
    pub fn ops(&self, deployment: &DeploymentRef) -> Vec<KvOp> {
        let purges = self.purges.iter().map(|d| KvOp::Purge {
            key: desired_state_key(d, deployment),
        });
        let puts = self.puts.iter().map(|(d, v)| KvOp::Put {
            key: desired_state_key(d, deployment),
            value: v.clone(),
        });
        purges.chain(puts).collect()
    }
}

/// Targets as validated device ids. The CRD schema already enforces the pattern;
/// this guards against objects written around it.
pub fn target_ids(spec: &DeploymentSpec) -> Result<BTreeSet<Id>, IdError> {
    spec.target_ids()
}

/// The bytes every targeted device gets: the deployment's name, its score in the
/// wire form and the score's revision number, nothing that changes without the score. Deterministic, so an
/// unchanged score produces byte-identical values and no writes.
pub fn payload(deployment: &DeploymentRef, spec: &DeploymentSpec, revision: Option<u64>) -> Bytes {
    payload_of(deployment, &spec.score, revision)
}

/// The bytes for one score (a rollback writes an earlier revision's).
pub fn payload_of(deployment: &DeploymentRef, score: &iot_api::IotScore, revision: Option<u64>) -> Bytes {
    let mut state = DesiredState::new(deployment.clone(), score.to_wire());
    state.revision = revision;
    Bytes::from(state.to_bytes())
}

/// Puts for targets whose value differs (or is missing), purges for devices that
/// hold a value but are no longer targeted.
pub fn plan_apply(targets: &BTreeSet<Id>, payload: &Bytes, existing: &BTreeMap<Id, Bytes>) -> KvPlan {
    let desired = targets.iter().map(|d| (d.clone(), payload.clone())).collect();
    plan_apply_each(&desired, existing)
}

/// The same per device: each target with its own payload (a rollout gives some
/// devices the new revision and others an earlier one); devices absent from
/// `desired` that hold a value are purged.
pub fn plan_apply_each(desired: &BTreeMap<Id, Bytes>, existing: &BTreeMap<Id, Bytes>) -> KvPlan {
    let puts = desired
        .iter()
        .filter(|(d, v)| existing.get(*d) != Some(*v))
        .map(|(d, v)| (d.clone(), v.clone()))
        .collect();
    let purges = existing.keys().filter(|d| !desired.contains_key(*d)).cloned().collect();
    KvPlan { puts, purges }
}

/// Everything the deployment ever wrote goes (resource deleted).
pub fn plan_cleanup(existing: &BTreeMap<Id, Bytes>) -> KvPlan {
    KvPlan {
        puts: vec![],
        purges: existing.keys().cloned().collect(),
    }
}

/// Leaves paused devices alone (`Device.spec.paused`, maintenance): no new or
/// changed desired state reaches them, and nothing is taken away from them; they
/// keep what they run until they are resumed.
pub fn without_paused(plan: KvPlan, paused: &BTreeSet<Id>) -> KvPlan {
    if paused.is_empty() {
        return plan;
    }
    KvPlan {
        puts: plan.puts.into_iter().filter(|(d, _)| !paused.contains(d)).collect(),
        purges: plan.purges.into_iter().filter(|d| !paused.contains(d)).collect(),
    }
}
