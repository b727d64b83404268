//! Condition types and reasons of `Deployment.status` and `Device.status`. Every string a user, a script
//! or a tool (kstatus, Argo CD, Flux) may match on lives here.

pub const DESIRED_STATE_WRITTEN: &str = "DesiredStateWritten";
/// Every target device runs the current spec.
pub const READY: &str = "Ready";
/// Some devices have not reached the current spec yet.
pub const PROGRESSING: &str = "Progressing";
/// Some devices failed, went silent, or keep restarting.
pub const DEGRADED: &str = "Degraded";
/// The selector shrank by too much at once; removals wait for a confirmation.
pub const REMOVALS_HELD: &str = "RemovalsHeld";
/// A rollout's gate failed and the last good revision was written back.
pub const ROLLED_BACK: &str = "RolledBack";

// Device conditions.
/// The device reported within the staleness window (the NATS server's clock).
pub const ONLINE: &str = "Online";
/// The device's container runtime answered its agent.
pub const RUNTIME_READY: &str = "RuntimeReady";
/// `iotctl device revoke` revoked the device's identity.
pub const REVOKED: &str = "Revoked";

pub const REASON_WRITTEN: &str = "Written";
pub const REASON_NATS_UNAVAILABLE: &str = "NatsUnavailable";
pub const REASON_KUBERNETES_UNAVAILABLE: &str = "KubernetesUnavailable";
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
/// A tag could not be resolved because the registry did not answer; the previous
/// revision stays dispatched and the operator retries with backoff.
pub const REASON_REGISTRY_UNAVAILABLE: &str = "RegistryUnavailable";
/// The registry answered, and the tag cannot be resolved (no such tag, refused).
pub const REASON_IMAGE_NOT_RESOLVED: &str = "ImageNotResolved";
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
pub const REASON_LARGE_SHRINK: &str = "LargeShrink";
pub const REASON_NO_REMOVALS_HELD: &str = "NoRemovalsHeld";
// Rollouts (`spec.rollout`).
pub const REASON_ROLLOUT_PROGRESSING: &str = "RolloutProgressing";
pub const REASON_ROLLOUT_PAUSED: &str = "RolloutPaused";
pub const REASON_AWAITING_PROMOTION: &str = "AwaitingPromotion";
pub const REASON_ROLLOUT_SUSPENDED: &str = "RolloutSuspended";
pub const REASON_ROLLING_BACK: &str = "RollingBack";
pub const REASON_ROLLED_BACK: &str = "RolledBack";
pub const REASON_PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";
pub const REASON_NOT_ROLLED_BACK: &str = "NotRolledBack";
pub const REASON_REPORTING: &str = "Reporting";
pub const REASON_SILENT: &str = "Silent";
pub const REASON_NEVER_REPORTED: &str = "NeverReported";
pub const REASON_RUNTIME_ANSWERS: &str = "RuntimeAnswers";
pub const REASON_RUNTIME_UNAVAILABLE: &str = "RuntimeUnavailable";
pub const REASON_RUNTIME_STARTING: &str = "RuntimeStarting";
pub const REASON_RUNTIME_UNKNOWN: &str = "RuntimeNotReported";
pub const REASON_REVOKED: &str = "IdentityRevoked";
pub const REASON_NOT_REVOKED: &str = "Enrolled";
