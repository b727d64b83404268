//! How `.status` is computed from what the operator knows. Pure functions; the
//! strings users match on are in `iot_api::conditions`.
//!
//! Two inputs arrive independently: the write path's outcome for some generation,
//! and the fleet aggregate for some generation. Each condition carries the
//! generation of the input it was computed from, and `status.observedGeneration` is
//! the older of the two, so kstatus, Argo CD and Flux never take an aggregate of the
//! previous spec for the current one.

use chrono::{DateTime, Utc};
use iot_api::conditions::*;
use iot_api::{AggregateStatus, DeploymentStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Outcome of the last write-path reconcile of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    Written {
        devices: usize,
        /// Selector deployments: how many Devices the selector matches.
        matched: Option<usize>,
        /// Removals the shrink guard holds.
        held: Option<HeldRemovals>,
        revision: Option<u64>,
        /// The current revision's pinned images (image as named -> digest).
        images: std::collections::BTreeMap<String, String>,
    },
    Failed {
        reason: &'static str,
        message: String,
    },
}

/// Removals the shrink guard holds, for the `RemovalsHeld` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldRemovals {
    pub count: usize,
    /// The confirmation annotation's value that lets exactly these go.
    pub token: String,
    pub namespace: String,
    pub name: String,
}

impl WriteOutcome {
    /// Written for `devices` listed devices, with no revision.
    pub fn written(devices: usize) -> Self {
        WriteOutcome::Written {
            devices,
            matched: None,
            held: None,
            revision: None,
            images: Default::default(),
        }
    }
}

/// Everything status is computed from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusInputs {
    /// The generation `write` is about.
    pub write_generation: Option<i64>,
    pub write: Option<WriteOutcome>,
    /// The last successful write's outcome: what it matched, held and which
    /// revision it wrote stay in the status while a later attempt fails (a NATS
    /// blip must not drop `currentRevision`, or the token that confirms held
    /// removals).
    pub last_written: Option<WriteOutcome>,
    /// Carries the generation it was computed for.
    pub aggregate: Option<AggregateStatus>,
    /// The rollout of the current revision (deployments with `spec.rollout`).
    pub rollout: Option<iot_api::RolloutStatus>,
}

/// The status to write. `live` is the object's current status: conditions whose
/// status did not change keep its `lastTransitionTime`, so an operator restart
/// changes nothing.
pub fn build_status(live: Option<&DeploymentStatus>, inputs: &StatusInputs, now: DateTime<Utc>) -> DeploymentStatus {
    let previous = live.map(|l| l.conditions.as_slice()).unwrap_or_default();
    let mut conditions = Vec::new();
    if let Some(write) = &inputs.write {
        let (status, reason, message) = match write {
            WriteOutcome::Written { devices, .. } => (
                "True",
                REASON_WRITTEN,
                format!("desired state written for {devices} device(s)"),
            ),
            WriteOutcome::Failed { reason, message } => ("False", *reason, message.clone()),
        };
        conditions.push(carry_condition(
            previous,
            DESIRED_STATE_WRITTEN,
            status,
            reason,
            &message,
            inputs.write_generation,
            now,
        ));
    }
    let aggregate_generation = inputs.aggregate.as_ref().and_then(|a| a.observed_generation);
    if let Some(agg) = &inputs.aggregate {
        let mut fleet = fleet_conditions(agg);
        if let Some(rollout) = &inputs.rollout {
            crate::rollout_conditions::apply(&mut fleet, rollout, agg);
        }
        for (type_, status, reason, message) in fleet {
            conditions.push(carry_condition(
                previous,
                type_,
                status,
                reason,
                &message,
                aggregate_generation,
                now,
            ));
        }
    }
    let (mut matched_devices, mut current_revision, mut pinned) = (None, None, Vec::new());
    if let Some(WriteOutcome::Written {
        matched,
        held,
        revision,
        images,
        ..
    }) = inputs.last_written.as_ref().or(inputs.write.as_ref())
    {
        matched_devices = matched.map(|m| m as u32);
        current_revision = *revision;
        pinned = images
            .iter()
            .map(|(image, digest)| iot_api::PinnedImage {
                image: image.clone(),
                digest: digest.clone(),
            })
            .collect();
        if matched.is_some() {
            let (status, reason, message) = match held {
                Some(h) => (
                    "True",
                    REASON_LARGE_SHRINK,
                    format!(
                        "the selector now matches {} device(s); removing the deployment from {} more that run it would \
                         take it off too many at once, so they keep it. Fix the selector or the labels, or confirm with: \
                         kubectl annotate deployments.iot.nationtech.io {} -n {} {}={} --overwrite",
                        matched.unwrap_or(0),
                        h.count,
                        h.name,
                        h.namespace,
                        iot_api::CONFIRM_SHRINK_ANNOTATION,
                        h.token,
                    ),
                ),
                None => ("False", REASON_NO_REMOVALS_HELD, "no removals are held".to_owned()),
            };
            conditions.push(carry_condition(
                previous,
                REMOVALS_HELD,
                status,
                reason,
                &message,
                inputs.write_generation,
                now,
            ));
        }
    }
    let observed_generation = match (inputs.write_generation, aggregate_generation) {
        (Some(w), Some(a)) => Some(w.min(a)),
        (w, a) => w.or(a),
    };
    DeploymentStatus {
        observed_generation,
        conditions,
        aggregate: inputs.aggregate.clone(),
        matched_devices,
        current_revision,
        rollout: None,
        images: pinned,
    }
}

/// Ready, Progressing and Degraded from the fleet aggregate.
pub fn fleet_conditions(agg: &AggregateStatus) -> Vec<(&'static str, &'static str, &'static str, String)> {
    let summary = format!(
        "{}/{} devices run spec {}; {} failed, {} pending, {} unreported",
        agg.succeeded, agg.targets, agg.spec_hash, agg.failed, agg.pending, agg.unreported
    );
    let ready = if agg.targets > 0 && agg.succeeded == agg.targets {
        ("True", REASON_ALL_RUNNING)
    } else if agg.failed > 0 {
        ("False", REASON_DEVICES_FAILED)
    } else if agg.unreported > 0 {
        ("False", REASON_DEVICES_UNREPORTED)
    } else if agg.pending > 0 {
        ("False", REASON_ROLLING_OUT)
    } else {
        ("False", REASON_NO_REPORTS_YET)
    };
    let progressing = if agg.pending > 0 {
        (
            "True",
            REASON_ROLLING_OUT,
            format!("{} device(s) have not reached spec {} yet", agg.pending, agg.spec_hash),
        )
    } else {
        (
            "False",
            REASON_ROLLOUT_COMPLETE,
            "no device is waiting for the current spec".to_owned(),
        )
    };
    let degraded = if agg.failed > 0 {
        let top = agg
            .top_errors
            .first()
            .map(|g| format!("; most common error ({} devices): {}", g.devices, g.message))
            .unwrap_or_default();
        (
            "True",
            REASON_DEVICES_FAILED,
            format!("{} device(s) failed{top}", agg.failed),
        )
    } else if agg.unreported > 0 {
        (
            "True",
            REASON_DEVICES_UNREPORTED,
            format!("{} device(s) have not reported recently", agg.unreported),
        )
    } else if agg.restarting > 0 {
        (
            "True",
            REASON_REPEATED_RESTARTS,
            format!(
                "on {} device(s) the containers keep stopping and coming back (restarts or restores in the last 10 minutes)",
                agg.restarting
            ),
        )
    } else {
        (
            "False",
            REASON_HEALTHY,
            "no failed, silent or restarting devices".to_owned(),
        )
    };
    vec![
        (READY, ready.0, ready.1, summary),
        (PROGRESSING, progressing.0, progressing.1, progressing.2),
        (DEGRADED, degraded.0, degraded.1, degraded.2),
    ]
}

/// A condition that keeps the `lastTransitionTime` of `previous` when its status
/// did not change (so recomputing, or an operator restart, changes nothing).
pub fn carry_condition(
    previous: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Condition {
    let since = previous
        .iter()
        .find(|c| c.type_ == type_)
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(to_k8s_time(now)));
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// Kubernetes times have second precision (RFC 3339 without fractions).
fn to_k8s_time(t: DateTime<Utc>) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_second(t.timestamp()).unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}
