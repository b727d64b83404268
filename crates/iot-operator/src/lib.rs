//! The IoT operator.
//!
//! - [`controller`]: `Deployment` -> desired state in NATS KV (the write path), with
//!   the pure planner in [`kv_plan`] and the bucket index in [`kv_index`].
//! - [`status_writer`]: the one writer of `.status`, fed by the controller and the
//!   aggregator.
//! - [`leader`]: leader election on a Lease, so only one replica writes.
//! - [`install`]: the CRD from typed Rust (the resource types are in `iot-api`).

pub mod aggregate;
pub mod aggregator;
pub mod conditions;
pub mod controller;
pub mod gc;
pub mod install;
pub mod kv_index;
pub mod kv_plan;
pub mod leader;
pub mod metrics;
pub mod run;
pub mod status_snapshot;
pub mod status_writer;
pub mod yaml;
