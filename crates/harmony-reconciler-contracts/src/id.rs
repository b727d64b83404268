//! Identifiers that appear inside NATS subjects and KV keys.
//!
//! Every identifier here ends up as (part of) a single NATS subject token, so it is
//! validated on construction: a value of these types can always be put into a key
//! without escaping, and two different values never map to the same token.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest device id we accept. Keeps subjects, container names and labels short.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// Regex (for CRD schemas and docs) that a device id must match.
pub const DEVICE_ID_PATTERN: &str = "^[A-Za-z0-9_-]{1,64}$";

/// Why an identifier or key was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("invalid device id {id:?}: {reason} (allowed: 1-{MAX_DEVICE_ID_LEN} characters of A-Z a-z 0-9 _ -)")]
    InvalidDeviceId { id: String, reason: &'static str },
    #[error("invalid namespace {value:?}: {reason} (must be a DNS-1123 label)")]
    InvalidNamespace { value: String, reason: &'static str },
    #[error("invalid deployment name {value:?}: {reason} (must be a DNS-1123 subdomain)")]
    InvalidName { value: String, reason: &'static str },
    #[error("invalid deployment reference {value:?}: expected <namespace>/<name>")]
    InvalidRef { value: String },
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },
}

/// A device identifier: one NATS subject token made only of `A-Z a-z 0-9 _ -`.
///
/// This is a deliberate subset of what NATS allows in a token (no `.`, `*`, `>`,
/// whitespace, `=` or `/`), so the same id is also safe in podman container names,
/// label values and file names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
#[schemars(transparent)]
pub struct Id(#[schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,64}$"))] String);

impl Id {
    pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
        let id = id.into();
        let reason = if id.is_empty() {
            Some("must not be empty")
        } else if id.len() > MAX_DEVICE_ID_LEN {
            Some("too long")
        } else if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            Some("contains a character that is not allowed in a NATS subject token")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(IdError::InvalidDeviceId { id, reason }),
            None => Ok(Self(id)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Id {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Id::new(s).map_err(serde::de::Error::custom)
    }
}

/// A `Deployment` resource: namespace plus name. Serialized as `"<namespace>/<name>"`.
///
/// Its KV token is `<namespace>_<name>` with every `.` of the name written as `=`.
/// Namespaces (DNS labels) never contain `_`, and names (DNS subdomains) never
/// contain `_` or `=`, so the mapping is one-to-one: `a/web` and `b/web` get
/// different tokens, and a token decodes back to exactly one resource.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeploymentRef {
    namespace: String,
    name: String,
}

impl DeploymentRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Result<Self, IdError> {
        let namespace = namespace.into();
        let name = name.into();
        if let Some(reason) = dns_label_problem(&namespace) {
            return Err(IdError::InvalidNamespace {
                value: namespace,
                reason,
            });
        }
        if let Some(reason) = dns_subdomain_problem(&name) {
            return Err(IdError::InvalidName { value: name, reason });
        }
        Ok(Self { namespace, name })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The single NATS token used for this deployment inside desired-state keys.
    pub fn to_token(&self) -> String {
        format!("{}_{}", self.namespace, self.name.replace('.', "="))
    }

    pub fn from_token(token: &str) -> Result<Self, IdError> {
        let (ns, name) = token.split_once('_').ok_or_else(|| IdError::InvalidKey {
            key: token.to_owned(),
            reason: "deployment token must be <namespace>_<name>".into(),
        })?;
        Self::new(ns, name.replace('=', "."))
    }
}

impl fmt::Display for DeploymentRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for DeploymentRef {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ns, name) = s
            .split_once('/')
            .ok_or_else(|| IdError::InvalidRef { value: s.to_owned() })?;
        Self::new(ns, name)
    }
}

impl Serialize for DeploymentRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeploymentRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for DeploymentRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "DeploymentRef".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A Deployment resource as <namespace>/<name>"
        })
    }
}

/// Why `id` cannot be enrolled as a new device, or `None` if it can.
///
/// New devices get ids that are also valid Kubernetes object names (the `Device`
/// resource is named by its id) and NATS subject tokens: a DNS-1123 label, at most
/// 63 lowercase letters, digits and '-'. [`Id::new`] stays more permissive so that
/// ids enrolled before this rule keep working in `targetDevices`.
pub fn enrollable_device_id_problem(id: &str) -> Option<String> {
    dns_label_problem(id).map(|reason| {
        format!(
            "device id {id:?} cannot be enrolled: {reason}. A device id is also the name of its \
             Kubernetes Device resource, so it must be a DNS-1123 label: 1-63 lowercase letters, \
             digits and '-', starting and ending with a letter or digit (for example \"pi-kitchen-01\")"
        )
    })
}

/// `None` if `s` is a valid DNS-1123 label, else why not.
pub fn dns_label_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        return Some("must not be empty");
    }
    if s.len() > 63 {
        return Some("must be at most 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Some(
            "may contain only lowercase letters, \
             digits and '-'",
        );
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Some("must start and end with a letter or digit");
    }
    None
}

/// `None` if `s` is a valid DNS-1123 subdomain, else why not.
pub fn dns_subdomain_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        return Some("must not be empty");
    }
    if s.len() > 253 {
        return Some("must be at most 253 characters");
    }
    for part in s.split('.') {
        if part.is_empty() {
            return Some("must not contain empty '.'-separated parts");
        }
        if let Some(reason) = dns_label_problem(part) {
            return Some(reason);
        }
    }
    None
}
