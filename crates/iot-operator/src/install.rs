//! Installs the CRD from the typed Rust definition (no YAML) and waits until the API
//! server reports it Established.

use std::time::Duration;

use iot_api::{Deployment, labels};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, CustomResourceExt};

/// The CRD from the typed Rust definition, with the well-known labels.
pub fn crd() -> CustomResourceDefinition {
    let mut crd = Deployment::crd();
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
    crd
}

pub async fn install_crd(client: kube::Client, timeout: Duration) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    let crd = crd();
    let name = crd.metadata.name.clone().unwrap_or_default();
    crds.patch(&name, &PatchParams::apply("iot-operator").force(), &Patch::Apply(&crd))
        .await
        .map_err(|e| anyhow::anyhow!("applying CRD {name}: {e}"))?;
    tracing::info!(crd = %name, "CRD applied; waiting until Established");
    tokio::time::timeout(timeout, await_condition(crds, &name, conditions::is_crd_established()))
        .await
        .map_err(|_| anyhow::anyhow!("CRD {name} not Established within {timeout:?}"))?
        .map_err(|e| anyhow::anyhow!("waiting for CRD {name}: {e}"))?;
    tracing::info!(crd = %name, "CRD Established");
    Ok(())
}

/// The CRD as YAML (generated at build time, never at runtime).
pub fn crd_yaml() -> anyhow::Result<String> {
    Ok(crate::yaml::to_yaml(&serde_json::to_value(crd())?))
}

/// The chart's `templates/crd.yaml`. The CRD is a template, not in `crds/`, because
/// Helm never upgrades `crds/`: a chart upgrade that changes the schema must change
/// it. `helm.sh/resource-policy: keep` stops `helm uninstall` from deleting the CRD,
/// which would delete every Deployment resource in the cluster with it.
pub fn crd_helm_template() -> anyhow::Result<String> {
    let mut crd = crd();
    crd.metadata.annotations = Some(
        [("helm.sh/resource-policy".to_owned(), "keep".to_owned())]
            .into_iter()
            .collect(),
    );
    let body = crate::yaml::to_yaml(&serde_json::to_value(crd)?);
    Ok(format!(
        "{{{{- if .Values.crds.install }}}}\n# Generated from the Rust types by `iot-operator crd --helm-template`. Do not edit:\n# scripts/gen-artifacts.sh regenerates it, and a test fails when it is stale.\n{body}{{{{- end }}}}\n"
    ))
}
