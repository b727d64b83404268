//! `Device` objects in Kubernetes: the fleet's registry, and the one place a
//! device's labels are kept (OpenBao holds only its identity).

use std::collections::BTreeMap;

use iot_api::{Device, DeviceSpec, REVOKED_ANNOTATION};
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::{k8s, out};

/// The field manager iotctl's writes are recorded under.
const FIELD_MANAGER: &str = "iotctl";

/// What `register` found and did.
pub enum Registered {
    /// There was no Device object: it was created with the given labels.
    Created(Device),
    /// There was one: it was kept, with the given labels merged into its own.
    Existing {
        device: Device,
        /// Some given label was missing or had another value.
        labels_merged: bool,
        /// It was marked revoked (at this time): the mark was removed, since the
        /// device is enrolled again.
        unrevoked: Option<String>,
    },
}

/// Creates the Device `id` with `labels`, or, if it exists, merges `labels` into
/// its own and removes a revoked mark (a JSON merge patch: labels not given stay).
pub async fn register(
    client: &kube::Client,
    id: &str,
    labels: &BTreeMap<String, String>,
) -> anyhow::Result<Registered> {
    let api: Api<Device> = Api::all(client.clone());
    let new = Device {
        metadata: ObjectMeta {
            name: Some(id.to_owned()),
            labels: (!labels.is_empty()).then(|| labels.clone()),
            ..Default::default()
        },
        spec: DeviceSpec::default(),
        status: None,
    };
    let post = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    // Created and deleted by others in between: a few rounds settle it.
    for _ in 0..3 {
        match api.create(&post, &new).await {
            Ok(d) => return Ok(Registered::Created(d)),
            Err(kube::Error::Api(s)) if s.is_already_exists() => {}
            Err(e) => anyhow::bail!("cannot create Device {id}: {}", explain(&e)),
        }
        let existing = api
            .get_opt(id)
            .await
            .map_err(|e| anyhow::anyhow!("cannot read Device {id}: {}", explain(&e)))?;
        let Some(existing) = existing else {
            continue;
        };
        let labels_merged = labels.iter().any(|(k, v)| existing.label_map().get(k) != Some(v));
        let unrevoked = existing.revoked_at().map(str::to_owned);
        if !labels_merged && unrevoked.is_none() {
            return Ok(Registered::Existing {
                device: existing,
                labels_merged,
                unrevoked,
            });
        }
        let mut metadata = serde_json::Map::new();
        if labels_merged {
            metadata.insert("labels".into(), json!(labels));
        }
        if unrevoked.is_some() {
            metadata.insert("annotations".into(), json!({ REVOKED_ANNOTATION: null }));
        }
        let patch = json!({ "metadata": metadata });
        match api.patch(id, &patch_params(), &Patch::Merge(&patch)).await {
            Ok(device) => {
                return Ok(Registered::Existing {
                    device,
                    labels_merged,
                    unrevoked,
                });
            }
            Err(e) if k8s::is_missing_object(&e) => {}
            Err(e) => anyhow::bail!("cannot update Device {id}: {}", explain(&e)),
        }
    }
    anyhow::bail!("Device {id} kept being created and deleted by someone else while iotctl wrote it")
}

/// Annotates the Device `id` with [`REVOKED_ANNOTATION`] = `at` (a JSON merge patch;
/// the object is kept). `None`: there is no Device object of that name.
pub async fn mark_revoked(client: &kube::Client, id: &str, at: &str) -> anyhow::Result<Option<Device>> {
    let api: Api<Device> = Api::all(client.clone());
    let patch = json!({"metadata": {"annotations": { REVOKED_ANNOTATION: at }}});
    match api.patch(id, &patch_params(), &Patch::Merge(&patch)).await {
        Ok(d) => Ok(Some(d)),
        Err(e) if k8s::is_missing_object(&e) => Ok(None),
        Err(e) => anyhow::bail!("cannot mark Device {id} revoked: {}", explain(&e)),
    }
}

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// Every Device object, by name.
pub async fn all(client: &kube::Client) -> anyhow::Result<BTreeMap<String, Device>> {
    let api: Api<Device> = Api::all(client.clone());
    let list = api
        .list(&Default::default())
        .await
        .map_err(|e| anyhow::anyhow!("cannot list Device objects: {}", explain(&e)))?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|d| Some((d.metadata.name.clone()?, d)))
        .collect())
}

/// [`all`] when Kubernetes is configured and answers. When it is configured but
/// fails, says so on stderr and returns `None`, so a command that can do without
/// (`iotctl devices`, `iotctl device list`) still shows what it has.
pub async fn optional_all() -> Option<BTreeMap<String, Device>> {
    let read = async {
        match k8s::configured().await? {
            None => Ok(None),
            Some(client) => all(&client).await.map(Some),
        }
    };
    let limit = std::time::Duration::from_secs(15);
    let result = match tokio::time::timeout(limit, read).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!(
            "no answer from the Kubernetes API server within {limit:?}"
        )),
    };
    match result {
        Ok(devices) => devices,
        Err(e) => {
            out::warn(&format!("iotctl: Device objects not shown: {}", crate::error_line(&e)));
            None
        }
    }
}

/// A Kubernetes error about Device objects, with what to do when the CRD is missing.
pub fn explain(e: &kube::Error) -> String {
    if k8s::is_missing_kind(e) {
        "the Device CRD is not installed (run `iot-operator install`)".into()
    } else {
        k8s::describe(e)
    }
}

/// Whether a device is in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    /// It has a Device object.
    Registered,
    /// It has none: no Deployment selects it by label.
    Unregistered,
    /// Its Device object carries the revoked mark.
    Revoked,
}

impl Registration {
    pub fn of(devices: &BTreeMap<String, Device>, id: &str) -> Self {
        match devices.get(id) {
            None => Registration::Unregistered,
            Some(d) if d.revoked_at().is_some() => Registration::Revoked,
            Some(_) => Registration::Registered,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Registration::Registered => "registered",
            Registration::Unregistered => "unregistered",
            Registration::Revoked => "revoked",
        }
    }
}

/// Labels as `k=v,k=v` (`-` for none).
pub fn labels_text(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str, revoked: bool) -> Device {
        let mut d = Device::new(name, DeviceSpec::default());
        if revoked {
            d.metadata.annotations = Some([(REVOKED_ANNOTATION.to_owned(), "2026-01-01T00:00:00Z".to_owned())].into());
        }
        d
    }

    #[test]
    fn registration_of_a_device() {
        let devices: BTreeMap<String, Device> = [("a", false), ("b", true)]
            .into_iter()
            .map(|(n, r)| (n.to_owned(), device(n, r)))
            .collect();
        assert_eq!(Registration::of(&devices, "a"), Registration::Registered);
        assert_eq!(Registration::of(&devices, "b"), Registration::Revoked);
        assert_eq!(Registration::of(&devices, "c"), Registration::Unregistered);
        assert_eq!(serde_json::json!(Registration::Revoked), "revoked");
    }

    #[test]
    fn labels_as_text() {
        assert_eq!(labels_text(&BTreeMap::new()), "-");
        let l: BTreeMap<String, String> = [("site", "lab"), ("ring", "canary")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(labels_text(&l), "ring=canary,site=lab");
    }
}
