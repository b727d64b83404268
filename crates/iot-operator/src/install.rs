//! Installs the CRD from the typed Rust definition (no YAML) and waits until the API
//! server reports it Established.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, CustomResourceExt};

use crate::crd::Deployment;

pub async fn install_crd(client: kube::Client, timeout: Duration) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    let crd = Deployment::crd();
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

/// The CRD as YAML, for the Helm chart (generated at publish time, never at runtime).
pub fn crd_yaml() -> anyhow::Result<String> {
    Ok(serde_yaml::to_string(&Deployment::crd())?)
}
