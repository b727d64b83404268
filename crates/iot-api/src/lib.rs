//! The `iot.nationtech.io` API as Kubernetes users see it.
//!
//! Everything here follows Kubernetes API conventions: camelCase fields,
//! `status.observedGeneration`, conditions, well-known labels. The payloads that
//! travel to devices over NATS are a different contract
//! (`harmony-reconciler-contracts`) with names of their own; [`score`] converts.
//!
//! Ownership: users own `spec`; the operator alone writes `status`.

pub mod conditions;
pub mod deployment;
pub mod labels;
pub mod score;

pub use deployment::{
    AggregateStatus, Deployment, DeploymentSpec, DeploymentStatus, DeviceError, DeviceEvent, ErrorGroup,
};
pub use score::{IotScore, PodmanService, PodmanV0Score, PortMapping, Protocol, ResourceLimits, RestartPolicy};

/// API group and version of every resource here.
pub const GROUP: &str = "iot.nationtech.io";
pub const VERSION: &str = "v1alpha1";
