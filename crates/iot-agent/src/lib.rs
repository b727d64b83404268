//! The IoT device agent.
//!
//! Data flow: NATS KV (this device's keys only, no consumer) -> [`DesiredView`] ->
//! pure [`plan::plan`] against the containers podman reports -> libpod API calls ->
//! per-deployment phases and events -> `AgentStatus` heartbeat.
//!
//! [`DesiredView`]: iot_nats::DesiredView

pub mod agent;
pub mod config;
pub mod decode;
pub mod images;
pub mod inventory;
pub mod labels;
#[cfg(feature = "test-support")]
pub mod memory_runtime;
pub mod metrics;
pub mod plan;
pub mod podman;
pub mod reconciler;
pub mod registry_grants;
pub mod report;
pub mod restarts;
pub mod runtime;
