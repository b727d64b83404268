//! An in-memory container runtime: the podman stand-in for planner/reconciler tests
//! and for benchmarks that measure the follow path rather than podman.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use harmony_reconciler_contracts::Id;

use crate::runtime::{ContainerRuntime, ContainerSpec, ContainerState, ObservedContainer, RuntimeError};

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    containers: BTreeMap<String, (Id, ObservedContainer)>,
    /// Images that "exist"; creating anything else fails like podman would.
    images: Vec<String>,
    calls: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct MemoryRuntime {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryRuntime {
    pub fn with_images(images: &[&str]) -> Self {
        let rt = Self::default();
        rt.lock().images = images.iter().map(|s| s.to_string()).collect();
        rt
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every container, any device.
    pub fn containers(&self) -> Vec<ObservedContainer> {
        self.lock().containers.values().map(|(_, c)| c.clone()).collect()
    }

    /// Simulates `podman rm -f` behind the agent's back.
    pub fn remove_out_of_band(&self, id: &str) {
        self.lock().containers.remove(id);
    }

    /// Simulates a container stopping.
    pub fn set_state(&self, id: &str, state: ContainerState) {
        if let Some((_, c)) = self.lock().containers.get_mut(id) {
            c.state = state;
        }
    }

    /// The calls made so far, like `create dev1.ns.web.web`.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }
}

impl ContainerRuntime for MemoryRuntime {
    async fn list(&self, device: &Id) -> Result<Vec<ObservedContainer>, RuntimeError> {
        let inner = self.lock();
        Ok(inner
            .containers
            .values()
            .filter(|(d, _)| d == device)
            .map(|(_, c)| c.clone())
            .collect())
    }

    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let mut inner = self.lock();
        inner.calls.push(format!("create {}", spec.name));
        if !inner.images.contains(&spec.service.image) {
            return Err(RuntimeError(format!(
                "image {} is not present on the device",
                spec.service.image
            )));
        }
        if inner.containers.values().any(|(_, c)| c.name == spec.name) {
            return Err(RuntimeError(format!("name {} is in use", spec.name)));
        }
        inner.next_id += 1;
        let id = format!("{:064x}", inner.next_id);
        let observed = ObservedContainer {
            id: id.clone(),
            name: spec.name.clone(),
            deployment: Some(spec.deployment.clone()),
            service: spec.service.name.clone(),
            service_hash: spec.service_hash.to_string(),
            state: ContainerState::Running,
        };
        inner.containers.insert(id.clone(), (spec.device.clone(), observed));
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let mut inner = self.lock();
        inner.calls.push(format!("start {id}"));
        match inner.containers.get_mut(id) {
            Some((_, c)) => {
                c.state = ContainerState::Running;
                Ok(())
            }
            None => Err(RuntimeError(format!("no such container {id}"))),
        }
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let mut inner = self.lock();
        inner.calls.push(format!("remove {id}"));
        inner.containers.remove(id);
        Ok(())
    }
}
