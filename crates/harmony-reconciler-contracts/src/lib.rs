//! Cross-boundary contracts of the NationTech IoT platform.
//!
//! Everything that crosses a process boundary lives here: NATS bucket and key names,
//! the desired-state payload (`IotScore`), and what devices report (`AgentStatus`).
//! This crate depends on serde and schemars only, never on a Kubernetes or NATS
//! client, so every side can use it.
//!
//! JSON shapes are pinned by the snapshot tests in `tests/`.

pub mod hash;
pub mod id;
pub mod keys;
pub mod pull_text;
pub mod read;
pub mod report;
pub mod score;
pub mod status;
pub mod text;
pub mod validate;

pub use hash::{SpecHash, spec_hash_of, spec_hash_of_value};
pub use id::{DeploymentRef, Id, IdError};
pub use keys::{
    AGENT_STATUS_BUCKET, DESIRED_STATE_BUCKET, agent_status_key, desired_state_key, parse_agent_status_key,
    parse_desired_state_key,
};
pub use score::{
    DecodedDesiredState, DesiredState, IotScore, MAX_CPU_MILLICORES, MAX_MEMORY_MIB, MIN_MEMORY_MIB, PodmanService,
    PodmanV0Score, PortMapping, Protocol, ResourceLimits, RestartPolicy, ScoreSlot,
};
pub use status::{
    AgentStatus, DeploymentPhase, EventEntry, EventRing, InventorySnapshot, Phase, PullProgress, PullState,
    RuntimeState, RuntimeStatus, Severity,
};
pub use validate::{ScoreProblem, describe_problems, validate_score};
