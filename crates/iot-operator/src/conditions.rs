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

/// Outcome of the last write-path reconcile of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    Written {
        devices: usize,
    },
    Failed {
        reason: &'static str,
        message: String,
    },
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
    DeploymentStatus {
        observed_generation: inputs.generation,
        conditions,
        aggregate: inputs.aggregate.clone(),
    }
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
    k8s_openapi::jiff::Timestamp::from_second(t.timestamp())
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}
