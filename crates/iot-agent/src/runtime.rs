//! The container runtime as the reconciler sees it. The podman implementation talks
//! to the libpod API; an in-memory one serves unit tests and benchmarks that must
//! not depend on podman's speed.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use harmony_reconciler_contracts::{DeploymentRef, Id, PodmanService, RestartPolicy, SpecHash};

use crate::labels;
use crate::podman::{CreateSpec, PodmanClient, PodmanError, PortMappingSpec};

/// Observed state of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    Running,
    /// Created but never started (or start failed).
    Created,
    Exited {
        code: i32,
    },
    /// Paused, stopping, removing...: left alone until it settles.
    Other(String),
}

/// A container carrying this device's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedContainer {
    pub id: String,
    pub name: String,
    /// `None` if the deployment label is missing or does not parse.
    pub deployment: Option<DeploymentRef>,
    pub service: String,
    pub service_hash: String,
    pub state: ContainerState,
}

/// A container the reconciler wants.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    pub device: Id,
    pub deployment: DeploymentRef,
    pub name: String,
    pub service: PodmanService,
    pub service_hash: SpecHash,
    pub spec_hash: SpecHash,
}

/// Why a runtime call failed, worded for `last_error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RuntimeError(pub String);

pub trait ContainerRuntime: Send + Sync + 'static {
    /// Every container labelled as managed by the agent for `device`.
    fn list(&self, device: &Id) -> impl Future<Output = Result<Vec<ObservedContainer>, RuntimeError>> + Send;
    /// Creates and starts a container; returns its id.
    fn create_and_start(&self, spec: &ContainerSpec) -> impl Future<Output = Result<String, RuntimeError>> + Send;
    fn start(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
}

/// The real runtime: podman's libpod REST API.
#[derive(Debug, Clone)]
pub struct PodmanRuntime {
    pub client: PodmanClient,
    pub stop_timeout: Duration,
}

impl PodmanRuntime {
    fn create_spec(spec: &ContainerSpec, stop_timeout: Duration) -> CreateSpec {
        let svc = &spec.service;
        let labels = BTreeMap::from([
            (labels::MANAGED_BY.to_owned(), labels::MANAGED_BY_VALUE.to_owned()),
            (labels::DEVICE.to_owned(), spec.device.to_string()),
            (labels::DEPLOYMENT.to_owned(), spec.deployment.to_string()),
            (labels::SERVICE.to_owned(), svc.name.clone()),
            (labels::SERVICE_HASH.to_owned(), spec.service_hash.to_string()),
            (labels::SPEC_HASH.to_owned(), spec.spec_hash.to_string()),
        ]);
        let resource_limits = svc.resources.as_ref().map(|r| {
            let mut limits = serde_json::Map::new();
            if let Some(mib) = r.memory_mib {
                limits.insert("memory".into(), serde_json::json!({"limit": mib * 1024 * 1024}));
            }
            if let Some(milli) = r.cpu_millicores {
                // CFS quota over a 100 ms period: 1000 millicores = one full period.
                limits.insert(
                    "cpu".into(),
                    serde_json::json!({"period": 100_000, "quota": milli * 100}),
                );
            }
            serde_json::Value::Object(limits)
        });
        CreateSpec {
            name: spec.name.clone(),
            image: svc.image.clone(),
            labels,
            entrypoint: svc.command.clone(),
            command: svc.args.clone(),
            env: svc.env.clone(),
            portmappings: svc
                .ports
                .iter()
                .map(|p| PortMappingSpec {
                    host_port: p.host_port,
                    container_port: p.container_port,
                    protocol: p.protocol.as_str().to_owned(),
                })
                .collect(),
            restart_policy: match svc.restart_policy {
                RestartPolicy::Always => "always",
                RestartPolicy::OnFailure => "on-failure",
                RestartPolicy::Never => "no",
            }
            .to_owned(),
            resource_limits,
            stop_timeout: stop_timeout.as_secs(),
        }
    }
}

fn podman_err(e: PodmanError) -> RuntimeError {
    RuntimeError(e.to_string())
}

impl ContainerRuntime for PodmanRuntime {
    async fn list(&self, device: &Id) -> Result<Vec<ObservedContainer>, RuntimeError> {
        let listed = self
            .client
            .list_by_label(labels::DEVICE, device.as_str())
            .await
            .map_err(podman_err)?;
        Ok(listed
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                if labels.get(labels::MANAGED_BY).map(String::as_str) != Some(labels::MANAGED_BY_VALUE) {
                    return None;
                }
                let state = match c.state.as_str() {
                    "running" => ContainerState::Running,
                    "created" | "configured" => ContainerState::Created,
                    "exited" | "stopped" => ContainerState::Exited { code: c.exit_code },
                    other => ContainerState::Other(other.to_owned()),
                };
                Some(ObservedContainer {
                    name: c.names.first().cloned().unwrap_or_default(),
                    id: c.id,
                    deployment: labels.get(labels::DEPLOYMENT).and_then(|d| d.parse().ok()),
                    service: labels.get(labels::SERVICE).cloned().unwrap_or_default(),
                    service_hash: labels.get(labels::SERVICE_HASH).cloned().unwrap_or_default(),
                    state,
                })
            })
            .collect())
    }

    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let image = &spec.service.image;
        let present = self.client.image_exists(image).await.map_err(podman_err)?;
        if !present {
            tracing::info!(image = %image, "image not present locally; pulling");
            if let Err(e) = self.client.pull(image).await {
                return Err(RuntimeError(format!(
                    "image {image} is not present on the device and pulling it failed: {e}"
                )));
            }
        }
        let id = self
            .client
            .create(&Self::create_spec(spec, self.stop_timeout))
            .await
            .map_err(podman_err)?;
        if let Err(e) = self.client.start(&id).await {
            // Keep the created container: the next pass retries `start`, and the
            // container shows up in `podman ps -a` for whoever debugs it.
            return Err(RuntimeError(format!(
                "container {} created but failed to start: {e}",
                spec.name
            )));
        }
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.client.start(id).await.map_err(podman_err)
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.client.remove(id, self.stop_timeout).await.map_err(podman_err)
    }
}
