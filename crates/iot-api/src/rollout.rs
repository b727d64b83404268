//! Progressive rollouts: `Deployment.spec.rollout` and `Deployment.status.rollout`.
//!
//! Without `spec.rollout` a new revision goes to every matched device at once.
//! With it, the operator dispatches the new revision batch by batch (a device
//! outside a started batch never receives it), gates each batch on what devices
//! report (silence counts as failure, on the NATS server's clock), and on a failed
//! gate either suspends or writes the last good revision back to the devices that
//! received the bad one.
//!
//! People act on a rollout with ordinary edits, so RBAC decides who may:
//! `spec.rollout.paused` pauses and resumes, and two annotations promote past a
//! `pause: {}` batch and abort. Each annotation names what it acts on (a revision,
//! and a batch), so a stale one never acts on a later rollout.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::selector::DeviceSelector;

/// Promotes a rollout past a `pause: {}` batch. Its value is `REVISION/BATCH`
/// (1-based batch number, as `.status.rollout` shows it), e.g. `4/1`.
pub const PROMOTE_ANNOTATION: &str = "iot.nationtech.io/rollout-promote";
/// Aborts the rollout of a revision and rolls back: the value is the revision, e.g. `4`.
pub const ABORT_ANNOTATION: &str = "iot.nationtech.io/rollout-abort";

/// [`RolloutStatus::reason`] values.
pub const REASON_BATCH_FAILED: &str = "BatchFailed";
pub const REASON_FAILURE_THRESHOLD: &str = "FailureThreshold";
pub const REASON_DEADLINE: &str = "ProgressDeadlineExceeded";
pub const REASON_ABORTED: &str = "Aborted";

/// Success threshold of the first batch when none is given: every device.
pub const FIRST_BATCH_SUCCESS_THRESHOLD: u32 = 100;
/// Success threshold of later batches when none is given.
pub const LATER_BATCH_SUCCESS_THRESHOLD: u32 = 90;
/// `updateTimeout` when none is given.
pub const DEFAULT_UPDATE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// `silenceTimeout` when none is given.
pub const DEFAULT_SILENCE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// How a new revision reaches the matched devices.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Ordered batches. Each `limit` is cumulative: `{limit: 1}, {limit: 50%}`
    /// means one device, then up to half of the matched devices in all. The
    /// devices no batch names form a final batch. Changes apply to the next
    /// revision: a rollout keeps the batches it started with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub batches: Vec<RolloutBatch>,
    /// How many matched devices may be updating (dispatched, not yet Running) or
    /// failed at once: a count, or a percentage of the devices matched when the
    /// rollout started. Within a batch, dispatch waits for room. Default: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
    /// How many devices may be pulling the new revision's images at once: a device
    /// holds a slot from dispatch until it reports the revision Running or failed.
    /// The rest of the batch waits (`pendingPull`). Keeps a shop's uplink and the
    /// registry from meeting the whole fleet at once. Default: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_concurrent_pulls: Option<u32>,
    /// Fails the rollout as soon as this share of the completed devices failed,
    /// checked at every report across all batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<FailureThreshold>,
    /// A dispatched device that has not reported the new revision Running after
    /// this long counts as failed (timed out). Default 30m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub update_timeout: Option<String>,
    /// A dispatched device whose last report reached NATS longer ago than this
    /// (the server's clock) counts as failed (silent). Default 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub silence_timeout: Option<String>,
    /// The rollout fails when it has not finished this long after it started (time
    /// spent waiting for a person, paused or at a `pause: {}`, does not count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub progress_deadline_seconds: Option<u32>,
    /// What a failed gate does: `Pause` (default) stops dispatching and keeps every
    /// device as it is; `Rollback` writes the last good revision back to every
    /// device that received the new one.
    // Not an Option: a nullable enum renders as `enum: [..., null]`, which
    // kube-apiserver 1.20 refuses in a CRD.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Stops dispatching until set back to false (`iotctl rollout pause|resume`).
    /// Gates keep being checked.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

/// One batch of a rollout.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutBatch {
    /// Cumulative size: a count (`1`) or a percentage of the devices matched when
    /// the rollout started (`"50%"`).
    pub limit: IntOrString,
    /// Only devices with these labels are picked for this batch (e.g. `ring: canary`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<DeviceSelector>,
    /// Percentage of the batch's dispatched devices that must run the new revision
    /// for the batch to pass. Default 100 for the first batch, 90 after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub success_threshold: Option<u32>,
    /// After the batch passed, wait for a person to promote it
    /// (`iotctl rollout promote`). Give this or `bakeTime`, not both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<BatchPause>,
    /// After the batch passed, wait this long while watching it for failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub bake_time: Option<String>,
}

/// `pause: {}`: wait for a person.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct BatchPause {}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureThreshold {
    /// Percentage of completed devices (succeeded or failed) that may fail.
    #[schemars(range(min = 0, max = 100))]
    pub percent: u32,
    /// The check starts once this many devices completed. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_completed: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum OnFailure {
    #[default]
    Pause,
    Rollback,
}

/// A field of `spec.rollout` that cannot be used as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.rollout.{field}: {problem}")]
pub struct RolloutSpecError {
    pub field: String,
    pub problem: String,
}

fn problem(field: impl Into<String>, problem: impl Into<String>) -> RolloutSpecError {
    RolloutSpecError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A count or a percentage (`IntOrString`) resolved against `total`. Percentages
/// round up, so `1%` of a small fleet is still one device.
pub fn resolve_amount(value: &IntOrString, total: u32) -> Result<u32, String> {
    match value {
        IntOrString::Int(n) if *n >= 0 => Ok(*n as u32),
        IntOrString::Int(n) => Err(format!("{n} is negative")),
        IntOrString::String(s) => {
            let Some(p) = s.strip_suffix('%') else {
                return Err(format!("{s:?} is neither a count nor a percentage like \"25%\""));
            };
            let p: u32 = p
                .parse()
                .map_err(|_| format!("{s:?} is not a percentage like \"25%\""))?;
            if p > 100 {
                return Err(format!("{s:?} is more than 100%"));
            }
            Ok((u64::from(total) * u64::from(p)).div_ceil(100) as u32)
        }
    }
}

/// Parses a Kubernetes-style duration (`90s`, `10m`, `1h30m`, `500ms`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like \"30s\", \"10m\" or \"1h30m\"");
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += unit.checked_mul(u32::try_from(n).map_err(|_| bad())?).ok_or_else(bad)?;
    }
    Ok(total)
}

impl RolloutSpec {
    /// Checks what the schema cannot, naming the field.
    pub fn validate(&self) -> Result<(), RolloutSpecError> {
        for (i, b) in self.batches.iter().enumerate() {
            resolve_amount(&b.limit, 100).map_err(|e| problem(format!("batches[{i}].limit"), e))?;
            if b.pause.is_some() && b.bake_time.is_some() {
                return Err(problem(format!("batches[{i}]"), "give pause or bakeTime, not both"));
            }
            if let Some(t) = &b.bake_time {
                parse_duration(t).map_err(|e| problem(format!("batches[{i}].bakeTime"), e))?;
            }
            if let Some(s) = &b.selector {
                s.validate()
                    .map_err(|e| problem(format!("batches[{i}].selector"), e.to_string()))?;
            }
        }
        if let Some(m) = &self.max_unavailable {
            let n = resolve_amount(m, 100).map_err(|e| problem("maxUnavailable", e))?;
            if n == 0 {
                return Err(problem("maxUnavailable", "0 would never let a device update"));
            }
        }
        for (field, value) in [
            ("updateTimeout", &self.update_timeout),
            ("silenceTimeout", &self.silence_timeout),
        ] {
            if let Some(v) = value {
                parse_duration(v).map_err(|e| problem(field, e))?;
            }
        }
        Ok(())
    }

    pub fn update_timeout(&self) -> Duration {
        self.update_timeout
            .as_deref()
            .and_then(|s| parse_duration(s).ok())
            .unwrap_or(DEFAULT_UPDATE_TIMEOUT)
    }

    pub fn silence_timeout(&self) -> Duration {
        self.silence_timeout
            .as_deref()
            .and_then(|s| parse_duration(s).ok())
            .unwrap_or(DEFAULT_SILENCE_TIMEOUT)
    }

    pub fn on_failure(&self) -> OnFailure {
        self.on_failure
    }
}

impl RolloutBatch {
    /// A batch of `limit` devices in all, with defaults for the rest.
    pub fn of(limit: IntOrString) -> Self {
        Self {
            limit,
            selector: None,
            success_threshold: None,
            pause: None,
            bake_time: None,
        }
    }

    pub fn bake_time(&self) -> Option<Duration> {
        self.bake_time.as_deref().and_then(|s| parse_duration(s).ok())
    }
}

/// The success threshold of batch `index` (0-based) given its spec, if any.
pub fn success_threshold(batch: Option<&RolloutBatch>, index: usize) -> u32 {
    batch.and_then(|b| b.success_threshold).unwrap_or(if index == 0 {
        FIRST_BATCH_SUCCESS_THRESHOLD
    } else {
        LATER_BATCH_SUCCESS_THRESHOLD
    })
}

/// Where a rollout stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RolloutPhase {
    /// Dispatching a batch, or watching it (bake time).
    Progressing,
    /// Waiting for a person: `spec.rollout.paused`, or a `pause: {}` batch that
    /// passed and waits to be promoted.
    Paused,
    /// A gate failed with `onFailure: Pause`: nothing more is dispatched, and every
    /// device keeps what it has until the spec changes, an undo, or an abort.
    Suspended,
    /// The last good revision is being written back to the devices that received
    /// the new one.
    RollingBack,
    /// Every device that received the new revision has the last good one again.
    RolledBack,
    /// Every batch passed.
    Complete,
}

impl RolloutPhase {
    /// No further dispatch or gate decision happens in this phase.
    pub fn is_final(self) -> bool {
        matches!(self, RolloutPhase::RolledBack | RolloutPhase::Complete)
    }
}

/// `.status.rollout`: written by the operator before it acts on a decision, so a
/// restarted operator continues from it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The revision being rolled out.
    pub revision: u64,
    /// The last good revision when the rollout started: what a rollback writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_revision: Option<u64>,
    pub phase: RolloutPhase,
    /// The batch being dispatched or watched, 1-based as people count.
    pub current_batch: u32,
    /// Devices matched when the rollout started (what percentages count).
    pub matched_at_start: u32,
    pub started_at: DateTime<Utc>,
    /// Start of the time that counts against `progressDeadlineSeconds` (moved on
    /// by the time spent waiting for a person).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_since: Option<DateTime<Utc>>,
    /// Since when the rollout waits for a person (paused, or a `pause: {}` batch
    /// that passed); that time does not count against the progress deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<DateTime<Utc>>,
    /// When the rollout reached a final phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    pub batches: Vec<BatchStatus>,
    /// Why the rollout stopped, for machines: `BatchFailed`, `FailureThreshold`,
    /// `ProgressDeadlineExceeded` or `Aborted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What is happening, or why it stopped, in a sentence.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Why a gate failed: failures grouped by message, with the labels every
    /// failing device shares.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failure_clusters: Vec<FailureCluster>,
    /// `batch 2/4, 37/120`: the current batch, and devices running the new
    /// revision of the devices matched.
    pub summary: String,
}

/// One batch's devices, by outcome.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchStatus {
    /// Devices in the batch.
    pub selected: u32,
    /// Devices that received the new revision.
    #[serde(default)]
    pub dispatched: u32,
    #[serde(default)]
    pub succeeded: u32,
    /// Reported the new revision Failed, or its containers keep coming back.
    #[serde(default)]
    pub failed: u32,
    /// Did not report the new revision Running within `updateTimeout`.
    #[serde(default)]
    pub timed_out: u32,
    /// Reported the new revision, then fell silent for `silenceTimeout`: the board
    /// that bricked on it.
    #[serde(default)]
    pub silent: u32,
    /// Fell silent for `silenceTimeout` without ever reporting the new revision.
    #[serde(default)]
    pub never_acknowledged: u32,
    /// Offline (or in maintenance) when the batch reached them: skipped, and
    /// updated when they return if the rollout still allows it.
    #[serde(default)]
    pub pending_offline: u32,
    /// Online devices of a started batch waiting for room to be dispatched: a pull
    /// slot (`maxConcurrentPulls`) or `maxUnavailable`.
    #[serde(default)]
    pub pending_pull: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When the batch passed its gate (its bake time counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passed_at: Option<DateTime<Utc>>,
}

/// Failing devices that failed the same way.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureCluster {
    /// The error, with device ids, container ids and times masked.
    pub message: String,
    pub devices: u32,
    pub example_devices: Vec<String>,
    /// Labels every device of the cluster carries that not every matched device
    /// carries (e.g. `hw: rpi3`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub shared_labels: BTreeMap<String, String>,
}

/// The value of [`PROMOTE_ANNOTATION`] that promotes `batch` (1-based) of `revision`.
pub fn promote_value(revision: u64, batch: u32) -> String {
    format!("{revision}/{batch}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_kubernetes_style() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["", "10", "s", "1d", "1.5s", "-1s", "10 s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn amounts_are_counts_or_percentages_rounded_up() {
        assert_eq!(resolve_amount(&IntOrString::Int(3), 10), Ok(3));
        assert_eq!(resolve_amount(&IntOrString::String("50%".into()), 7), Ok(4));
        assert_eq!(resolve_amount(&IntOrString::String("1%".into()), 6), Ok(1));
        assert_eq!(resolve_amount(&IntOrString::String("100%".into()), 6), Ok(6));
        assert!(resolve_amount(&IntOrString::String("150%".into()), 6).is_err());
        assert!(resolve_amount(&IntOrString::String("half".into()), 6).is_err());
        assert!(resolve_amount(&IntOrString::Int(-1), 6).is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let mut spec = RolloutSpec {
            batches: vec![RolloutBatch::of(IntOrString::String("ten".into()))],
            ..Default::default()
        };
        let e = spec.validate().expect_err("invalid");
        assert_eq!(e.field, "batches[0].limit");
        spec.batches[0].limit = IntOrString::Int(1);
        spec.batches[0].pause = Some(BatchPause {});
        spec.batches[0].bake_time = Some("1m".into());
        assert_eq!(spec.validate().expect_err("invalid").field, "batches[0]");
        spec.batches[0].bake_time = None;
        assert!(spec.validate().is_ok());
        spec.max_unavailable = Some(IntOrString::Int(0));
        assert_eq!(spec.validate().expect_err("invalid").field, "maxUnavailable");
    }
}
