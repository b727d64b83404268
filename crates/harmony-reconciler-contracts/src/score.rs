//! The desired-state payload: what a device should run for one deployment.
//!
//! `IotScore` is externally tagged (`{"PodmanV0": {...}}`) so new kinds of score are
//! additive. A reader that meets a variant it does not know gets
//! [`ScoreSlot::Unsupported`] instead of a decode error, so it can report the
//! deployment as unsupported and keep the key.
//!
//! Compatibility rule for new fields: `#[serde(default, skip_serializing_if = ...)]`,
//! so that old payloads still decode and the spec hash of an unchanged score does not
//! move when the writer is upgraded.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::hash::{SpecHash, spec_hash_of_value};
use crate::id::DeploymentRef;

/// Version of the desired-state envelope written by this crate.
pub const DESIRED_STATE_FORMAT: u32 = 1;

/// What one deployment asks a device to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum IotScore {
    /// Containers run by podman on the device.
    PodmanV0(PodmanV0Score),
}

impl IotScore {
    /// Variant names this build understands.
    pub const VARIANTS: &'static [&'static str] = &["PodmanV0"];
    /// Hash of the canonical JSON of this score. Devices report it with their phase so
    /// the operator can tell "running the current spec" from "running an old one".
    pub fn spec_hash(&self) -> SpecHash {
        // Serializing a plain data enum to a Value cannot fail.
        let value = serde_json::to_value(self).unwrap_or(Value::Null);
        spec_hash_of_value(&value)
    }
}

/// A set of podman containers that together make one deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PodmanV0Score {
    /// Containers to run. Names are unique within the score.
    #[schemars(length(min = 1))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub services: Vec<PodmanService>,
}

/// One container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
    #[serde(default, skip_serializing_if = "RestartPolicy::is_default")]
    pub restart_policy: RestartPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceLimits>,
}

/// Publishes `host_port` on the device to `container_port` in the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
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

/// Smallest memory limit podman accepts, in MiB.
pub const MIN_MEMORY_MIB: u64 = 4;
/// Largest memory limit, in MiB (1 TiB): far beyond any edge device, and small
/// enough that the byte count cannot overflow.
pub const MAX_MEMORY_MIB: u64 = 1024 * 1024;
/// Largest CPU limit, in millicores (1024 cores).
pub const MAX_CPU_MILLICORES: u64 = 1024 * 1000;

/// Optional caps on the container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ResourceLimits {
    /// Memory limit in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = MIN_MEMORY_MIB, max = MAX_MEMORY_MIB))]
    pub memory_mib: Option<u64>,
    /// CPU limit in thousandths of a core (500 = half a core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_CPU_MILLICORES))]
    pub cpu_millicores: Option<u64>,
}

/// A score as a reader sees it: one it understands, or one it must report.
#[derive(Debug, Clone, PartialEq)]
pub enum ScoreSlot {
    Known(IotScore),
    /// A variant this build does not know, kept verbatim so nothing is lost.
    Unsupported {
        variant: String,
        raw: Value,
    },
}

impl ScoreSlot {
    /// Decodes a score value. Unknown variants are not an error; a known variant with
    /// a bad body is.
    pub fn from_value(value: Value) -> Result<Self, serde_json::Error> {
        use serde::de::Error;
        let variant = match &value {
            Value::Object(map) if map.len() == 1 => map.keys().next().cloned().unwrap_or_default(),
            _ => {
                return Err(serde_json::Error::custom(
                    "score must be an object with exactly one variant key, like {\"PodmanV0\": {...}}",
                ));
            }
        };
        if IotScore::VARIANTS.contains(&variant.as_str()) {
            Ok(ScoreSlot::Known(serde_json::from_value(value)?))
        } else {
            Ok(ScoreSlot::Unsupported { variant, raw: value })
        }
    }
}

impl Serialize for ScoreSlot {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ScoreSlot::Known(score) => score.serialize(s),
            ScoreSlot::Unsupported { raw, .. } => raw.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ScoreSlot {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ScoreSlot::from_value(Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// The value stored under `desired-state/<device>.<deployment>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Envelope version; readers accept any and ignore unknown fields.
    #[serde(default = "default_format")]
    pub format: u32,
    pub deployment: DeploymentRef,
    /// Nothing else: every byte here changes only with the score, so a change to the
    /// resource that leaves a device's score alone (another device added to the
    /// targets, say) rewrites no key and wakes no agent. Payloads from older
    /// operators also carry `generation`; readers ignore it.
    pub score: ScoreSlot,
    /// The number of the `DeploymentRevision` this score belongs to (1, 2, 3 ...),
    /// which devices report back. Absent from operators that predate revisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
}

fn default_format() -> u32 {
    DESIRED_STATE_FORMAT
}

impl DesiredState {
    pub fn new(deployment: DeploymentRef, score: IotScore) -> Self {
        Self {
            format: DESIRED_STATE_FORMAT,
            deployment,
            score: ScoreSlot::Known(score),
            revision: None,
        }
    }

    /// The same payload, tagged with its revision number.
    pub fn with_revision(mut self, revision: u64) -> Self {
        self.revision = Some(revision);
        self
    }

    /// The bytes written to KV. Deterministic for equal values, which lets the
    /// operator skip writes whose bytes would not change.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A desired-state payload decoded by a reader, with the hash of its score computed
/// from the bytes as written, so that writer and reader agree on it even when their
/// versions of these types differ.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedDesiredState {
    pub state: DesiredState,
    pub spec_hash: SpecHash,
}

impl DecodedDesiredState {
    pub fn from_slice(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default = "default_format")]
            format: u32,
            deployment: DeploymentRef,
            score: Value,
            #[serde(default)]
            revision: Option<u64>,
        }
        let raw: Raw = serde_json::from_slice(bytes)?;
        let spec_hash = spec_hash_of_value(&raw.score);
        let score = ScoreSlot::from_value(raw.score)?;
        Ok(Self {
            state: DesiredState {
                format: raw.format,
                deployment: raw.deployment,
                score,
                revision: raw.revision,
            },
            spec_hash,
        })
    }
}
