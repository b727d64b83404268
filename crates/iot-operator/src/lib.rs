//! The IoT operator.
//!
//! - [`controller`]: `Deployment` -> desired state in NATS KV (the write path), with
//!   the pure planner in [`kv_plan`], target resolution and the shrink guard in
//!   [`targeting`], revision records in [`revisions`], progressive rollouts in
//!   [`rollout`] (the pure step) and [`rollout_plan`] (batch membership), and the
//!   bucket's index in [`desired_index`].
//! - [`device_status`]: the one writer of `Device.status`, from device reports.
//! - [`device_index`]: every device's latest report; [`status_aggregator`] folds
//!   it into each deployment's aggregate with the pure [`fleet_aggregate`].
//! - [`device_services`]: what devices and viewers ask the operator over NATS
//!   (status relay, desired-state reads, the status snapshot).
//! - [`status_writer`]: the one writer of `.status`, fed by the controller and the
//!   status aggregator.
//! - [`leader`]: leader election on a Lease, so only one replica writes.
//! - [`install`]: the CRD from typed Rust (the resource types are in `iot-api`).

pub mod conditions;
pub mod controller;
pub mod daemon;
pub mod desired_index;
pub mod device_index;
pub mod device_services;
pub mod device_status;
pub mod fleet_aggregate;
pub mod gc;
pub mod images;
pub mod install;
pub mod kv_plan;
pub mod leader;
pub mod metrics;
pub mod revisions;
pub mod rollout;
pub mod rollout_conditions;
pub mod rollout_plan;
pub mod rollout_write;
pub mod status_aggregator;
pub mod status_writer;
pub mod targeting;
pub mod yaml;
