//! Who a verified token speaks for.
//!
//! Claim shapes differ between issuers, and we accept the common ones:
//! - OpenBao identity tokens (what `iotctl device enroll` sets up) carry flat claims
//!   from the entity's metadata: `iot_role`, `iot_name`, `device_id`;
//! - Zitadel puts project roles in `urn:zitadel:iam:org:project:roles` (an object of
//!   role → organisations) or, per project, `urn:zitadel:iam:org:project:<id>:roles`;
//! - other issuers (or a Zitadel Action) emit a flat `groups` or `roles` array.
//!
//! A role is either the `iot_role` claim or one of the role names `iot-device` /
//! `iot-operator` in any of those places.

use harmony_reconciler_contracts::Id;
use serde_json::Value;

/// A platform identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Device(Id),
    /// The operator (and its aggregator): writes desired state, reads status.
    Operator(Id),
    /// A read-only service (the dashboard): reads the fleet's reports.
    Viewer(Id),
}

impl Identity {
    /// Name for logs and the NATS user name.
    pub fn name(&self) -> String {
        match self {
            Identity::Device(id) => format!("device-{id}"),
            Identity::Operator(n) | Identity::Viewer(n) => format!("service-{n}"),
        }
    }
}

/// Which claims carry the names.
#[derive(Debug, Clone)]
pub struct ClaimMapping {
    /// The claim holding a device's id.
    pub device_id_claim: String,
    /// The claim holding a service's name.
    pub name_claim: String,
}

impl Default for ClaimMapping {
    fn default() -> Self {
        Self {
            device_id_claim: "device_id".into(),
            name_claim: "iot_name".into(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("token carries no platform role (iot_role claim, or iot-device/iot-operator in its roles)")]
    NoRole,
    #[error("token has role {0:?}, which may not connect")]
    UnknownRole(String),
    #[error("device token without a valid {claim:?} claim: {why}")]
    DeviceId { claim: String, why: String },
    #[error("service token without a valid {claim:?} claim: {why}")]
    ServiceName { claim: String, why: String },
}

pub fn identity_from_claims(claims: &Value, mapping: &ClaimMapping) -> Result<Identity, IdentityError> {
    let role = role_of(claims).ok_or(IdentityError::NoRole)?;
    match role.as_str() {
        "device" => {
            let raw = claims
                .get(&mapping.device_id_claim)
                .and_then(Value::as_str)
                .unwrap_or_default();
            let id = Id::new(raw).map_err(|e| IdentityError::DeviceId {
                claim: mapping.device_id_claim.clone(),
                why: e.to_string(),
            })?;
            Ok(Identity::Device(id))
        }
        role @ ("operator" | "viewer") => {
            // The name becomes a subject token and an inbox prefix: the same rules as
            // a device id.
            let raw = claims
                .get(&mapping.name_claim)
                .and_then(Value::as_str)
                .unwrap_or_default();
            let name = Id::new(raw).map_err(|e| IdentityError::ServiceName {
                claim: mapping.name_claim.clone(),
                why: e.to_string(),
            })?;
            Ok(if role == "operator" {
                Identity::Operator(name)
            } else {
                Identity::Viewer(name)
            })
        }
        other => Err(IdentityError::UnknownRole(other.to_owned())),
    }
}

fn role_of(claims: &Value) -> Option<String> {
    if let Some(r) = claims.get("iot_role").and_then(Value::as_str).filter(|r| !r.is_empty()) {
        return Some(r.to_owned());
    }
    let mut names: Vec<&str> = Vec::new();
    for key in ["groups", "roles"] {
        if let Some(a) = claims.get(key).and_then(Value::as_array) {
            names.extend(a.iter().filter_map(Value::as_str));
        }
    }
    if let Some(obj) = claims.as_object() {
        for (k, v) in obj {
            let zitadel = k == "urn:zitadel:iam:org:project:roles"
                || (k.starts_with("urn:zitadel:iam:org:project:") && k.ends_with(":roles"));
            if zitadel && let Some(roles) = v.as_object() {
                names.extend(roles.keys().map(String::as_str));
            }
        }
    }
    // A token with both is a device: the narrower permissions win.
    if names.contains(&"iot-device") {
        Some("device".into())
    } else if names.contains(&"iot-viewer") {
        Some("viewer".into())
    } else if names.contains(&"iot-operator") {
        Some("operator".into())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn id(claims: Value) -> Result<Identity, IdentityError> {
        identity_from_claims(&claims, &ClaimMapping::default())
    }

    #[test]
    fn openbao_claims_map_to_devices_and_services() -> Result<(), Box<dyn std::error::Error>> {
        assert_eq!(
            id(json!({"iot_role": "device", "device_id": "pi-7", "iot_name": "pi-7"}))?,
            Identity::Device(Id::new("pi-7")?)
        );
        assert_eq!(
            id(json!({"iot_role": "operator", "device_id": "", "iot_name": "operator"}))?,
            Identity::Operator(Id::new("operator")?)
        );
        Ok(())
    }

    #[test]
    fn zitadel_and_flat_role_shapes_are_understood() -> Result<(), Box<dyn std::error::Error>> {
        let nested = json!({"urn:zitadel:iam:org:project:roles": {"iot-device": {"123": "acme.zitadel.cloud"}}, "device_id": "d1"});
        assert_eq!(id(nested)?, Identity::Device(Id::new("d1")?));
        let per_project = json!({"urn:zitadel:iam:org:project:9876:roles": {"iot-operator": {}}, "iot_name": "op"});
        assert_eq!(id(per_project)?, Identity::Operator(Id::new("op")?));
        assert_eq!(
            id(json!({"iot_role": "viewer", "iot_name": "dashboard"}))?,
            Identity::Viewer(Id::new("dashboard")?)
        );
        let flat = json!({"groups": ["staff", "iot-device"], "device_id": "d2"});
        assert_eq!(id(flat)?, Identity::Device(Id::new("d2")?));
        Ok(())
    }

    #[test]
    fn tokens_without_a_usable_identity_are_refused() {
        assert_eq!(id(json!({"sub": "x"})), Err(IdentityError::NoRole));
        assert_eq!(
            id(json!({"iot_role": "admin"})),
            Err(IdentityError::UnknownRole("admin".into()))
        );
        assert!(matches!(
            id(json!({"iot_role": "device", "device_id": "a.b"})),
            Err(IdentityError::DeviceId { .. })
        ));
        assert!(matches!(
            id(json!({"iot_role": "device", "device_id": ">"})),
            Err(IdentityError::DeviceId { .. })
        ));
        for bad in ["", "dash.board", "_INBOX.>", "a b"] {
            assert!(
                matches!(
                    id(json!({"iot_role": "viewer", "iot_name": bad})),
                    Err(IdentityError::ServiceName { ref claim, .. }) if claim == "iot_name"
                ),
                "{bad:?}"
            );
        }
    }
}
