//! What a device reports about itself, under `agent-status/status.<device>`.
//!
//! Written only by the device's own agent (heartbeat + on every phase change); read
//! by the operator's aggregator and by tools. Readers must accept statuses from both
//! older and newer agents: every field that was not in the first version has
//! `#[serde(default)]`, unknown fields are ignored, and unknown enum values decode to
//! an explicit `Unknown`.

use std::collections::{BTreeMap, VecDeque};

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::hash::SpecHash;
use crate::id::{DeploymentRef, Id};

/// Version of the `AgentStatus` shape written by this crate.
pub const AGENT_STATUS_FORMAT: u32 = 1;

/// How many events an agent keeps and reports.
pub const DEFAULT_EVENT_RING_CAPACITY: usize = 32;

/// One device's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentStatus {
    #[serde(default = "default_status_format")]
    pub format: u32,
    pub device_id: Id,
    #[serde(default)]
    pub agent_version: String,
    /// When the agent wrote this report. Readers judge staleness from it.
    pub heartbeat_at: DateTime<Utc>,
    /// Phase of every deployment the device has desired state for.
    #[serde(default)]
    pub deployments: BTreeMap<DeploymentRef, DeploymentPhase>,
    /// The newest reconcile outcomes, oldest first, bounded by the agent.
    #[serde(default)]
    pub recent_events: Vec<EventEntry>,
    #[serde(default)]
    pub inventory: Option<InventorySnapshot>,
    /// When the reconcile loop last finished a pass, on the device's clock. Compare it
    /// with `heartbeat_at` (same clock): a gap of several resync periods means the
    /// loop is wedged while the heartbeat still runs. `None` from agents that predate
    /// the field, and until the first pass.
    #[serde(default)]
    pub last_reconcile_at: Option<DateTime<Utc>>,
    /// Whether the device's container runtime answers. While it does not, the phases
    /// above say Failed with the runtime's error: the device cannot see its containers.
    #[serde(default)]
    pub runtime: RuntimeStatus,
}

fn default_status_format() -> u32 {
    AGENT_STATUS_FORMAT
}

/// Where one deployment stands on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeploymentPhase {
    pub phase: Phase,
    /// The spec hash this phase refers to. A device running an older spec reports the
    /// older hash, so it is not counted as having reached the current one.
    #[serde(default)]
    pub spec_hash: Option<SpecHash>,
    /// Why the deployment is Failed (or the last transient error while Pending).
    #[serde(default)]
    pub last_error: Option<String>,
    /// When the phase or error last changed.
    pub last_event_at: DateTime<Utc>,
    /// What is under way while Pending ("pulling image ...", "restoring service ..."),
    /// for people; not an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Times a container of this deployment was started again after it stopped (by
    /// podman's restart policy or by the agent), for the current spec, since the agent
    /// started.
    #[serde(default)]
    pub restarts: u32,
    /// Times a container of this deployment was re-created after something outside
    /// the agent removed it, for the current spec, since the agent started.
    #[serde(default)]
    pub restores: u32,
    /// Restarts plus restores within the last [`RECENT_RESTART_WINDOW_SECS`], measured
    /// on the agent's monotonic clock so a skewed device clock cannot distort it. A
    /// reader flags a deployment whose containers keep coming back.
    #[serde(default)]
    pub recent_restarts: u32,
    /// The revision number of the spec this phase refers to (`DesiredState::revision`).
    /// `None` from agents that predate revisions, and for payloads that carried none:
    /// readers show it as unknown, never as a number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// The image pull the deployment waits for, while it waits: set from the moment
    /// the agent starts pulling one of its images (and while a failed pull waits for
    /// its retry) until the image is on the device. `None` from agents that predate
    /// the field, and when no pull is involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<PullProgress>,
}

/// How far the pull of one image got. Byte counts cover the layers whose size the
/// registry told podman; small layers that finish within podman's one-second
/// progress interval are only counted as layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PullProgress {
    pub image: String,
    pub state: PullState,
    #[serde(default)]
    pub bytes_done: u64,
    /// `None` while some layer still downloading has not said its size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
    #[serde(default)]
    pub layers_done: u32,
    /// Layers (and the image's config blob) announced so far; more may follow.
    #[serde(default)]
    pub layers_total: u32,
    /// When this attempt started, on the device's clock.
    pub started_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum PullState {
    /// Under way.
    Pulling,
    /// The last attempt failed (the deployment's `last_error` says why) and waits
    /// for its retry; the counts are where it stopped.
    Failed,
    /// A state written by a newer agent that this reader does not know.
    #[serde(other)]
    Unknown,
}

impl DeploymentPhase {
    /// A phase with no restart history and no detail.
    pub fn new(phase: Phase, spec_hash: Option<SpecHash>, last_error: Option<String>, at: DateTime<Utc>) -> Self {
        Self {
            phase,
            spec_hash,
            last_error,
            last_event_at: at,
            detail: None,
            restarts: 0,
            restores: 0,
            recent_restarts: 0,
            revision: None,
            pull: None,
        }
    }
}

/// The window of [`DeploymentPhase::recent_restarts`].
pub const RECENT_RESTART_WINDOW_SECS: u64 = 600;

/// The device's container runtime as the agent last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RuntimeStatus {
    pub state: RuntimeState,
    /// What went wrong, or what the agent waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum RuntimeState {
    /// The runtime answered the last call.
    Available,
    /// The agent has not reached the runtime yet since it started (its socket may not
    /// exist yet during boot). Not an error.
    Starting,
    /// The runtime answered before and does not now.
    Unavailable,
    /// Not reported (an older agent), or a state this reader does not know.
    #[default]
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Every container of the deployment runs the reported spec.
    Running,
    /// The deployment cannot reach its spec; see `last_error`.
    Failed,
    /// Work is in progress (creating, pulling, waiting to retry).
    Pending,
    /// A phase written by a newer agent that this reader does not know.
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Severity {
    Info,
    Warning,
    Error,
    #[serde(other)]
    Unknown,
}

/// One reconcile outcome worth showing to a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EventEntry {
    pub at: DateTime<Utc>,
    pub severity: Severity,
    /// The deployment it concerns, if any (agent-level events have none).
    #[serde(default)]
    pub deployment: Option<DeploymentRef>,
    pub message: String,
}

/// Static-ish facts about the device, collected at startup and refreshed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct InventorySnapshot {
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub cpu_cores: u32,
    #[serde(default)]
    pub memory_bytes: u64,
    #[serde(default)]
    pub disk_total_bytes: u64,
    #[serde(default)]
    pub disk_free_bytes: u64,
    #[serde(default)]
    pub kernel: String,
    #[serde(default)]
    pub arch: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub agent_version: String,
}

/// A bounded ring of events: pushing past capacity drops the oldest.
#[derive(Debug, Clone)]
pub struct EventRing {
    capacity: usize,
    events: VecDeque<EventEntry>,
}

impl EventRing {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            events: VecDeque::with_capacity(capacity.max(1)),
        }
    }

    pub fn push(&mut self, event: EventEntry) {
        if self.events.len() == self.capacity {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    pub fn to_vec(&self) -> Vec<EventEntry> {
        self.events.iter().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}
