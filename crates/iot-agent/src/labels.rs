//! Labels the agent puts on every container it manages. The agent only ever touches
//! containers that carry `managed-by=iot-agent` *and* its own device id, so several
//! agents (or unrelated workloads) can share one podman host.

use harmony_reconciler_contracts::{DeploymentRef, Id};

pub const MANAGED_BY: &str = "iot.nationtech.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "iot-agent";
pub const DEVICE: &str = "iot.nationtech.io/device";
pub const DEPLOYMENT: &str = "iot.nationtech.io/deployment";
pub const SERVICE: &str = "iot.nationtech.io/service";
/// Hash of the one service's spec: decides whether this container is up to date.
pub const SERVICE_HASH: &str = "iot.nationtech.io/service-hash";
/// Hash of the whole deployment score at creation time (informational).
pub const SPEC_HASH: &str = "iot.nationtech.io/spec-hash";

/// Container name: `<device>.<namespace>.<name>.<service>`. Unique per podman host
/// because device ids are unique; unambiguous because device ids, namespaces and
/// service names contain no dots. Names are for people; the agent matches labels.
pub fn container_name(device: &Id, deployment: &DeploymentRef, service: &str) -> String {
    format!("{device}.{}.{}.{service}", deployment.namespace(), deployment.name())
}
