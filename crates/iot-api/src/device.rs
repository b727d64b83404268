//! The `Device` custom resource: the fleet's inventory in Kubernetes.
//!
//! Cluster-scoped, as a Node is: a device is infrastructure, shared by the
//! namespaces whose Deployments select it. Its name is the device id.
//!
//! Who writes what:
//! - `metadata.labels` and `spec` are written by people (kubectl, `iotctl`, the
//!   dashboard), never by the device and never by the operator. Labels are
//!   authority (a selector decides from them what runs where); a device's report is
//!   only information, so nothing from a report is ever copied into them.
//! - `status` is written by the operator alone, from the device's reports, stamped
//!   with the NATS server's clock.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Set by `iotctl device revoke` (an RFC 3339 time): the device's identity was
/// revoked. Its Deployments stop selecting it, and the operator shows it as the
/// `Revoked` condition. The object is kept, so the record stays.
pub const REVOKED_ANNOTATION: &str = "iot.nationtech.io/revoked-at";

/// One device of the fleet. Its name is the device id.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "iot.nationtech.io",
    version = "v1alpha1",
    kind = "Device",
    plural = "devices",
    shortname = "iotdevice",
    status = "DeviceStatus",
    printcolumn = r#"{"name":"Online","type":"string","jsonPath":".status.conditions[?(@.type==\"Online\")].status"}"#,
    printcolumn = r#"{"name":"Arch","type":"string","jsonPath":".status.inventory.arch"}"#,
    printcolumn = r#"{"name":"Agent","type":"string","jsonPath":".status.agentVersion"}"#,
    printcolumn = r#"{"name":"Running","type":"integer","jsonPath":".status.deployments.running"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.deployments.failed"}"#,
    printcolumn = r#"{"name":"Paused","type":"boolean","jsonPath":".spec.paused","priority":1}"#,
    printcolumn = r#"{"name":"Last-Seen","type":"date","jsonPath":".status.lastSeenAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {
    /// Takes the device out of every rollout (maintenance) without removing what
    /// already runs on it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

impl Device {
    /// Whether `iotctl device revoke` marked this device.
    pub fn revoked_at(&self) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REVOKED_ANNOTATION))
            .map(String::as_str)
    }

    /// The device's labels (none: an empty map).
    pub fn label_map(&self) -> &BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.metadata.labels.as_ref().unwrap_or(&EMPTY)
    }
}

/// Written only by the operator, from the device's reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    /// Online (reported within the staleness window, by the NATS server's clock),
    /// RuntimeReady (podman answered the agent), Revoked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// When a report of this device last reached NATS (the server's clock). Written
    /// when something else in this status changes, and otherwise at most every
    /// `--device-last-seen-every` (15 minutes by default): the live heartbeat stays in
    /// NATS, where `iotctl devices` and the dashboard read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_at: Option<DateTime<Utc>>,
    /// The agent's version, from its report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory: Option<DeviceInventory>,
    /// Deployments on this device by phase, as the device reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployments: Option<PhaseCounts>,
}

/// What the device says it is. Information, never authority.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceInventory {
    pub arch: String,
    pub os: String,
    pub kernel: String,
    pub hostname: String,
    pub cpu_cores: u32,
    /// Rounded to MiB, so that a device's free memory drifting does not write.
    pub memory_mib: u64,
    pub disk_total_mib: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseCounts {
    pub total: u32,
    pub running: u32,
    pub failed: u32,
    pub pending: u32,
}
