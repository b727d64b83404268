//! Enrollment and revocation of identities (devices and platform services).
//!
//! Enrolling `<kind>-<name>` creates, in OpenBao:
//! - an approle of that name whose tokens may only fetch identity tokens;
//! - an entity of that name whose metadata (`iot_role`, `iot_name`, `device_id`) becomes the
//!   claims of every identity token it gets, linked to the approle;
//! - the enrollment record `iot/devices/<id>` or `iot/services/<name>` that the auth
//!   callout checks at every connect.
//!
//! What the identity itself receives is an [`Enrollment`]: the approle's role id and a
//! secret id. Revoking deletes all three, so the next connect is refused.
//!
//! **Enrolling again rotates everything.** The new secret id replaces every older
//! one (destroyed, so an old seed no longer logs in), and the entity is made anew:
//! its id is the `sub` of every identity token, the record names it (`subject`),
//! and the auth callout admits only tokens of that subject. OpenBao tokens the old
//! credentials logged in with are bound to the old entity, so whatever they still
//! mint is refused at connect.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::client::{Bao, BaoError, str_at};
use crate::setup::{CALLOUT_POLICY, IDENTITY_POLICY, KV_MOUNT};

/// What an identity may do on NATS; the auth callout maps each to permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Device,
    Operator,
    /// Read-only views of the fleet (the dashboard): follows device reports, writes
    /// nothing.
    Viewer,
    /// The auth callout itself: reads enrollment records, never connects to IOT.
    Callout,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Callout => "callout",
        }
    }
}

/// What an enrolled identity needs to log in: handed to it once, at provisioning.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Enrollment {
    pub bao_addr: String,
    pub name: String,
    pub role: Role,
    pub role_id: String,
    pub secret_id: String,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment")
            .field("bao_addr", &self.bao_addr)
            .field("name", &self.name)
            .field("role", &self.role)
            .field("role_id", &self.role_id)
            .field("secret_id", &"<redacted>")
            .finish()
    }
}

/// The approle / entity name of a device.
pub fn device_entity(device_id: &str) -> String {
    format!("device-{device_id}")
}

/// The approle / entity name of a service.
pub fn service_entity(name: &str) -> String {
    format!("service-{name}")
}

/// Where a device's enrollment record lives in the KV mount.
pub fn device_record_path(device_id: &str) -> String {
    format!("devices/{device_id}")
}

pub fn service_record_path(name: &str) -> String {
    format!("services/{name}")
}

/// A device's enrollment record (`iot/devices/<id>`), as the auth callout reads it.
///
/// Labels are not part of it: they are the `metadata.labels` of the device's
/// `Device` object in Kubernetes, the one place they are kept. Records written
/// before that carry a `labels` map, which readers ignore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRecord {
    pub device_id: String,
    /// The entity id identity tokens of this device carry as `sub`. Missing in
    /// records written before subjects were recorded (`iotctl bao setup` adds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// Enrolls a device: its approle, entity and enrollment record. Enrolling it again
/// rotates its credentials: every older secret id stops working, and so does every
/// token they got.
pub async fn enroll_device_identity(bao: &Bao, device_id: &str) -> Result<Enrollment, BaoError> {
    let entity = device_entity(device_id);
    let metadata = json!({"iot_role": Role::Device.as_str(), "iot_name": device_id, "device_id": device_id});
    let (role_id, secret_id, subject) = enroll_entity(bao, &entity, &metadata, IDENTITY_POLICY).await?;
    let record = DeviceRecord {
        device_id: device_id.to_owned(),
        subject: Some(subject),
    };
    let record = serde_json::to_value(&record).map_err(|e| BaoError::Shape {
        path: device_record_path(device_id),
        message: e.to_string(),
    })?;
    bao.kv_write(KV_MOUNT, &device_record_path(device_id), &record).await?;
    Ok(Enrollment {
        bao_addr: bao.addr().to_owned(),
        name: device_id.to_owned(),
        role: Role::Device,
        role_id,
        secret_id,
    })
}

/// Enrolls a platform service (the operator, the auth callout).
pub async fn enroll_service(bao: &Bao, name: &str, role: Role) -> Result<Enrollment, BaoError> {
    let entity = service_entity(name);
    let metadata = json!({"iot_role": role.as_str(), "iot_name": name, "device_id": ""});
    let policy = if role == Role::Callout {
        CALLOUT_POLICY
    } else {
        IDENTITY_POLICY
    };
    let (role_id, secret_id, subject) = enroll_entity(bao, &entity, &metadata, policy).await?;
    bao.kv_write(
        KV_MOUNT,
        &service_record_path(name),
        &json!({"name": name, "role": role.as_str(), "subject": subject}),
    )
    .await?;
    Ok(Enrollment {
        bao_addr: bao.addr().to_owned(),
        name: name.to_owned(),
        role,
        role_id,
        secret_id,
    })
}

/// Removes a device's record, approle and entity. The record goes first: from that
/// moment the auth callout refuses the device, whatever tokens it still holds.
pub async fn revoke_device(bao: &Bao, device_id: &str) -> Result<(), BaoError> {
    bao.kv_destroy(KV_MOUNT, &device_record_path(device_id)).await?;
    remove_entity(bao, &device_entity(device_id)).await
}

pub async fn revoke_service(bao: &Bao, name: &str) -> Result<(), BaoError> {
    bao.kv_destroy(KV_MOUNT, &service_record_path(name)).await?;
    remove_entity(bao, &service_entity(name)).await
}

/// Enrolled devices, from their records.
pub async fn list_devices(bao: &Bao) -> Result<Vec<String>, BaoError> {
    list_records(bao, "devices").await
}

/// Enrolled services, from their records.
pub async fn list_services(bao: &Bao) -> Result<Vec<String>, BaoError> {
    list_records(bao, "services").await
}

async fn list_records(bao: &Bao, folder: &str) -> Result<Vec<String>, BaoError> {
    list_keys(bao, &format!("{KV_MOUNT}/metadata/{folder}")).await
}

/// The keys a `LIST` of `path` returns; none when the path does not exist.
async fn list_keys(bao: &Bao, path: &str) -> Result<Vec<String>, BaoError> {
    let list = hyper::Method::from_bytes(b"LIST").map_err(|e| BaoError::Shape {
        path: "LIST".into(),
        message: e.to_string(),
    })?;
    match bao.call(list, path, None).await {
        Ok(v) => Ok(v
            .pointer("/data/keys")
            .and_then(Value::as_array)
            .map(|keys| keys.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default()),
        Err(e) if e.is_not_found() => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Creates or rotates the approle and entity `name`; returns (role id, the one
/// valid secret id, the entity id that identity tokens carry as `sub`).
async fn enroll_entity(
    bao: &Bao,
    name: &str,
    metadata: &Value,
    policy: &str,
) -> Result<(String, String, String), BaoError> {
    bao.post(
        &format!("auth/approle/role/{name}"),
        &json!({"token_policies": [policy], "token_ttl": "1h", "token_max_ttl": "24h", "secret_id_ttl": 0, "token_type": "service"}),
    )
    .await?;
    let path = format!("auth/approle/role/{name}/role-id");
    let role_id = str_at(&bao.get(&path).await?, "/data/role_id", &path)?;
    let older = secret_id_accessors(bao, name).await?;
    let path = format!("auth/approle/role/{name}/secret-id");
    let issued = bao.post(&path, &json!({})).await?;
    let secret_id = str_at(&issued, "/data/secret_id", &path)?;
    let accessor = str_at(&issued, "/data/secret_id_accessor", &path)?;
    for old in older.iter().filter(|a| **a != accessor) {
        bao.post(
            &format!("auth/approle/role/{name}/secret-id-accessor/destroy"),
            &json!({"secret_id_accessor": old}),
        )
        .await?;
    }
    // A new entity, so a new `sub`: tokens of the old one are refused at connect.
    match bao.delete(&format!("identity/entity/name/{name}")).await {
        Ok(_) => {}
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e),
    }
    bao.post(&format!("identity/entity/name/{name}"), &json!({"metadata": metadata}))
        .await?;
    let path = format!("identity/entity/name/{name}");
    let entity_id = str_at(&bao.get(&path).await?, "/data/id", &path)?;
    let mount = approle_accessor(bao).await?;
    bao.post(
        "identity/entity-alias",
        &json!({"name": role_id, "canonical_id": entity_id, "mount_accessor": mount}),
    )
    .await?;
    Ok((role_id, secret_id, entity_id))
}

/// The accessors of an approle's secret ids (none for a new role).
async fn secret_id_accessors(bao: &Bao, name: &str) -> Result<Vec<String>, BaoError> {
    list_keys(bao, &format!("auth/approle/role/{name}/secret-id")).await
}

/// The entity id of `name`, if it exists: what older records lack (see
/// [`crate::setup::configure`], which records it).
pub async fn entity_id(bao: &Bao, name: &str) -> Result<Option<String>, BaoError> {
    let path = format!("identity/entity/name/{name}");
    match bao.get(&path).await {
        Ok(v) => Ok(v.pointer("/data/id").and_then(Value::as_str).map(str::to_owned)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

async fn remove_entity(bao: &Bao, name: &str) -> Result<(), BaoError> {
    for path in [
        format!("auth/approle/role/{name}"),
        format!("identity/entity/name/{name}"),
    ] {
        match bao.delete(&path).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn approle_accessor(bao: &Bao) -> Result<String, BaoError> {
    let v = bao.get("sys/auth").await?;
    v.pointer("/data/approle~1/accessor")
        .or_else(|| v.pointer("/approle~1/accessor"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| BaoError::Shape {
            path: "sys/auth".into(),
            message: "approle is not enabled (run the setup first)".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_carry_no_labels_and_old_ones_still_read() -> Result<(), serde_json::Error> {
        let new = serde_json::to_value(DeviceRecord {
            device_id: "pi-1".into(),
            subject: Some("e-1".into()),
        })?;
        assert_eq!(new, json!({"deviceId": "pi-1", "subject": "e-1"}));
        // Written by an older iotctl, with labels (and, older still, no subject).
        let old: DeviceRecord =
            serde_json::from_value(json!({"deviceId": "pi-2", "labels": {"site": "lab"}, "subject": "e-2"}))?;
        assert_eq!(old.device_id, "pi-2");
        assert_eq!(old.subject.as_deref(), Some("e-2"));
        let oldest: DeviceRecord = serde_json::from_value(json!({"deviceId": "pi-3", "labels": {}}))?;
        assert_eq!(oldest.subject, None);
        Ok(())
    }
}
