//! The `.status.aggregate` shape (filled by the aggregator).

use chrono::{DateTime, Utc};
use harmony_reconciler_contracts::{Id, Severity};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Per-deployment fleet summary. Counts partition the targets:
/// `succeeded + failed + pending + unreported == targets`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct AggregateStatus {
    pub targets: u32,
    /// Devices reporting Running for the current spec.
    pub succeeded: u32,
    /// Devices reporting Failed for the current spec.
    pub failed: u32,
    /// Devices that reported, but not (yet) the current spec.
    pub pending: u32,
    /// Devices with no status, or whose last heartbeat is older than the threshold.
    pub unreported: u32,
    /// The spec hash devices must report to count as succeeded or failed.
    pub spec_hash: String,
    /// The most recent failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<DeviceError>,
    /// Failures grouped by message, most devices first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_errors: Vec<ErrorGroup>,
    /// Newest events for this deployment across devices, newest first, de-duplicated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_events: Vec<DeviceEvent>,
    /// Newest heartbeat among the targeted devices.
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
