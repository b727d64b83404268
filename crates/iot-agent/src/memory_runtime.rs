//! An in-memory container runtime: the podman stand-in for planner/reconciler tests
//! and for benchmarks that measure the follow path rather than podman. Only built
//! with the `test-support` feature; the agent binary never contains it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use harmony_reconciler_contracts::Id;
use tokio::sync::mpsc;

use crate::images::{PullCounts, PullError};
use crate::runtime::{
    ContainerHealth, ContainerImage, ContainerRuntime, ContainerSpec, ContainerState, ObservedContainer, RuntimeError,
    RuntimeEvent, RuntimeEventKind, StoredImage,
};

/// The id the memory runtime gives an image: `id-` and its name.
pub fn memory_image_id(image: &str) -> String {
    format!("id-{image}")
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    containers: BTreeMap<String, (Id, ObservedContainer, String)>,
    /// Images on the "device"; creating from anything else fails like podman would.
    images: Vec<String>,
    /// Images a pull can fetch (after `pull_delay`).
    pullable: Vec<String>,
    pull_delay: Duration,
    /// Progress reports of each pull, spread over `pull_delay`, and the bytes
    /// they count up to.
    pull_steps: u32,
    pull_bytes: u64,
    /// Pulls of these images fail with this podman message.
    pull_failures: BTreeMap<String, String>,
    /// Images whose containers exit with code 1 as soon as they start.
    crashing: Vec<String>,
    /// Every create fails (a port held by something else, say).
    failing_creates: bool,
    calls: Vec<String>,
    available: bool,
    /// Every call waits this long and then fails as unanswered, like a frozen
    /// podman behind a client with this deadline.
    unresponsive: Option<Duration>,
    /// Lists that still answer before the runtime goes away (`None`: no limit).
    lists_left: Option<usize>,
    watchers: Vec<mpsc::Sender<RuntimeEvent>>,
}

#[derive(Debug, Clone)]
pub struct MemoryRuntime {
    inner: Arc<Mutex<Inner>>,
}

impl Default for MemoryRuntime {
    fn default() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                available: true,
                ..Default::default()
            })),
        }
    }
}

impl MemoryRuntime {
    pub fn with_images(images: &[&str]) -> Self {
        let rt = Self::default();
        rt.lock().images = images.iter().map(|s| s.to_string()).collect();
        rt
    }

    /// Images a pull succeeds for, after `delay`.
    pub fn with_pullable(self, images: &[&str], delay: Duration) -> Self {
        {
            let mut inner = self.lock();
            inner.pullable = images.iter().map(|s| s.to_string()).collect();
            inner.pull_delay = delay;
        }
        self
    }

    /// Each pull reports its progress `steps` times, evenly over its delay, up to
    /// `bytes` in one layer.
    pub fn with_pull_progress(self, steps: u32, bytes: u64) -> Self {
        {
            let mut inner = self.lock();
            inner.pull_steps = steps;
            inner.pull_bytes = bytes;
        }
        self
    }

    /// Makes pulls of `image` fail with podman's `message` (`None`: as before).
    pub fn set_pull_failure(&self, image: &str, message: Option<&str>) {
        let mut inner = self.lock();
        match message {
            Some(m) => inner.pull_failures.insert(image.to_owned(), m.to_owned()),
            None => inner.pull_failures.remove(image),
        };
    }

    /// Containers of these images exit with code 1 right after they start.
    pub fn with_crashing(self, images: &[&str]) -> Self {
        self.lock().crashing = images.iter().map(|s| s.to_string()).collect();
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every container, any device.
    pub fn containers(&self) -> Vec<ObservedContainer> {
        self.lock().containers.values().map(|(_, c, _)| c.clone()).collect()
    }

    /// Simulates `podman rm -f` behind the agent's back.
    pub fn remove_out_of_band(&self, id: &str) {
        let removed = self.lock().containers.remove(id);
        if let Some((_, c, _)) = removed {
            self.emit(RuntimeEvent {
                container_id: id.to_owned(),
                deployment: c.deployment,
                kind: RuntimeEventKind::Removed,
            });
        }
    }

    /// Simulates a container changing state (stopping, pausing).
    pub fn set_state(&self, id: &str, state: ContainerState) {
        if let Some((_, c, _)) = self.lock().containers.get_mut(id) {
            c.state = state;
        }
    }

    /// Simulates a crash that the runtime's restart policy answers at once.
    pub fn crash_and_restart(&self, id: &str, exit_code: i32) {
        let dep = self
            .lock()
            .containers
            .get(id)
            .and_then(|(_, c, _)| c.deployment.clone());
        for kind in [
            RuntimeEventKind::Died {
                exit_code: Some(exit_code),
            },
            RuntimeEventKind::Restarted,
        ] {
            self.emit(RuntimeEvent {
                container_id: id.to_owned(),
                deployment: dep.clone(),
                kind,
            });
        }
    }

    /// Makes every create fail like a busy host port (or work again).
    pub fn set_failing_creates(&self, failing: bool) {
        self.lock().failing_creates = failing;
    }

    /// Makes every call fail like an unreachable socket (or work again).
    pub fn set_available(&self, available: bool) {
        self.lock().available = available;
    }

    /// Makes every call hang for `deadline` and then fail as unanswered, like a
    /// frozen podman service (`kill -STOP`) behind a client with that deadline
    /// (`None`: answers again).
    pub fn set_unresponsive(&self, deadline: Option<Duration>) {
        self.lock().unresponsive = deadline;
    }

    /// The runtime goes away after `lists` more lists (in the middle of a pass).
    pub fn go_away_after_lists(&self, lists: usize) {
        self.lock().lists_left = Some(lists);
    }
    /// The calls made so far, like `create dev1.ns.web.web.1234abcd`.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    fn emit(&self, ev: RuntimeEvent) {
        let watchers = self.lock().watchers.clone();
        for w in watchers {
            if w.try_send(ev.clone()).is_err() {
                tracing::debug!("memory runtime: event watcher full or gone");
            }
        }
    }

    /// Waits out the deadline of a frozen runtime, and fails.
    async fn answer(&self) -> Result<(), RuntimeError> {
        let deadline = self.lock().unresponsive;
        match deadline {
            Some(d) => {
                tokio::time::sleep(d).await;
                Err(RuntimeError::no_answer("memory runtime", d))
            }
            None => Ok(()),
        }
    }

    fn check(&self, call: String) -> Result<std::sync::MutexGuard<'_, Inner>, RuntimeError> {
        let mut inner = self.lock();
        inner.calls.push(call);
        if inner.available {
            Ok(inner)
        } else {
            Err(RuntimeError::new("connection refused"))
        }
    }
}

impl ContainerRuntime for MemoryRuntime {
    async fn ping(&self) -> Result<(), RuntimeError> {
        self.answer().await?;
        self.check("ping".into()).map(drop)
    }

    async fn list(&self, device: &Id) -> Result<Vec<ObservedContainer>, RuntimeError> {
        self.answer().await?;
        {
            let mut inner = self.lock();
            match inner.lists_left {
                Some(0) => inner.available = false,
                Some(n) => inner.lists_left = Some(n - 1),
                None => {}
            }
        }
        let inner = self.check("list".into())?;
        Ok(inner
            .containers
            .values()
            .filter(|(d, _, _)| d == device)
            .map(|(_, c, _)| c.clone())
            .collect())
    }

    async fn flush_to_disk(&self) {
        self.lock().calls.push("flush".into());
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        self.answer().await?;
        let inner = self.check(format!("image_present {image}"))?;
        Ok(inner.images.iter().any(|i| i == image))
    }

    async fn images(&self) -> Result<Vec<StoredImage>, RuntimeError> {
        self.answer().await?;
        let inner = self.check("images".into())?;
        Ok(inner
            .images
            .iter()
            .map(|i| StoredImage {
                id: memory_image_id(i),
                tags: vec![i.clone()],
                ..Default::default()
            })
            .collect())
    }

    /// Refuses, like podman, while a container uses the image.
    async fn remove_image(&self, id: &str) -> Result<(), RuntimeError> {
        self.answer().await?;
        let mut inner = self.check(format!("remove_image {id}"))?;
        if inner.containers.values().any(|(_, c, _)| c.image.id == id) {
            return Err(RuntimeError::new(format!("image {id} is in use by a container")));
        }
        inner.images.retain(|i| memory_image_id(i) != id);
        Ok(())
    }

    async fn pull(&self, image: &str, progress: &(dyn Fn(PullCounts) + Send + Sync)) -> Result<(), PullError> {
        let fail = |e: RuntimeError| PullError::Other {
            image: image.to_owned(),
            detail: e.message,
        };
        self.answer().await.map_err(fail)?;
        let (delay, steps, bytes) = {
            let inner = self.check(format!("pull {image}")).map_err(fail)?;
            (inner.pull_delay, inner.pull_steps, inner.pull_bytes)
        };
        if steps == 0 {
            tokio::time::sleep(delay).await;
        }
        for step in 1..=steps {
            tokio::time::sleep(delay / steps).await;
            progress(PullCounts {
                bytes_done: bytes / u64::from(steps) * u64::from(step),
                bytes_total: Some(bytes),
                layers_done: u32::from(step == steps),
                layers_total: 1,
            });
        }
        let mut inner = self.lock();
        if let Some(message) = inner.pull_failures.get(image) {
            return Err(PullError::classify(image, message));
        }
        if inner.pullable.iter().any(|i| i == image) {
            inner.images.push(image.to_owned());
            Ok(())
        } else {
            Err(PullError::classify(image, &format!("{image}: manifest unknown")))
        }
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        self.answer().await?;
        let mut inner = self.check(format!("create {}", spec.name))?;
        if inner.failing_creates {
            return Err(RuntimeError::new(
                "cannot listen on the TCP port: address already in use",
            ));
        }
        if !inner.images.contains(&spec.service.image) {
            return Err(RuntimeError::new(format!("{}: image not known", spec.service.image)));
        }
        if inner.containers.values().any(|(_, c, _)| c.name == spec.name) {
            return Err(RuntimeError::new(format!("name {} is in use", spec.name)));
        }
        inner.next_id += 1;
        let id = format!("{:064x}", inner.next_id);
        let observed = ObservedContainer {
            id: id.clone(),
            name: spec.name.clone(),
            deployment: Some(spec.deployment.clone()),
            service: spec.service.name.clone(),
            service_hash: spec.service_hash.to_string(),
            revision: spec.revision,
            state: ContainerState::Created,
            image: ContainerImage {
                name: spec.service.image.clone(),
                id: memory_image_id(&spec.service.image),
                ..Default::default()
            },
            previous_image: spec.previous_image.clone(),
        };
        inner
            .containers
            .insert(id.clone(), (spec.device.clone(), observed, spec.service.image.clone()));
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.answer().await?;
        let mut inner = self.check(format!("start {id}"))?;
        let crashing = inner.crashing.clone();
        match inner.containers.get_mut(id) {
            Some((_, c, image)) => {
                c.state = if crashing.contains(image) {
                    ContainerState::Exited { code: 1 }
                } else {
                    ContainerState::Running
                };
                Ok(())
            }
            None => Err(RuntimeError::new(format!("no such container {id}"))),
        }
    }

    async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        self.answer().await?;
        let mut inner = self.check(format!("stop {id}"))?;
        if let Some((_, c, _)) = inner.containers.get_mut(id) {
            c.state = ContainerState::Exited { code: 0 };
        }
        Ok(())
    }

    async fn unpause(&self, id: &str) -> Result<(), RuntimeError> {
        self.answer().await?;
        let mut inner = self.check(format!("unpause {id}"))?;
        match inner.containers.get_mut(id) {
            Some((_, c, _)) if c.state == ContainerState::Paused => {
                c.state = ContainerState::Running;
                Ok(())
            }
            Some(_) => Err(RuntimeError::new("container state improper")),
            None => Err(RuntimeError::new(format!("no such container {id}"))),
        }
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.answer().await?;
        let mut inner = self.check(format!("remove {id}"))?;
        inner.containers.remove(id);
        Ok(())
    }

    async fn health(&self, id: &str) -> Result<ContainerHealth, RuntimeError> {
        self.answer().await?;
        let inner = self.check(format!("health {id}"))?;
        match inner.containers.get(id).map(|(_, c, _)| &c.state) {
            Some(ContainerState::Running) => Ok(ContainerHealth {
                running: true,
                restart_count: 0,
                exit_code: 0,
            }),
            Some(ContainerState::Exited { code }) => Ok(ContainerHealth {
                running: false,
                restart_count: 0,
                exit_code: *code,
            }),
            Some(_) => Ok(ContainerHealth {
                running: false,
                restart_count: 0,
                exit_code: 0,
            }),
            None => Err(RuntimeError::new(format!("no such container {id}"))),
        }
    }

    async fn watch_events(&self, _device: &Id, tx: mpsc::Sender<RuntimeEvent>) -> Result<(), RuntimeError> {
        self.lock().watchers.push(tx.clone());
        tx.closed().await;
        Ok(())
    }
}
