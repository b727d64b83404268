//! Condition types and reasons of `Deployment.status`. Every string a user, a script
//! or a tool (kstatus, Argo CD, Flux) may match on lives here.

pub const DESIRED_STATE_WRITTEN: &str = "DesiredStateWritten";
/// Every target device runs the current spec.
pub const READY: &str = "Ready";
/// Some devices have not reached the current spec yet.
pub const PROGRESSING: &str = "Progressing";
/// Some devices failed, went silent, or keep restarting.
pub const DEGRADED: &str = "Degraded";

pub const REASON_WRITTEN: &str = "Written";
pub const REASON_NATS_UNAVAILABLE: &str = "NatsUnavailable";
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
pub const REASON_ALL_RUNNING: &str = "AllDevicesRunning";
pub const REASON_NO_REPORTS_YET: &str = "AwaitingReports";
pub const REASON_DEVICES_FAILED: &str = "DevicesFailed";
pub const REASON_DEVICES_UNREPORTED: &str = "DevicesUnreported";
pub const REASON_REPEATED_RESTARTS: &str = "RepeatedRestarts";
pub const REASON_ROLLING_OUT: &str = "RollingOut";
pub const REASON_ROLLOUT_COMPLETE: &str = "RolloutComplete";
pub const REASON_HEALTHY: &str = "Healthy";
/// The fleet summary is still being computed for the current generation.
pub const REASON_AGGREGATING: &str = "Aggregating";
