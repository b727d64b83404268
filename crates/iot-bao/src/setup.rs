//! Sets up a fresh OpenBao for the platform, idempotently: what `scripts/up.sh`
//! and the tests run once, with a root (or equally privileged) token.

use serde_json::{Value, json};

use crate::client::{Bao, BaoError, str_at};

/// KV v2 mount holding enrollment records (`devices/<id>`, `services/<name>`).
pub const KV_MOUNT: &str = "iot";
/// The OIDC key that signs identity tokens, and the role that issues them.
pub const TOKEN_KEY: &str = "iot-nats";
pub const TOKEN_ROLE: &str = "iot-nats";
/// The audience (`aud`) of identity tokens meant for NATS.
pub const TOKEN_AUDIENCE: &str = "iot-nats";
/// Lifetime of an identity token.
pub const TOKEN_TTL: &str = "15m";
/// Policy of every enrolled identity: fetch its own identity token, nothing else.
pub const IDENTITY_POLICY: &str = "iot-identity";
/// Policy of the auth callout: read enrollment records.
pub const CALLOUT_POLICY: &str = "iot-callout";

/// Claims every identity token carries, from the entity that enrollment created.
/// Entity metadata is writable only by administrators, so a device cannot change
/// its own `device_id`.
const TOKEN_TEMPLATE: &str = r#"{"device_id": {{identity.entity.metadata.device_id}}, "iot_role": {{identity.entity.metadata.iot_role}}, "iot_name": {{identity.entity.metadata.iot_name}}}"#;

/// The issuer URL identity tokens carry (OpenBao's default for the root namespace).
pub fn issuer_url(addr: &str) -> String {
    format!("{}/v1/identity/oidc", addr.trim_end_matches('/'))
}

/// Initialises a new OpenBao with one unseal key; returns (unseal key, root token).
/// Real deployments use more shares and an auto-unseal; one key keeps a development
/// stack restartable by a script.
pub async fn init(bao: &Bao) -> Result<(String, String), BaoError> {
    let path = "sys/init";
    let v = bao
        .call(
            hyper::Method::PUT,
            path,
            Some(&json!({"secret_shares": 1, "secret_threshold": 1})),
        )
        .await?;
    let key = v
        .pointer("/keys_base64/0")
        .and_then(Value::as_str)
        .ok_or_else(|| BaoError::Shape {
            path: path.into(),
            message: "no keys_base64".into(),
        })?
        .to_owned();
    Ok((key, str_at(&v, "/root_token", path)?))
}

pub async fn is_initialized(bao: &Bao) -> Result<bool, BaoError> {
    let v = bao.get("sys/init").await?;
    Ok(v.get("initialized").and_then(Value::as_bool).unwrap_or(false))
}

pub async fn unseal(bao: &Bao, key: &str) -> Result<(), BaoError> {
    let v = bao
        .call(hyper::Method::PUT, "sys/unseal", Some(&json!({"key": key})))
        .await?;
    if v.get("sealed").and_then(Value::as_bool) == Some(false) {
        Ok(())
    } else {
        Err(BaoError::Shape {
            path: "sys/unseal".into(),
            message: "still sealed after the unseal key".into(),
        })
    }
}

/// Mounts, the signing key, the token role and the policies; and the subjects of
/// older enrollment records ([`record_subjects`]).
pub async fn configure(bao: &Bao) -> Result<(), BaoError> {
    let mounts = bao.get("sys/mounts").await?;
    if mounts.pointer(&format!("/data/{KV_MOUNT}~1")).is_none() && mounts.get(format!("{KV_MOUNT}/")).is_none() {
        bao.post(
            &format!("sys/mounts/{KV_MOUNT}"),
            &json!({"type": "kv", "options": {"version": "2"}}),
        )
        .await?;
    }
    let auths = bao.get("sys/auth").await?;
    if auths.pointer("/data/approle~1").is_none() && auths.get("approle/").is_none() {
        bao.post("sys/auth/approle", &json!({"type": "approle"})).await?;
    }
    bao.post(
        &format!("identity/oidc/key/{TOKEN_KEY}"),
        &json!({"algorithm": "EdDSA", "rotation_period": "24h", "verification_ttl": "48h", "allowed_client_ids": "*"}),
    )
    .await?;
    bao.post(
        &format!("identity/oidc/role/{TOKEN_ROLE}"),
        &json!({"key": TOKEN_KEY, "ttl": TOKEN_TTL, "client_id": TOKEN_AUDIENCE, "template": TOKEN_TEMPLATE}),
    )
    .await?;
    put_policy(
        bao,
        IDENTITY_POLICY,
        &format!("path \"identity/oidc/token/{TOKEN_ROLE}\" {{ capabilities = [\"read\"] }}\n"),
    )
    .await?;
    put_policy(
        bao,
        CALLOUT_POLICY,
        &format!(
            "path \"{KV_MOUNT}/data/devices/*\" {{ capabilities = [\"read\"] }}\n\
             path \"{KV_MOUNT}/data/services/*\" {{ capabilities = [\"read\"] }}\n\
             path \"{KV_MOUNT}/metadata/devices\" {{ capabilities = [\"list\"] }}\n\
             path \"{KV_MOUNT}/metadata/services\" {{ capabilities = [\"list\"] }}\n\
             path \"identity/oidc/token/{TOKEN_ROLE}\" {{ capabilities = [\"read\"] }}\n"
        ),
    )
    .await?;
    record_subjects(bao).await?;
    Ok(())
}

/// Records the entity id (`subject`) in enrollment records written before records
/// carried it; returns how many it updated. The auth callout refuses a record
/// without one, since it cannot tell whose tokens it vouches for.
pub async fn record_subjects(bao: &Bao) -> Result<usize, BaoError> {
    use crate::enroll::{
        device_entity, device_record_path, entity_id, list_devices, list_services, service_entity, service_record_path,
    };
    let mut updated = 0;
    let devices = list_devices(bao).await?;
    let services = list_services(bao).await?;
    let all = devices
        .iter()
        .map(|d| (device_record_path(d), device_entity(d)))
        .chain(services.iter().map(|s| (service_record_path(s), service_entity(s))));
    for (path, entity) in all {
        let Some(mut record) = bao.kv_read(KV_MOUNT, &path).await? else {
            continue;
        };
        if record.get("subject").and_then(Value::as_str).is_some() {
            continue;
        }
        let Some(subject) = entity_id(bao, &entity).await? else {
            tracing::warn!(record = %path, "no entity for this enrollment record; enroll it again");
            continue;
        };
        record["subject"] = json!(subject);
        bao.kv_write(KV_MOUNT, &path, &record).await?;
        updated += 1;
    }
    Ok(updated)
}

pub(crate) async fn put_policy(bao: &Bao, name: &str, hcl: &str) -> Result<(), BaoError> {
    bao.call(
        hyper::Method::PUT,
        &format!("sys/policies/acl/{name}"),
        Some(&json!({"policy": hcl})),
    )
    .await
    .map(|_| ())
}
