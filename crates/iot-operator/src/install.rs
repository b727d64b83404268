//! Installs the CRDs from the typed Rust definitions (no YAML) and waits until the
//! API server reports them Established.

use std::time::Duration;

use iot_api::{Deployment, DeploymentRevision, DeploymentSpec, Device, labels};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, CustomResourceExt};

/// Every CRD of the `iot.nationtech.io` group, with the well-known labels:
/// `Deployment`, `Device` and `DeploymentRevision`.
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut deployment = Deployment::crd();
    add_one_target_rule(&mut deployment);
    let mut all = vec![deployment, Device::crd(), DeploymentRevision::crd()];
    for crd in &mut all {
        crd.metadata.labels = Some(
            [
                (labels::PART_OF, labels::PLATFORM),
                (labels::NAME, "iot-operator"),
                (labels::COMPONENT, "crd"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        );
    }
    all
}

/// The `Deployment` CRD alone.
pub fn crd() -> CustomResourceDefinition {
    crds().swap_remove(0)
}

/// A Deployment names `targetDevices` or a `selector`, exactly one. The rule is
/// added to the generated schema here because the schema generator folds the
/// properties of `oneOf` branches into the object, which would lose it.
fn add_one_target_rule(crd: &mut CustomResourceDefinition) {
    for version in &mut crd.spec.versions {
        let spec = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .and_then(|s| s.properties.as_mut())
            .and_then(|p| p.get_mut("spec"));
        if let Some(spec) = spec
            && let Ok(rule) = serde_json::from_value(DeploymentSpec::one_target_rule())
        {
            spec.one_of = Some(rule);
            // A batch waits for a person or for its bake time, not both.
            let batch = spec
                .properties
                .as_mut()
                .and_then(|p| p.get_mut("rollout"))
                .and_then(|r| r.properties.as_mut())
                .and_then(|p| p.get_mut("batches"))
                .and_then(|b| b.items.as_mut());
            if let Some(
                k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(
                    item,
                ),
            ) = batch
                && let Ok(rule) = serde_json::from_value(serde_json::json!({"required": ["pause", "bakeTime"]}))
            {
                item.not = Some(Box::new(rule));
            }
        }
    }
}

pub async fn install_crd(client: kube::Client, timeout: Duration) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let crds = crds();
    for crd in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &PatchParams::apply("iot-operator").force(), &Patch::Apply(crd))
            .await
            .map_err(|e| anyhow::anyhow!("applying CRD {name}: {e}"))?;
        tracing::info!(crd = %name, "CRD applied");
    }
    for crd in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        tokio::time::timeout(
            timeout,
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("CRD {name} not Established within {timeout:?}"))?
        .map_err(|e| anyhow::anyhow!("waiting for CRD {name}: {e}"))?;
        tracing::info!(crd = %name, "CRD Established");
    }
    Ok(())
}

/// The CRDs as one multi-document YAML (generated at build time, never at runtime).
pub fn crd_yaml() -> anyhow::Result<String> {
    documents(crds())
}

fn documents(crds: Vec<CustomResourceDefinition>) -> anyhow::Result<String> {
    let mut out = String::new();
    for (i, crd) in crds.into_iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&crate::yaml::to_yaml(&serde_json::to_value(crd)?));
    }
    Ok(out)
}

/// The chart's `templates/crd.yaml`. The CRDs are a template, not in `crds/`,
/// because Helm never upgrades `crds/`: a chart upgrade that changes a schema must
/// change it. `helm.sh/resource-policy: keep` stops `helm uninstall` from deleting
/// a CRD, which would delete every resource of that kind in the cluster with it.
pub fn crd_helm_template() -> anyhow::Result<String> {
    let mut crds = crds();
    for crd in &mut crds {
        crd.metadata.annotations = Some(
            [("helm.sh/resource-policy".to_owned(), "keep".to_owned())]
                .into_iter()
                .collect(),
        );
    }
    let body = documents(crds)?;
    Ok(format!(
        "{{{{- if .Values.crds.install }}}}\n# Generated from the Rust types by `iot-operator crd --helm-template`. Do not edit:\n# scripts/gen-artifacts.sh regenerates it, and a test fails when it is stale.\n{body}{{{{- end }}}}\n"
    ))
}
