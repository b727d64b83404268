//! What a device with scoped NATS permissions asks of the platform, instead of
//! touching JetStream itself.
//!
//! - **Reads.** The batched direct get cannot be scoped (its request body names the
//!   keys, and subject permissions cannot look into bodies). A device asks the read
//!   responder on `iot.desired.read.<device>`, which does the batched read and
//!   answers page by page. No JetStream consumer is involved.
//! - **Status writes.** A device never publishes to a JetStream subject either:
//!   JetStream sends its acknowledgement to whatever reply subject the publisher
//!   names, permissions do not check reply subjects, and an acknowledgement sent to
//!   `$KV.desired-state.<other device>.<key>` would be stored there. A device sends
//!   its status to `iot.status.write.<device>`; the relay writes it to
//!   `agent-status/status.<device>` and answers when the stream acknowledged it.
//!
//! Only that device may publish on its subjects, so the subject proves who asks.
//! Both services (part of the operator, any number of replicas in queue groups)
//! answer only to the device's own inbox ([`is_device_inbox`]): never to a reply
//! subject that points anywhere else.

use serde::{Deserialize, Serialize};

use crate::id::Id;

/// Subject prefix of read requests.
pub const DESIRED_READ_PREFIX: &str = "iot.desired.read";
/// Queue group of the responders.
pub const DESIRED_READ_QUEUE: &str = "iot-desired-readers";

/// Where `device` sends its read requests.
pub fn desired_read_subject(device: &Id) -> String {
    format!("{DESIRED_READ_PREFIX}.{device}")
}

/// The identity a request on `<prefix>.<id>` comes from, if `subject` is one and
/// names a valid id. Every device service's subjects have this shape.
pub fn id_under(prefix: &str, subject: &str) -> Option<Id> {
    let id = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    Id::new(id).ok()
}

/// Whether `reply` is a subject under inbox prefix `prefix` (and so an inbox of the
/// identity that owns the prefix).
pub fn is_inbox_under(prefix: &str, reply: &str) -> bool {
    reply
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.starts_with('.') && rest.len() > 1)
}

/// The device a read request is for, if the subject names a valid one.
pub fn device_of_read_subject(subject: &str) -> Option<Id> {
    id_under(DESIRED_READ_PREFIX, subject)
}

/// Subject prefix of status writes.
pub const STATUS_WRITE_PREFIX: &str = "iot.status.write";
/// Queue group of the status relays.
pub const STATUS_WRITE_QUEUE: &str = "iot-status-relays";

/// Largest status the relay accepts (a status is a few KB; the cap keeps a device
/// from filling the bucket's history with megabytes).
pub const MAX_STATUS_BYTES: usize = 256 * 1024;

/// Where `device` sends its status.
pub fn status_write_subject(device: &Id) -> String {
    format!("{STATUS_WRITE_PREFIX}.{device}")
}

/// The device a status write is for, if the subject names a valid one.
pub fn device_of_status_subject(subject: &str) -> Option<Id> {
    id_under(STATUS_WRITE_PREFIX, subject)
}

/// Whether `reply` is an inbox subject of `device` (and so safe to answer on).
pub fn is_device_inbox(device: &Id, reply: &str) -> bool {
    is_inbox_under(&device_inbox_prefix(device), reply)
}

/// The relay's answer to a status write.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusWriteAnswer {
    /// Stream sequence of the stored status; 0 when it was not stored.
    #[serde(default)]
    pub sequence: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The inbox prefix a device uses for replies: scoped subscribe permissions cannot
/// allow the shared `_INBOX.>` without letting every device read every reply.
pub fn device_inbox_prefix(device: &Id) -> String {
    format!("_INBOX_{device}")
}

/// The platform services that connect to NATS with an identity of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceRole {
    Operator,
    Viewer,
}

impl ServiceRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceRole::Operator => "operator",
            ServiceRole::Viewer => "viewer",
        }
    }
}

/// The inbox prefix of a platform service. It never starts with `_INBOX_`, so no
/// device id can name it, and it differs per role and name, so a viewer cannot read
/// the operator's replies (watch deliveries and direct-get answers carry every
/// device's desired state).
pub fn service_inbox_prefix(role: ServiceRole, name: &Id) -> String {
    format!("_SVC_INBOX.{}.{name}", role.as_str())
}

/// Whether `reply` is an inbox subject of viewer `name` (and so safe to answer on).
pub fn is_viewer_inbox(name: &Id, reply: &str) -> bool {
    is_inbox_under(&service_inbox_prefix(ServiceRole::Viewer, name), reply)
}

/// Subject prefix of a viewer's status snapshot requests: `iot.status.read.<name>`.
pub const STATUS_READ_PREFIX: &str = "iot.status.read";
/// Queue group of the snapshot responders.
pub const STATUS_READ_QUEUE: &str = "iot-status-readers";

/// Where viewer `name` asks for the fleet's status.
pub fn status_read_subject(name: &Id) -> String {
    format!("{STATUS_READ_PREFIX}.{name}")
}

/// One page request of a status snapshot: the reports stored at stream sequence
/// `fromSequence` or later.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReadRequest {
    #[serde(default)]
    pub from_sequence: u64,
}

/// One page of the fleet's latest reports, in the order NATS stored them. A device
/// that reported again while the pages were read appears again in a later page,
/// with its newer report: the last one read is the one that counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReadPage {
    #[serde(default)]
    pub records: Vec<StatusRecord>,
    /// More follow: ask again with `fromSequence` = `nextSequence`.
    #[serde(default)]
    pub more: bool,
    #[serde(default)]
    pub next_sequence: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A device's latest report, and when NATS stored it (the server's clock).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusRecord {
    pub device: Id,
    pub stored_at: chrono::DateTime<chrono::Utc>,
    pub status: crate::AgentStatus,
}

/// One page request: records with keys after `after` (all, if none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredReadRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

/// One page of the answer, keys in ascending order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredReadPage {
    #[serde(default)]
    pub records: Vec<DesiredRecord>,
    /// More records follow: ask again with `after` = the last key of this page.
    #[serde(default)]
    pub more: bool,
    /// The read failed on the responder's side; the page is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The latest record of one key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredRecord {
    pub key: String,
    /// Stream sequence of the record.
    pub revision: u64,
    /// The payload, when it is UTF-8 text (payloads are JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The payload in base64, when it is not UTF-8 (so garbage reaches the agent as
    /// garbage, and fails only its own deployment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
    /// The key's latest record is a delete or purge marker.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_name_exactly_one_device() -> Result<(), crate::IdError> {
        let d = Id::new("pi-7")?;
        assert_eq!(desired_read_subject(&d), "iot.desired.read.pi-7");
        assert_eq!(device_of_read_subject("iot.desired.read.pi-7"), Some(d.clone()));
        assert_eq!(device_of_read_subject("iot.desired.read.pi-7.x"), None);
        assert_eq!(device_of_read_subject("iot.desired.read.*"), None);
        assert_eq!(device_of_read_subject("iot.desired.readpi"), None);
        assert_eq!(device_inbox_prefix(&d), "_INBOX_pi-7");
        assert_eq!(status_write_subject(&d), "iot.status.write.pi-7");
        assert_eq!(device_of_status_subject("iot.status.write.pi-7"), Some(d.clone()));
        assert_eq!(device_of_status_subject("iot.status.write.>"), None);
        // Only the device's own inbox is ever answered.
        assert!(is_device_inbox(&d, "_INBOX_pi-7.abc.1"));
        assert!(!is_device_inbox(&d, "_INBOX_pi-7"));
        assert!(!is_device_inbox(&d, "_INBOX_pi-7x.abc"));
        assert!(!is_device_inbox(&d, "_INBOX_pi-8.abc"));
        assert!(!is_device_inbox(&d, "$KV.desired-state.pi-8.default_web"));
        // Service inboxes: no device id reaches them, and viewers are told apart.
        let dash = Id::new("dashboard")?;
        let viewer = service_inbox_prefix(ServiceRole::Viewer, &dash);
        assert_eq!(viewer, "_SVC_INBOX.viewer.dashboard");
        assert!(!viewer.starts_with("_INBOX_") && !viewer.starts_with("_INBOX."));
        assert!(is_viewer_inbox(&dash, "_SVC_INBOX.viewer.dashboard.abc.1"));
        assert!(!is_viewer_inbox(&dash, "_SVC_INBOX.viewer.dashboard"));
        assert!(!is_viewer_inbox(&dash, "_SVC_INBOX.viewer.dashboard2.x"));
        assert!(!is_viewer_inbox(&dash, "_SVC_INBOX.operator.dashboard.x"));
        assert!(!is_viewer_inbox(&dash, "$KV.desired-state.pi-8.default_web"));
        assert_eq!(status_read_subject(&dash), "iot.status.read.dashboard");
        Ok(())
    }

    #[test]
    fn status_page_shape_is_pinned() -> Result<(), serde_json::Error> {
        assert_eq!(
            serde_json::to_string(&StatusReadRequest { from_sequence: 42 })?,
            r#"{"fromSequence":42}"#
        );
        assert_eq!(
            serde_json::from_str::<StatusReadRequest>("{}")?,
            StatusReadRequest::default()
        );
        let status: crate::AgentStatus =
            serde_json::from_str(r#"{"format":1,"device_id":"pi-7","heartbeat_at":"2026-12-01T00:00:00Z"}"#)?;
        let page = StatusReadPage {
            records: vec![StatusRecord {
                device: Id::new("pi-7").map_err(serde::de::Error::custom)?,
                stored_at: "2026-12-01T00:00:01Z".parse().map_err(serde::de::Error::custom)?,
                status,
            }],
            more: true,
            next_sequence: 43,
            error: None,
        };
        let json = serde_json::to_value(&page)?;
        assert_eq!(json["records"][0]["device"], "pi-7");
        assert_eq!(json["records"][0]["storedAt"], "2026-12-01T00:00:01Z");
        assert_eq!(json["records"][0]["status"]["device_id"], "pi-7");
        assert_eq!(
            (json["more"].clone(), json["nextSequence"].clone()),
            (true.into(), 43.into())
        );
        assert_eq!(serde_json::from_value::<StatusReadPage>(json)?, page);
        Ok(())
    }

    #[test]
    fn page_shape_is_pinned() -> Result<(), serde_json::Error> {
        let page = DesiredReadPage {
            records: vec![
                DesiredRecord {
                    key: "d1.ns_web".into(),
                    revision: 7,
                    value: Some("{}".into()),
                    ..Default::default()
                },
                DesiredRecord {
                    key: "d1.ns_old".into(),
                    revision: 9,
                    deleted: true,
                    ..Default::default()
                },
            ],
            more: true,
            error: None,
        };
        let json = serde_json::to_string(&page)?;
        assert_eq!(
            json,
            r#"{"records":[{"key":"d1.ns_web","revision":7,"value":"{}"},{"key":"d1.ns_old","revision":9,"deleted":true}],"more":true}"#
        );
        assert_eq!(serde_json::from_str::<DesiredReadPage>(&json)?, page);
        assert_eq!(
            serde_json::from_str::<DesiredReadRequest>("{}")?,
            DesiredReadRequest::default()
        );
        Ok(())
    }
}

/// Subject prefix of registry pull-grant requests (`iot.registry.grant.<device>`).
///
/// A device asks before it pulls from the platform's registry. The operator, which
/// writes every device's desired state, answers with a short-lived registry token
/// for that device that allows `pull` on exactly the repositories its deployments
/// name. The device hands it to podman as the registry password; nothing
/// long-lived about the registry ever sits on the device.
pub const REGISTRY_GRANT_PREFIX: &str = "iot.registry.grant";
/// Queue group of the grant responders.
pub const REGISTRY_GRANT_QUEUE: &str = "iot-registry-granters";

/// Where `device` asks for a registry pull grant.
pub fn registry_grant_subject(device: &Id) -> String {
    format!("{REGISTRY_GRANT_PREFIX}.{device}")
}

/// The answer to a grant request (the request body is empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryGrant {
    /// The registry token, to send as the password with the device id as user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// When it expires (seconds since the epoch).
    #[serde(default)]
    pub expires_at: i64,
    /// The registries (`host:port`) the operator grants for; a pull from any other
    /// goes without the grant.
    #[serde(default)]
    pub registries: Vec<String>,
    /// `repository` names the token allows pulling.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// Why there is no token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
