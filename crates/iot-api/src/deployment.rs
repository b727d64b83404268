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

use crate::score::IotScore;

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
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentSpec {
    /// Device ids that should run this deployment. Each is a NATS subject token of
    /// 1-64 characters from A-Z a-z 0-9 _ - ; listed at most once.
    #[schemars(length(min = 1), inner(regex(pattern = r"^[A-Za-z0-9_-]{1,64}$")))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub target_devices: Vec<String>,
    /// What to run, as one variant of IotScore (today: PodmanV0).
    pub score: IotScore,
}

impl DeploymentSpec {
    /// Targets as validated device ids. The CRD schema already enforces the pattern;
    /// this guards against objects written around it.
    pub fn target_ids(&self) -> Result<std::collections::BTreeSet<Id>, IdError> {
        self.target_devices.iter().map(|d| Id::new(d.as_str())).collect()
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
