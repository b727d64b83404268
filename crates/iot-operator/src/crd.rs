//! The `Deployment` custom resource (group `iot.nationtech.io`), typed in Rust.
//!
//! Ownership: users own `spec`; the operator alone writes `status`.
//! The CRD is generated from these types (`iot-operator crd`), never hand-written,
//! and its schema carries the validation the API server enforces.

use harmony_reconciler_contracts::IotScore;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::aggregate_types::AggregateStatus;

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
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct DeploymentSpec {
    /// Device ids that should run this deployment. Each is a NATS subject token of
    /// 1-64 characters from A-Z a-z 0-9 _ - ; listed at most once.
    #[schemars(length(min = 1), inner(regex(pattern = r"^[A-Za-z0-9_-]{1,64}$")))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub target_devices: Vec<String>,
    /// What to run, as one variant of IotScore (today: PodmanV0).
    pub score: IotScore,
}

/// Written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct DeploymentStatus {
    /// `metadata.generation` the status was computed for.
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
