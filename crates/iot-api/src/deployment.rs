//! The `Deployment` custom resource (group `iot.nationtech.io`), typed in Rust.
//!
//! The CRD is generated from these types (`iot-operator crd`), never hand-written,
//! and its schema carries the validation the API server enforces.

use chrono::{DateTime, Utc};
use harmony_reconciler_contracts::{Id, IdError, Severity};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::revision::DEFAULT_REVISION_HISTORY_LIMIT;
use crate::rollout::{RolloutSpec, RolloutStatus};
use crate::score::IotScore;
use crate::selector::DeviceSelector;

/// What runs on which devices.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "iot.nationtech.io",
    version = "v1alpha1",
    kind = "Deployment",
    plural = "deployments",
    shortname = "iotdep",
    namespaced,
    status = "DeploymentStatus",
    printcolumn = r#"{"name":"Targets","type":"integer","jsonPath":".status.aggregate.targets"}"#,
    printcolumn = r#"{"name":"Succeeded","type":"integer","jsonPath":".status.aggregate.succeeded"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.aggregate.failed"}"#,
    printcolumn = r#"{"name":"Pending","type":"integer","jsonPath":".status.aggregate.pending"}"#,
    printcolumn = r#"{"name":"Unreported","type":"integer","jsonPath":".status.aggregate.unreported"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Revision","type":"string","jsonPath":".status.aggregate.revisionSummary"}"#,
    printcolumn = r#"{"name":"Rollout","type":"string","jsonPath":".status.rollout.summary"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentSpec {
    /// Device ids that should run this deployment, registered or not. Each is a NATS
    /// subject token of 1-64 characters from A-Z a-z 0-9 _ - ; listed at most once.
    /// Give either this or `selector`, not both.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1), inner(regex(pattern = r"^[A-Za-z0-9_-]{1,64}$")))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub target_devices: Vec<String>,
    /// The registered, unrevoked `Device`s whose labels match run this deployment,
    /// including devices labelled into the set later. An empty selector matches no
    /// device. Give either this or `targetDevices`, not both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<DeviceSelector>,
    /// What to run, as one variant of IotScore (today: PodmanV0).
    pub score: IotScore,
    /// How many `DeploymentRevision`s to keep (the oldest go first). Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub revision_history_limit: Option<u32>,
    /// When one change would take the deployment off more than this percentage of
    /// the devices that run it (a label typo can empty a region), the removals are
    /// held until confirmed (see the `RemovalsHeld` condition). Default 20; 100
    /// turns the guard off. A shrink by a single device always goes through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_shrink_percent: Option<u32>,
    /// How a new revision reaches the devices: batches gated on what devices
    /// report, with automatic rollback. Without it every matched device gets a new
    /// revision at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
}

/// Annotation that confirms held removals: its value must be the token the
/// `RemovalsHeld` condition names, so a confirmation covers exactly the set of
/// devices it was given for.
pub const CONFIRM_SHRINK_ANNOTATION: &str = "iot.nationtech.io/confirm-shrink";

/// A new value resolves the score's image tags again: tags are pinned to digests
/// once per revision, so a tag that moves changes nothing until someone says so
/// (`iotctl`-free: `kubectl annotate ... iot.nationtech.io/resolve-images=$(date +%s) --overwrite`).
/// A tag that now names other bits makes a new revision, rolled out like any other.
pub const RESOLVE_IMAGES_ANNOTATION: &str = "iot.nationtech.io/resolve-images";

/// Shrink guard percentage when `spec.maxShrinkPercent` is not set.
pub const DEFAULT_MAX_SHRINK_PERCENT: u32 = 20;

impl DeploymentSpec {
    /// The schema rule "exactly one of `targetDevices` and `selector`", for the CRD.
    /// Each branch names the field it forbids, so that the API server's message
    /// names the field (the schema generator cannot express this: it merges the
    /// properties of `oneOf` branches into the object).
    pub fn one_target_rule() -> serde_json::Value {
        serde_json::json!([
            {"required": ["targetDevices"], "properties": {"selector": {"not": {}}}},
            {"required": ["selector"], "properties": {"targetDevices": {"not": {}}}}
        ])
    }

    /// A deployment to the listed devices.
    pub fn for_devices(targets: impl IntoIterator<Item = impl Into<String>>, score: IotScore) -> Self {
        Self {
            target_devices: targets.into_iter().map(Into::into).collect(),
            selector: None,
            score,
            revision_history_limit: None,
            max_shrink_percent: None,
            rollout: None,
        }
    }

    /// A deployment to the devices a selector matches.
    pub fn for_selector(selector: DeviceSelector, score: IotScore) -> Self {
        Self {
            target_devices: Vec::new(),
            selector: Some(selector),
            score,
            revision_history_limit: None,
            max_shrink_percent: None,
            rollout: None,
        }
    }

    /// Targets as validated device ids. The CRD schema already enforces the pattern;
    /// this guards against objects written around it.
    pub fn target_ids(&self) -> Result<std::collections::BTreeSet<Id>, IdError> {
        self.target_devices.iter().map(|d| Id::new(d.as_str())).collect()
    }

    pub fn revision_history_limit(&self) -> u32 {
        self.revision_history_limit
            .unwrap_or(DEFAULT_REVISION_HISTORY_LIMIT)
            .max(1)
    }

    pub fn max_shrink_percent(&self) -> u32 {
        self.max_shrink_percent.unwrap_or(DEFAULT_MAX_SHRINK_PERCENT).min(100)
    }
}

/// Written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentStatus {
    /// The `metadata.generation` that both the desired state in NATS and the fleet
    /// summary below correspond to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Kubernetes-style conditions: DesiredStateWritten, Ready, Progressing, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The fleet's truth for this deployment, folded from device reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<AggregateStatus>,
    /// How many registered, unrevoked Devices the selector matches now (selector
    /// deployments only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched_devices: Option<u32>,
    /// The `DeploymentRevision` the current score is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<u64>,
    /// The progressive rollout of `currentRevision` (deployments with
    /// `spec.rollout`). Written by the operator before it acts on a decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// The digest each image of `currentRevision` is pinned to (images on the
    /// platform's registries; others run as named).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<PinnedImage>,
}

/// An image as the Deployment names it, and the digest devices run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PinnedImage {
    pub image: String,
    pub digest: String,
}

/// Per-deployment fleet summary. Counts partition the targets:
/// `succeeded + failed + pending + unreported == targets`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AggregateStatus {
    /// The `metadata.generation` this summary was computed for. A summary for an
    /// older generation says nothing about the current spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The spec hash devices must report to count as succeeded or failed.
    pub spec_hash: String,
    pub targets: u32,
    /// Devices reporting Running for the current spec.
    pub succeeded: u32,
    /// Devices reporting Failed for the current spec.
    pub failed: u32,
    /// Devices that reported, but not (yet) the current spec.
    pub pending: u32,
    /// Devices with no status, or whose last report reached NATS longer ago than the
    /// threshold (judged by the NATS server's clock, never the device's).
    pub unreported: u32,
    /// Reporting devices whose containers of this deployment keep coming back
    /// (restarted or restored several times in the last 10 minutes).
    #[serde(default)]
    pub restarting: u32,
    /// Restarts plus restores the targets report for the current spec (since
    /// each agent started).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarts: u32,
    /// The most recent failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<DeviceError>,
    /// Failures grouped by message (device ids, container ids, times masked), most
    /// devices first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_errors: Vec<ErrorGroup>,
    /// Newest events for this deployment across devices, newest first, de-duplicated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_events: Vec<DeviceEvent>,
    /// Newest report from a targeted device (NATS server time) as of the last change
    /// of this summary. Not refreshed on its own, so a healthy fleet causes no writes;
    /// devices that fall silent show up in `unreported`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// The revision devices must report to count as on the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// Reporting targets by the revision they run, newest first. Devices whose agent
    /// reports no revision (older agents) are counted in `unknownRevision`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revisions: Vec<RevisionCount>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unknown_revision: u32,
    /// The newest revision that every target ran Running at once: what a rollback
    /// goes back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_good_revision: Option<u64>,
    /// "3/5 on rev 7": targets running the current revision, of all targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision_summary: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct RevisionCount {
    pub revision: u64,
    pub devices: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct DeviceError {
    pub device: Id,
    pub message: String,
    pub at: DateTime<Utc>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorGroup {
    pub message: String,
    pub devices: u32,
    /// A few of the affected devices.
    pub example_devices: Vec<Id>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct DeviceEvent {
    pub at: DateTime<Utc>,
    pub device: Id,
    pub severity: Severity,
    pub message: String,
}
