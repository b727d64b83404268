//! The `iot.nationtech.io` API as Kubernetes users see it.
//!
//! Everything here follows Kubernetes API conventions: camelCase fields,
//! `status.observedGeneration`, conditions, well-known labels. The payloads that
//! travel to devices over NATS are a different contract
//! (`harmony-reconciler-contracts`) with names of their own; [`score`] converts.
//!
//! Ownership: users own `spec` (and a Device's labels); the operator alone writes
//! `status` and `DeploymentRevision`s.

pub mod conditions;
pub mod deployment;
pub mod device;
pub mod labels;
pub mod revision;
pub mod rollout;
pub mod score;
pub mod selector;

pub use deployment::{
    AggregateStatus, CONFIRM_SHRINK_ANNOTATION, Deployment, DeploymentSpec, DeploymentStatus, DeviceError, DeviceEvent,
    ErrorGroup, PinnedImage, RESOLVE_IMAGES_ANNOTATION, RevisionCount,
};
pub use device::{Device, DeviceInventory, DeviceSpec, DeviceStatus, PhaseCounts, REVOKED_ANNOTATION};
pub use revision::{DeploymentRevision, DeploymentRevisionSpec, RolloutPlan, revision_name};
pub use rollout::{
    ABORT_ANNOTATION, BatchStatus, FailureCluster, OnFailure, PROMOTE_ANNOTATION, RolloutBatch, RolloutPhase,
    RolloutSpec, RolloutStatus,
};
pub use score::{IotScore, PodmanService, PodmanV0Score, PortMapping, Protocol, ResourceLimits, RestartPolicy};
pub use selector::{DeviceSelector, SelectorOperator, SelectorRequirement};

/// API group and version of every resource here.
pub const GROUP: &str = "iot.nationtech.io";
pub const VERSION: &str = "v1alpha1";
