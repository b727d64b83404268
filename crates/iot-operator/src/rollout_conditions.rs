//! How a rollout shows in the Deployment's conditions. Pure.
//!
//! - `Progressing` follows Kubernetes' Deployment: True while batches are being
//!   dispatched or rolled back, Unknown while a person is awaited, False with
//!   `ProgressDeadlineExceeded` (or why else it stopped) when it stopped.
//! - `Degraded` is True with reason `RolledBack` after a rollback: the spec still
//!   names the bad revision until a person changes or undoes it (as Argo Rollouts).
//! - `RolledBack` is True with the failure clusters while the last good revision
//!   is being, or has been, written back.

use iot_api::conditions::*;
use iot_api::rollout::REASON_DEADLINE;
use iot_api::{AggregateStatus, RolloutPhase, RolloutStatus};

type Cond = (&'static str, &'static str, &'static str, String);

/// Adjusts the fleet conditions (`Ready`, `Progressing`, `Degraded`) for `rollout`
/// and adds `RolledBack`. A rollout of another revision than the aggregate's says
/// nothing yet.
pub fn apply(conditions: &mut Vec<Cond>, rollout: &RolloutStatus, agg: &AggregateStatus) {
    if agg.revision.is_some_and(|n| n != rollout.revision) {
        return;
    }
    let set = |conditions: &mut Vec<Cond>, c: Cond| {
        conditions.retain(|x| x.0 != c.0);
        conditions.push(c);
    };
    let message = format!(
        "revision {}: {} ({})",
        rollout.revision, rollout.message, rollout.summary
    );
    let progressing = match rollout.phase {
        RolloutPhase::Progressing => Some(("True", REASON_ROLLOUT_PROGRESSING)),
        RolloutPhase::RollingBack => Some(("True", REASON_ROLLING_BACK)),
        RolloutPhase::Paused if rollout.waiting_since.is_some() && rollout.message.contains("promote") => {
            Some(("Unknown", REASON_AWAITING_PROMOTION))
        }
        RolloutPhase::Paused => Some(("Unknown", REASON_ROLLOUT_PAUSED)),
        RolloutPhase::Suspended if rollout.reason.as_deref() == Some(REASON_DEADLINE) => {
            Some(("False", REASON_PROGRESS_DEADLINE_EXCEEDED))
        }
        RolloutPhase::Suspended => Some(("False", REASON_ROLLOUT_SUSPENDED)),
        RolloutPhase::RolledBack => Some(("False", REASON_ROLLED_BACK)),
        // Complete: the fleet's own view (devices still pending) says it.
        RolloutPhase::Complete => None,
    };
    if let Some((status, reason)) = progressing {
        set(conditions, (PROGRESSING, status, reason, message.clone()));
    }
    let rolled_back = matches!(rollout.phase, RolloutPhase::RollingBack | RolloutPhase::RolledBack);
    if rolled_back {
        let clusters: Vec<String> = rollout
            .failure_clusters
            .iter()
            .map(|c| {
                let labels: Vec<String> = c.shared_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let shared = if labels.is_empty() {
                    String::new()
                } else {
                    format!(", all {}", labels.join(","))
                };
                format!("{} device(s){shared}: {}", c.devices, c.message)
            })
            .collect();
        let back = format!(
            "rolled back to revision {} after revision {} failed: {}{}",
            rollout.stable_revision.unwrap_or_default(),
            rollout.revision,
            rollout.message,
            if clusters.is_empty() {
                String::new()
            } else {
                format!(" [{}]", clusters.join("; "))
            }
        );
        set(conditions, (ROLLED_BACK, "True", REASON_ROLLED_BACK, back.clone()));
        set(
            conditions,
            (
                DEGRADED,
                "True",
                REASON_ROLLED_BACK,
                format!(
                    "{back}. The spec still names revision {}: change it, or run iotctl rollout undo",
                    rollout.revision
                ),
            ),
        );
    } else {
        set(
            conditions,
            (ROLLED_BACK, "False", REASON_NOT_ROLLED_BACK, "no rollback".to_owned()),
        );
        if rollout.phase == RolloutPhase::Suspended {
            set(conditions, (DEGRADED, "True", REASON_ROLLOUT_SUSPENDED, message));
        }
    }
}
