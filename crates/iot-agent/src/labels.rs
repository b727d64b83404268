//! Labels the agent puts on every container it manages. The agent only ever touches
//! containers that carry `managed-by=iot-agent` *and* its own device id, so several
//! agents (or unrelated workloads) can share one podman host.

use harmony_reconciler_contracts::{DeploymentRef, Id, SpecHash};

pub const MANAGED_BY: &str = "iot.nationtech.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "iot-agent";
pub const DEVICE: &str = "iot.nationtech.io/device";
pub const DEPLOYMENT: &str = "iot.nationtech.io/deployment";
pub const SERVICE: &str = "iot.nationtech.io/service";
/// Hash of the one service's spec: decides whether this container is up to date.
pub const SERVICE_HASH: &str = "iot.nationtech.io/service-hash";
/// Hash of the whole deployment score at creation time (informational).
pub const SPEC_HASH: &str = "iot.nationtech.io/spec-hash";
/// The number of the `DeploymentRevision` the container was created for (absent
/// when the desired state carried none). Read back after an agent restart: it is
/// how the agent knows which revision an older container that still serves runs.
pub const REVISION: &str = "iot.nationtech.io/revision";
/// The image id of the container this one replaced, set when the replacement is
/// created: the previous version, which image pruning keeps.
pub const PREVIOUS_IMAGE: &str = "iot.nationtech.io/previous-image";

/// The labels Kubernetes users know, so tools that group by them work on devices too.
pub const K8S_NAME: &str = "app.kubernetes.io/name";
/// `<namespace>_<name>`: unique across namespaces.
pub const K8S_INSTANCE: &str = "app.kubernetes.io/instance";
pub const K8S_COMPONENT: &str = "app.kubernetes.io/component";
pub const K8S_MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// Container name: `<device>.<namespace>.<name>.<service>.<first 8 of the service
/// hash>`. Unique per podman host because device ids are unique; the hash suffix lets
/// an upgrade create the new container next to the old one before it removes the
/// old. Names are for people; the agent matches labels.
pub fn container_name(device: &Id, deployment: &DeploymentRef, service: &str, service_hash: &SpecHash) -> String {
    let hash = service_hash.as_str();
    let short = hash.get(..8).unwrap_or(hash);
    format!(
        "{device}.{}.{}.{service}.{short}",
        deployment.namespace(),
        deployment.name()
    )
}
