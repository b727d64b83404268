//! Condition types, reasons, and how `.status` is computed from what the operator
//! knows. Pure functions; every string a user may match on lives here.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{AggregateStatus, DeploymentStatus};

pub const DESIRED_STATE_WRITTEN: &str = "DesiredStateWritten";
pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

pub const REASON_WRITTEN: &str = "Written";
pub const REASON_NATS_UNAVAILABLE: &str = "NatsUnavailable";
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
pub const REASON_ALL_RUNNING: &str = "AllDevicesRunning";
pub const REASON_NO_REPORTS_YET: &str = "AwaitingReports";
pub const REASON_DEVICES_FAILED: &str = "DevicesFailed";
pub const REASON_DEVICES_UNREPORTED: &str = "DevicesUnreported";
pub const REASON_ROLLING_OUT: &str = "RollingOut";
pub const REASON_ROLLOUT_COMPLETE: &str = "RolloutComplete";
pub const REASON_HEALTHY: &str = "Healthy";

/// Outcome of the last write-path reconcile of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    Written { devices: usize },
    Failed { reason: &'static str, message: String },
}

/// Everything status is computed from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusInputs {
    pub generation: Option<i64>,
    pub write: Option<WriteOutcome>,
    pub aggregate: Option<AggregateStatus>,
}

/// The status to write. `previous` supplies lastTransitionTime of conditions whose
/// status did not change.
pub fn build_status(
    previous: Option<&DeploymentStatus>,
    inputs: &StatusInputs,
    now: DateTime<Utc>,
) -> DeploymentStatus {
    let mut conditions = Vec::new();
    if let Some(write) = &inputs.write {
        let (status, reason, message) = match write {
            WriteOutcome::Written { devices } => (
                "True",
                REASON_WRITTEN,
                format!("desired state written for {devices} device(s)"),
            ),
            WriteOutcome::Failed { reason, message } => ("False", *reason, message.clone()),
        };
        conditions.push(condition(
            previous,
            DESIRED_STATE_WRITTEN,
            status,
            reason,
            &message,
            inputs.generation,
            now,
        ));
    }
    if let Some(agg) = &inputs.aggregate {
        for (type_, status, reason, message) in fleet_conditions(agg) {
            conditions.push(condition(
                previous,
                type_,
                status,
                reason,
                &message,
                inputs.generation,
                now,
            ));
        }
    }
    DeploymentStatus {
        observed_generation: inputs.generation,
        conditions,
        aggregate: inputs.aggregate.clone(),
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
    } else {
        ("False", REASON_HEALTHY, "no failed or silent devices".to_owned())
    };
    vec![
        (READY, ready.0, ready.1, summary),
        (PROGRESSING, progressing.0, progressing.1, progressing.2),
        (DEGRADED, degraded.0, degraded.1, degraded.2),
    ]
}

fn condition(
    previous: Option<&DeploymentStatus>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Condition {
    let since = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
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
