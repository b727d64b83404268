//! What a `Deployment` runs, in the API's own (camelCase) spelling, and the
//! conversion to the wire payload devices read.
//!
//! The shapes mirror `harmony_reconciler_contracts::score` one to one; only field
//! names differ (`hostPort` here, `host_port` on the wire). The wire format is pinned
//! by its own snapshot tests and by the spec hash every device reports, so it does
//! not follow this spelling. `IotScore` stays an externally tagged enum, so later
//! variants (an `OkdApplyV0`, say) are additive.

use std::collections::BTreeMap;

use harmony_reconciler_contracts as wire;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What one deployment asks its devices to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum IotScore {
    /// Containers run by podman on the device.
    PodmanV0(PodmanV0Score),
}

/// A set of podman containers that together make one deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodmanV0Score {
    /// Containers to run. Names are unique within the score.
    #[schemars(length(min = 1))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub services: Vec<PodmanService>,
}

/// One container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodmanService {
    /// Service name, a DNS label, unique within the deployment.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Image reference. Must already be present on the device or pullable by it.
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[^\s]+$"))]
    pub image: String,
    /// Host ports published to the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
    /// Environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Overrides the image's entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Overrides the image's default arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// What happens when the container exits (Always, OnFailure or Never).
    #[serde(default, skip_serializing_if = "RestartPolicy::is_default")]
    pub restart_policy: RestartPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceLimits>,
}

/// Publishes `hostPort` on the device to `containerPort` in the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    #[schemars(range(min = 1, max = 65535))]
    pub host_port: u16,
    #[schemars(range(min = 1, max = 65535))]
    pub container_port: u16,
    #[serde(default, skip_serializing_if = "Protocol::is_default")]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    fn is_default(&self) -> bool {
        *self == Protocol::Tcp
    }
}

/// What happens when the container exits. The agent also restores containers that
/// are removed behind its back, whatever the policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    fn is_default(&self) -> bool {
        *self == RestartPolicy::Always
    }
}

/// Optional caps on the container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceLimits {
    /// Memory limit in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = wire::MIN_MEMORY_MIB, max = wire::MAX_MEMORY_MIB))]
    pub memory_mib: Option<u64>,
    /// CPU limit in thousandths of a core (500 = half a core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = wire::MAX_CPU_MILLICORES))]
    pub cpu_millicores: Option<u64>,
}

impl IotScore {
    /// The payload devices get.
    pub fn to_wire(&self) -> wire::IotScore {
        match self {
            IotScore::PodmanV0(p) => wire::IotScore::PodmanV0(wire::PodmanV0Score {
                services: p.services.iter().map(PodmanService::to_wire).collect(),
            }),
        }
    }

    /// The hash devices report once they run this score (the hash of the wire form).
    pub fn spec_hash(&self) -> wire::SpecHash {
        self.to_wire().spec_hash()
    }

    /// The API form of a wire score, for tools that show what a device was sent.
    pub fn from_wire(score: &wire::IotScore) -> Self {
        match score {
            wire::IotScore::PodmanV0(p) => IotScore::PodmanV0(PodmanV0Score {
                services: p.services.iter().map(PodmanService::from_wire).collect(),
            }),
        }
    }
}

impl PodmanService {
    fn to_wire(&self) -> wire::PodmanService {
        wire::PodmanService {
            name: self.name.clone(),
            image: self.image.clone(),
            ports: self
                .ports
                .iter()
                .map(|p| wire::PortMapping {
                    host_port: p.host_port,
                    container_port: p.container_port,
                    protocol: match p.protocol {
                        Protocol::Tcp => wire::Protocol::Tcp,
                        Protocol::Udp => wire::Protocol::Udp,
                    },
                })
                .collect(),
            env: self.env.clone(),
            command: self.command.clone(),
            args: self.args.clone(),
            restart_policy: match self.restart_policy {
                RestartPolicy::Always => wire::RestartPolicy::Always,
                RestartPolicy::OnFailure => wire::RestartPolicy::OnFailure,
                RestartPolicy::Never => wire::RestartPolicy::Never,
            },
            resources: self.resources.as_ref().map(|r| wire::ResourceLimits {
                memory_mib: r.memory_mib,
                cpu_millicores: r.cpu_millicores,
            }),
        }
    }

    fn from_wire(s: &wire::PodmanService) -> Self {
        Self {
            name: s.name.clone(),
            image: s.image.clone(),
            ports: s
                .ports
                .iter()
                .map(|p| PortMapping {
                    host_port: p.host_port,
                    container_port: p.container_port,
                    protocol: match p.protocol {
                        wire::Protocol::Tcp => Protocol::Tcp,
                        wire::Protocol::Udp => Protocol::Udp,
                    },
                })
                .collect(),
            env: s.env.clone(),
            command: s.command.clone(),
            args: s.args.clone(),
            restart_policy: match s.restart_policy {
                wire::RestartPolicy::Always => RestartPolicy::Always,
                wire::RestartPolicy::OnFailure => RestartPolicy::OnFailure,
                wire::RestartPolicy::Never => RestartPolicy::Never,
            },
            resources: s.resources.as_ref().map(|r| ResourceLimits {
                memory_mib: r.memory_mib,
                cpu_millicores: r.cpu_millicores,
            }),
        }
    }
}
