//! Bucket names, KV keys and the NATS subjects behind them.
//!
//! Ownership (one writer per key):
//! - `desired-state` / `<device>.<deployment>`: written only by the operator, read by
//!   the device named in the key.
//! - `agent-status` / `status.<device>`: written only by that device's agent, read by
//!   the operator and tools.

use crate::id::{DeploymentRef, Id, IdError};

/// KV bucket holding one desired-state payload per (device, deployment).
pub const DESIRED_STATE_BUCKET: &str = "desired-state";
/// KV bucket holding one `AgentStatus` per device.
pub const AGENT_STATUS_BUCKET: &str = "agent-status";

/// Key of a device's desired state for one deployment: `<device>.<ns>_<name>`.
pub fn desired_state_key(device: &Id, deployment: &DeploymentRef) -> String {
    format!("{device}.{}", deployment.to_token())
}

/// Splits a desired-state key back into device and deployment.
pub fn parse_desired_state_key(key: &str) -> Result<(Id, DeploymentRef), IdError> {
    let (device, token) = key.split_once('.').ok_or_else(|| IdError::InvalidKey {
        key: key.to_owned(),
        reason: "desired-state keys have the form <device>.<namespace>_<name>".into(),
    })?;
    if token.contains('.') {
        return Err(IdError::InvalidKey {
            key: key.to_owned(),
            reason: "desired-state keys have exactly two tokens".into(),
        });
    }
    Ok((Id::new(device)?, DeploymentRef::from_token(token)?))
}

/// Key of a device's status: `status.<device>`.
pub fn agent_status_key(device: &Id) -> String {
    format!("status.{device}")
}

pub fn parse_agent_status_key(key: &str) -> Result<Id, IdError> {
    let device = key.strip_prefix("status.").ok_or_else(|| IdError::InvalidKey {
        key: key.to_owned(),
        reason: "agent-status keys have the form status.<device>".into(),
    })?;
    Id::new(device)
}

/// The JetStream stream behind a KV bucket.
pub fn kv_stream_name(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The NATS subject a KV key is stored under.
pub fn kv_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// Subject filter matching every desired-state key of one device. A core NATS
/// subscription on it sees every put, delete and purge of that device's keys
/// without a JetStream consumer.
pub fn desired_state_device_filter(device: &Id) -> String {
    format!("$KV.{DESIRED_STATE_BUCKET}.{device}.>")
}

/// Recovers the KV key from a `$KV.<bucket>.<key>` subject.
pub fn key_from_subject<'a>(bucket: &str, subject: &'a str) -> Option<&'a str> {
    subject.strip_prefix("$KV.")?.strip_prefix(bucket)?.strip_prefix('.')
}
