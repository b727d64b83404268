//! The container runtime as the reconciler sees it. The podman implementation talks
//! to the libpod API; an in-memory one (feature `test-support`) serves unit tests and
//! benchmarks that must not depend on podman's speed.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use harmony_reconciler_contracts::{DeploymentRef, Id, PodmanService, RestartPolicy, SpecHash};
use tokio::sync::mpsc;

use crate::images::{PullCounts, PullError};
use crate::labels;
use crate::podman::{CreateSpec, PodmanClient, PodmanError, PodmanEvent, PortMappingSpec, PullLimits, RegistryAuth};

/// Default of [`PullLimits::stall`]: a layer's last progress line comes only after
/// podman wrote it to storage, which for a large layer on an SD card takes minutes.
pub const DEFAULT_PULL_STALL_TIMEOUT: Duration = Duration::from_secs(300);

/// Observed state of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    Running,
    /// Created but never started (or start failed).
    Created,
    Exited {
        code: i32,
    },
    /// Frozen by `podman pause`: it holds its ports but serves nothing.
    Paused,
    /// Stopping, removing...: left alone until it settles.
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
    /// The revision of the deployment's desired state it was created for (its
    /// [`labels::REVISION`]); `None` without one.
    pub revision: Option<u64>,
    pub state: ContainerState,
    /// The image it runs, as podman knows it.
    pub image: ContainerImage,
    /// The image id of the container this one replaced (its
    /// [`labels::PREVIOUS_IMAGE`]): the version image pruning keeps for a rollback.
    pub previous_image: Option<String>,
}

/// The image a container runs: the name it was created from and what identifies
/// the image itself. Filled from one image listing per container listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerImage {
    /// The reference the container was created from (`reg/iot/web:v1`).
    pub name: String,
    /// podman's image id (empty if podman did not say).
    pub id: String,
    /// The image's `RepoDigests` (`reg/iot/web@sha256:...`).
    pub repo_digests: Vec<String>,
    /// The image's `Digest` (`sha256:...`), if podman knows one.
    pub digest: Option<String>,
}

/// An image in the runtime's store, as image pruning sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredImage {
    pub id: String,
    /// `RepoTags` (`reg/iot/web:v1`).
    pub tags: Vec<String>,
    /// `RepoDigests` (`reg/iot/web@sha256:...`).
    pub repo_digests: Vec<String>,
    pub digest: Option<String>,
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
    /// The revision of the desired state the container is created for, stored next
    /// to the spec hash so a restarted agent knows what runs.
    pub revision: Option<u64>,
    /// When it replaces a container: that container's image id, kept as
    /// [`labels::PREVIOUS_IMAGE`] so image pruning keeps the previous version
    /// across agent restarts.
    pub previous_image: Option<String>,
}

/// How a just-started container is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerHealth {
    pub running: bool,
    /// Restarts by the runtime's restart policy since the container was created.
    pub restart_count: u32,
    pub exit_code: i32,
}

/// Something happened to one of this device's containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeEvent {
    pub container_id: String,
    pub deployment: Option<DeploymentRef>,
    pub kind: RuntimeEventKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeEventKind {
    /// The process ended (a crash, a kill, or a stop).
    Died {
        exit_code: Option<i32>,
    },
    /// The runtime's restart policy (or `podman restart`) started it again.
    Restarted,
    Removed,
    /// Frozen by `podman pause`.
    Paused,
    /// Anything else (create, start, ...): what the agent itself does; no news.
    Other(String),
}

impl RuntimeEventKind {
    /// Whether the event may mean the device drifted from its desired state, so a
    /// pass should look. Events of the agent's own creates and starts do not.
    pub fn needs_pass(&self) -> bool {
        !matches!(self, RuntimeEventKind::Other(_))
    }
}

/// Why a runtime call failed, worded for `last_error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RuntimeError {
    pub message: String,
    /// `Some` when the runtime did not answer within this deadline: it accepts
    /// calls but is frozen or stuck, as opposed to refusing or failing them.
    pub no_answer_within: Option<Duration>,
}

impl RuntimeError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            no_answer_within: None,
        }
    }

    /// The runtime did not answer `what` within `after`.
    pub fn no_answer(what: &str, after: Duration) -> Self {
        Self {
            message: format!("{what}: no answer within {}", humantime::format_duration(after)),
            no_answer_within: Some(after),
        }
    }
}

impl From<PodmanError> for RuntimeError {
    fn from(e: PodmanError) -> Self {
        match e {
            PodmanError::Timeout { what, after } => RuntimeError::no_answer(&format!("podman API {what}"), after),
            other => RuntimeError::new(other.to_string()),
        }
    }
}

/// Everything the reconciler asks of the container runtime. Cloneable so image pulls
/// can run on their own tasks, off the serial action loop.
pub trait ContainerRuntime: Clone + Send + Sync + 'static {
    fn ping(&self) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Every container labelled as managed by the agent for `device`.
    fn list(&self, device: &Id) -> impl Future<Output = Result<Vec<ObservedContainer>, RuntimeError>> + Send;
    fn image_present(&self, image: &str) -> impl Future<Output = Result<bool, RuntimeError>> + Send;
    /// Every image in the runtime's store.
    fn images(&self) -> impl Future<Output = Result<Vec<StoredImage>, RuntimeError>> + Send;
    /// Removes an image by id, never by force: an image a container uses, or that
    /// other names still refer to, stays.
    fn remove_image(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Fetches an image from its registry, calling `progress` as it goes. May take
    /// minutes.
    fn pull(
        &self,
        image: &str,
        progress: &(dyn Fn(PullCounts) + Send + Sync),
    ) -> impl Future<Output = Result<(), PullError>> + Send;
    /// Creates (does not start) a container; returns its id. The image must be present.
    fn create(&self, spec: &ContainerSpec) -> impl Future<Output = Result<String, RuntimeError>> + Send;
    fn start(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn stop(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn unpause(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn health(&self, id: &str) -> impl Future<Output = Result<ContainerHealth, RuntimeError>> + Send;
    /// Makes what the runtime just wrote survive a power cut. Called after a pass
    /// that changed containers and after a pull.
    fn flush_to_disk(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// Streams events of `device`'s containers into `tx` until the stream breaks or
    /// `tx` closes.
    fn watch_events(
        &self,
        device: &Id,
        tx: mpsc::Sender<RuntimeEvent>,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
}

/// Where the agent gets registry credentials from, per pull: they are short-lived,
/// so they are asked for each time and never kept.
pub trait RegistryCredentials: Send + Sync {
    /// Credentials for pulling `image` from `registry` (`host[:port]` as the image
    /// names it), or `None` to pull without. Only asked for images that name a
    /// registry other than plain `localhost`.
    fn credentials<'a>(
        &'a self,
        registry: &'a str,
        image: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<RegistryAuth>, String>>;
}

/// The registry whose credentials a pull of `image` needs: none for a bare name
/// (`nginx`) or a local one (`localhost/web:v1`).
pub fn credential_host(image: &str) -> Option<&str> {
    crate::podman::registry_host(image).filter(|h| *h != "localhost")
}

/// The real runtime: podman's libpod REST API.
#[derive(Clone)]
pub struct PodmanRuntime {
    pub client: PodmanClient,
    pub stop_timeout: Duration,
    pub pull_timeout: Duration,
    pub pull_stall_timeout: Duration,
    /// Asked before each pull from a registry; `None`: pull without credentials.
    credentials: Option<Arc<dyn RegistryCredentials>>,
    /// podman's storage directory, opened once it could be (until then each
    /// flush asks podman again, and flushes every filesystem).
    storage: Arc<tokio::sync::OnceCell<std::fs::File>>,
}

impl std::fmt::Debug for PodmanRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodmanRuntime")
            .field("client", &self.client)
            .field("stop_timeout", &self.stop_timeout)
            .field("pull_timeout", &self.pull_timeout)
            .field("pull_stall_timeout", &self.pull_stall_timeout)
            .field("credentials", &self.credentials.is_some())
            .finish_non_exhaustive()
    }
}

impl PodmanRuntime {
    pub fn new(client: PodmanClient, stop_timeout: Duration, pull_timeout: Duration) -> Self {
        Self {
            client,
            stop_timeout,
            pull_timeout,
            pull_stall_timeout: DEFAULT_PULL_STALL_TIMEOUT,
            credentials: None,
            storage: Arc::default(),
        }
    }

    /// Asks `credentials` before each pull from a registry.
    pub fn with_registry_credentials(mut self, credentials: Arc<dyn RegistryCredentials>) -> Self {
        self.credentials = Some(credentials);
        self
    }

    pub fn with_pull_stall_timeout(mut self, stall: Duration) -> Self {
        self.pull_stall_timeout = stall;
        self
    }

    async fn open_storage(&self) -> Result<std::fs::File, ()> {
        let root = match self.client.graph_root().await {
            Ok(root) => root,
            Err(e) => {
                tracing::warn!(error = %e, "podman did not say where its storage is; flushing every filesystem instead");
                return Err(());
            }
        };
        std::fs::File::open(&root).map_err(|e| {
            tracing::warn!(path = %root.display(), error = %e, "cannot open podman's storage; flushing every filesystem instead");
        })
    }

    fn create_spec(spec: &ContainerSpec, stop_timeout: Duration) -> Result<CreateSpec, RuntimeError> {
        let svc = &spec.service;
        let mut labels = BTreeMap::from([
            (labels::MANAGED_BY.to_owned(), labels::MANAGED_BY_VALUE.to_owned()),
            (labels::DEVICE.to_owned(), spec.device.to_string()),
            (labels::DEPLOYMENT.to_owned(), spec.deployment.to_string()),
            (labels::SERVICE.to_owned(), svc.name.clone()),
            (labels::SERVICE_HASH.to_owned(), spec.service_hash.to_string()),
            (labels::SPEC_HASH.to_owned(), spec.spec_hash.to_string()),
            (labels::K8S_NAME.to_owned(), spec.deployment.name().to_owned()),
            (labels::K8S_INSTANCE.to_owned(), spec.deployment.to_token()),
            (labels::K8S_COMPONENT.to_owned(), svc.name.clone()),
            (labels::K8S_MANAGED_BY.to_owned(), labels::MANAGED_BY_VALUE.to_owned()),
        ]);
        if let Some(revision) = spec.revision {
            labels.insert(labels::REVISION.to_owned(), revision.to_string());
        }
        if let Some(previous) = &spec.previous_image {
            labels.insert(labels::PREVIOUS_IMAGE.to_owned(), previous.clone());
        }
        let resource_limits = match &svc.resources {
            Some(r) => Some(resource_limits(r)?),
            None => None,
        };
        Ok(CreateSpec {
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
        })
    }
}

/// The libpod resource limits of a service, with checked arithmetic: the desired
/// state was validated, but a bad number must fail the one container, never wrap.
fn resource_limits(r: &harmony_reconciler_contracts::ResourceLimits) -> Result<serde_json::Value, RuntimeError> {
    let mut limits = serde_json::Map::new();
    if let Some(mib) = r.memory_mib {
        let bytes = mib
            .checked_mul(1024 * 1024)
            .filter(|b| i64::try_from(*b).is_ok())
            .ok_or_else(|| RuntimeError::new(format!("resources.memory_mib {mib} is too large")))?;
        limits.insert("memory".into(), serde_json::json!({"limit": bytes}));
    }
    if let Some(milli) = r.cpu_millicores {
        // CFS quota over a 100 ms period: 1000 millicores = one full period.
        let quota = milli
            .checked_mul(100)
            .filter(|q| i64::try_from(*q).is_ok())
            .ok_or_else(|| RuntimeError::new(format!("resources.cpu_millicores {milli} is too large")))?;
        limits.insert("cpu".into(), serde_json::json!({"period": 100_000, "quota": quota}));
    }
    Ok(serde_json::Value::Object(limits))
}

/// Podman's own message, without our request description (which names container
/// ids): the reconciler says which service it was about. No answer in time says
/// only that.
fn podman_err(e: PodmanError) -> RuntimeError {
    match e {
        PodmanError::Api { message, .. } if !message.is_empty() => RuntimeError::new(message),
        PodmanError::Timeout { after, .. } => RuntimeError::no_answer("podman", after),
        other => RuntimeError::from(other),
    }
}

/// A failed pull, sorted. A stall is the registry's (or the network's) doing;
/// missing the whole pull's deadline, or podman not answering, is not known to be.
fn pull_error(image: &str, e: PodmanError) -> PullError {
    match e {
        PodmanError::Api { message, .. } => PullError::classify(image, &message),
        PodmanError::Stalled { after, .. } => PullError::Unreachable {
            registry: crate::podman::registry_host(image).unwrap_or("?").to_owned(),
            image: image.to_owned(),
            detail: format!("pull stalled: no progress for {}", humantime::format_duration(after)),
        },
        PodmanError::Timeout { after, .. } => PullError::Other {
            image: image.to_owned(),
            detail: format!("not finished within {}", humantime::format_duration(after)),
        },
        other => PullError::Other {
            image: image.to_owned(),
            detail: other.to_string(),
        },
    }
}

/// The runtime event for a podman event about one of our containers. Events of
/// containers the agent does not manage are dropped: a person's own container
/// that carries the device label would otherwise start a pass each time it
/// stops, although no pass would look at it.
fn event_from(ev: PodmanEvent) -> Option<RuntimeEvent> {
    if ev.type_ != "container" {
        return None;
    }
    let attrs = &ev.actor.attributes;
    if attrs.get(labels::MANAGED_BY).map(String::as_str) != Some(labels::MANAGED_BY_VALUE) {
        return None;
    }
    let kind = match ev.action.as_str() {
        "died" => RuntimeEventKind::Died {
            exit_code: attrs.get("containerExitCode").and_then(|c| c.parse().ok()),
        },
        "restart" => RuntimeEventKind::Restarted,
        "remove" => RuntimeEventKind::Removed,
        "pause" => RuntimeEventKind::Paused,
        other => RuntimeEventKind::Other(other.to_owned()),
    };
    Some(RuntimeEvent {
        container_id: ev.actor.id,
        deployment: attrs.get(labels::DEPLOYMENT).and_then(|d| d.parse().ok()),
        kind,
    })
}

impl ContainerRuntime for PodmanRuntime {
    /// containers/storage does not fsync everything it writes: a device reset within
    /// the kernel's writeback window (about 30 s) after an image load left zero-byte
    /// layer `link` files here, and the image's containers failed with "Exec format
    /// error" until it was loaded again (found by the VM power-cycle test). Podman
    /// runs on this device, so a syncfs(2) of the filesystem that holds its storage
    /// makes its writes durable, without flushing every other filesystem (on an SD
    /// card that can take seconds).
    async fn flush_to_disk(&self) {
        let started = std::time::Instant::now();
        let storage = self.storage.get_or_try_init(|| self.open_storage()).await;
        let dir = storage.ok().and_then(|f| f.try_clone().ok());
        let flushed = tokio::task::spawn_blocking(move || match dir {
            Some(dir) => nix::unistd::syncfs(&dir).map_err(|e| e.to_string()),
            None => {
                nix::unistd::sync();
                Ok(())
            }
        })
        .await;
        match flushed {
            Ok(Ok(())) => tracing::debug!(took = ?started.elapsed(), "flushed container changes to disk"),
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing podman's storage failed"),
            Err(e) => tracing::warn!(error = %e, "flushing podman's storage failed"),
        }
    }

    async fn ping(&self) -> Result<(), RuntimeError> {
        self.client.ping().await.map_err(RuntimeError::from)
    }

    /// The device's containers, and (one more call, only when there are any) the
    /// images they run. Both listings must answer: a container whose image cannot
    /// be seen would look changed to the planner.
    async fn list(&self, device: &Id) -> Result<Vec<ObservedContainer>, RuntimeError> {
        let listed = self
            .client
            .list_by_label(labels::DEVICE, device.as_str())
            .await
            .map_err(RuntimeError::from)?;
        let managed: Vec<_> = listed
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.clone().unwrap_or_default();
                (labels.get(labels::MANAGED_BY).map(String::as_str) == Some(labels::MANAGED_BY_VALUE))
                    .then_some((c, labels))
            })
            .collect();
        let images: BTreeMap<String, crate::podman::ListedImage> = if managed.is_empty() {
            BTreeMap::new()
        } else {
            self.client
                .list_images()
                .await
                .map_err(RuntimeError::from)?
                .into_iter()
                .map(|i| (i.id.clone(), i))
                .collect()
        };
        Ok(managed
            .into_iter()
            .map(|(c, labels)| {
                let state = match c.state.as_str() {
                    "running" => ContainerState::Running,
                    "created" | "configured" | "initialized" => ContainerState::Created,
                    "exited" | "stopped" => ContainerState::Exited { code: c.exit_code },
                    "paused" => ContainerState::Paused,
                    other => ContainerState::Other(other.to_owned()),
                };
                let stored = images.get(&c.image_id);
                ObservedContainer {
                    name: c.names.first().cloned().unwrap_or_default(),
                    id: c.id,
                    deployment: labels.get(labels::DEPLOYMENT).and_then(|d| d.parse().ok()),
                    service: labels.get(labels::SERVICE).cloned().unwrap_or_default(),
                    service_hash: labels.get(labels::SERVICE_HASH).cloned().unwrap_or_default(),
                    revision: labels.get(labels::REVISION).and_then(|r| r.parse().ok()),
                    state,
                    image: ContainerImage {
                        name: c.image,
                        id: c.image_id,
                        repo_digests: stored.map(|i| i.repo_digests.clone()).unwrap_or_default(),
                        digest: stored.and_then(|i| i.digest.clone()).filter(|d| !d.is_empty()),
                    },
                    previous_image: labels.get(labels::PREVIOUS_IMAGE).cloned().filter(|p| !p.is_empty()),
                }
            })
            .collect())
    }

    async fn images(&self) -> Result<Vec<StoredImage>, RuntimeError> {
        let listed = self.client.list_images().await.map_err(RuntimeError::from)?;
        Ok(listed
            .into_iter()
            .map(|i| StoredImage {
                id: i.id,
                tags: i.repo_tags,
                repo_digests: i.repo_digests,
                digest: i.digest.filter(|d| !d.is_empty()),
            })
            .collect())
    }

    async fn remove_image(&self, id: &str) -> Result<(), RuntimeError> {
        self.client.remove_image(id).await.map_err(podman_err)
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        self.client.image_exists(image).await.map_err(podman_err)
    }

    async fn pull(&self, image: &str, progress: &(dyn Fn(PullCounts) + Send + Sync)) -> Result<(), PullError> {
        let auth = match (credential_host(image), &self.credentials) {
            (Some(registry), Some(source)) => {
                source
                    .credentials(registry, image)
                    .await
                    .map_err(|e| PullError::Other {
                        image: image.to_owned(),
                        detail: format!("no credentials for registry {registry}: {e}"),
                    })?
            }
            _ => None,
        };
        let limits = PullLimits {
            deadline: self.pull_timeout,
            stall: self.pull_stall_timeout,
        };
        let sent = auth.is_some();
        self.client
            .pull(image, auth.as_ref(), limits, &mut |c| progress(c))
            .await
            .map_err(|e| match pull_error(image, e) {
                // "refused the credentials" alone would mislead when there were none.
                e @ PullError::Unauthorized { .. } if !sent => {
                    e.map_detail(|d| format!("{d} (the agent had no credentials to send)"))
                }
                e => e,
            })
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        self.client
            .create(&Self::create_spec(spec, self.stop_timeout)?)
            .await
            .map_err(podman_err)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.client.start(id).await.map_err(podman_err)
    }

    async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        self.client.stop(id, self.stop_timeout).await.map_err(podman_err)
    }

    async fn unpause(&self, id: &str) -> Result<(), RuntimeError> {
        self.client.unpause(id).await.map_err(podman_err)
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.client.remove(id, self.stop_timeout).await.map_err(podman_err)
    }

    async fn health(&self, id: &str) -> Result<ContainerHealth, RuntimeError> {
        let c = self.client.inspect(id).await.map_err(podman_err)?;
        Ok(ContainerHealth {
            running: c.state.running && c.state.status == "running",
            restart_count: c.restart_count,
            exit_code: c.state.exit_code,
        })
    }

    async fn watch_events(&self, device: &Id, tx: mpsc::Sender<RuntimeEvent>) -> Result<(), RuntimeError> {
        let (raw_tx, mut raw_rx) = mpsc::channel(256);
        let client = self.client.clone();
        let device = device.clone();
        // The stream ends by dropping `raw_tx`, which lets `forward` drain and end; a
        // closed `tx` ends `forward`, whose dropped receiver then ends the stream.
        let stream = async move {
            let r = client.stream_events(labels::DEVICE, device.as_str(), &raw_tx).await;
            drop(raw_tx);
            r
        };
        let forward = async move {
            while let Some(ev) = raw_rx.recv().await {
                if let Some(ev) = event_from(ev)
                    && tx.send(ev).await.is_err()
                {
                    return;
                }
            }
        };
        let (streamed, ()) = tokio::join!(stream, forward);
        streamed.map_err(RuntimeError::from)
    }
}

#[cfg(test)]
mod tests {
    use harmony_reconciler_contracts::ResourceLimits;

    use super::*;
    use crate::podman::EventActor;

    fn died(labels: &[(&str, &str)]) -> PodmanEvent {
        let mut attributes: BTreeMap<String, String> =
            labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        attributes.insert("containerExitCode".into(), "137".into());
        PodmanEvent {
            type_: "container".into(),
            action: "died".into(),
            actor: EventActor {
                id: "abc".into(),
                attributes,
            },
        }
    }

    #[test]
    fn only_events_of_managed_containers_count() {
        let ours = event_from(died(&[
            (labels::MANAGED_BY, labels::MANAGED_BY_VALUE),
            (labels::DEVICE, "pi-1"),
            (labels::DEPLOYMENT, "default/web"),
        ]));
        assert!(
            matches!(&ours, Some(e) if e.kind == RuntimeEventKind::Died { exit_code: Some(137) } && e.deployment.is_some()),
            "{ours:?}"
        );
        // A container someone ran by hand with the device's label.
        assert!(event_from(died(&[(labels::DEVICE, "pi-1")])).is_none());
        assert!(event_from(died(&[(labels::MANAGED_BY, "someone-else"), (labels::DEVICE, "pi-1")])).is_none());
    }

    #[test]
    fn the_revision_is_a_label_next_to_the_spec_hash_when_there_is_one() {
        let service: PodmanService =
            serde_json::from_value(serde_json::json!({"name": "web", "image": "img:1"})).expect("service");
        let mut spec = ContainerSpec {
            device: Id::new("pi-1").expect("id"),
            deployment: "default/web".parse().expect("deployment"),
            name: "pi-1.default.web.web.12345678".into(),
            service_hash: crate::plan::service_hash(&service),
            service,
            spec_hash: SpecHash::from_reported("h"),
            revision: Some(7),
            previous_image: None,
        };
        let labels = PodmanRuntime::create_spec(&spec, Duration::from_secs(1))
            .expect("spec")
            .labels;
        assert_eq!(labels.get(labels::REVISION).map(String::as_str), Some("7"));
        assert_eq!(labels.get(labels::SPEC_HASH).map(String::as_str), Some("h"));
        spec.revision = None;
        let labels = PodmanRuntime::create_spec(&spec, Duration::from_secs(1))
            .expect("spec")
            .labels;
        assert!(!labels.contains_key(labels::REVISION), "{labels:?}");
    }

    #[test]
    fn no_answer_in_time_is_told_apart_from_other_failures() {
        let timeout = PodmanError::Timeout {
            what: "list containers".into(),
            after: Duration::from_secs(5),
        };
        let e = RuntimeError::from(timeout);
        assert_eq!(e.no_answer_within, Some(Duration::from_secs(5)));
        assert_eq!(e.message, "podman API list containers: no answer within 5s");
        let e = podman_err(PodmanError::Timeout {
            what: "start 0123456789ab".into(),
            after: Duration::from_secs(20),
        });
        assert_eq!(e.no_answer_within, Some(Duration::from_secs(20)));
        let refused = PodmanError::Connect {
            path: "/run/podman/podman.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        assert_eq!(RuntimeError::from(refused).no_answer_within, None);
    }

    #[test]
    fn only_images_from_a_registry_ask_for_credentials() {
        assert_eq!(
            credential_host("registry.example.com:5000/web:2"),
            Some("registry.example.com:5000")
        );
        assert_eq!(credential_host("localhost:5000/web:2"), Some("localhost:5000"));
        assert_eq!(credential_host("localhost/iot-web:v1"), None);
        assert_eq!(credential_host("nginx:1"), None);
        assert_eq!(credential_host("library/nginx"), None);
    }

    #[test]
    fn a_stalled_pull_blames_the_registry_and_a_missed_deadline_does_not() {
        let stalled = pull_error(
            "r.example/web:2",
            PodmanError::Stalled {
                what: "pull r.example/web:2".into(),
                after: Duration::from_secs(300),
            },
        );
        assert_eq!(
            stalled.to_string(),
            "registry r.example unreachable while pulling r.example/web:2: pull stalled: no progress for 5m"
        );
        let late = pull_error(
            "r.example/web:2",
            PodmanError::Timeout {
                what: "pull r.example/web:2".into(),
                after: Duration::from_secs(1800),
            },
        );
        assert_eq!(
            late.to_string(),
            "pulling image r.example/web:2 failed: not finished within 30m"
        );
        let refused = pull_error(
            "r.example/web:2",
            PodmanError::Api {
                what: "pull r.example/web:2".into(),
                status: 500,
                message: "initializing source docker://r.example/web:2: reading manifest 2 in r.example/web: unauthorized: authentication required".into(),
            },
        );
        assert_eq!(refused.kind(), "unauthorized");
    }

    /// Credentials that count how often they were asked for, and for which registry.
    #[derive(Default)]
    struct Counted(std::sync::Mutex<Vec<String>>);

    impl RegistryCredentials for Counted {
        fn credentials<'a>(
            &'a self,
            registry: &'a str,
            _image: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<Option<RegistryAuth>, String>> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(registry.to_owned());
            Box::pin(async move {
                Ok(Some(RegistryAuth {
                    username: "dev1".into(),
                    password: "token".into(),
                    server: registry.to_owned(),
                }))
            })
        }
    }

    /// A podman that refuses every pull as podman 4.3.1 does for a registry that
    /// wants other credentials; sends each request's head to the test.
    fn refusing_podman(dir: &std::path::Path) -> (std::path::PathBuf, mpsc::UnboundedReceiver<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const LINE: &str = r#"{"progressDetail":{},"errorDetail":{"message":"initializing source docker://r.example:5000/web:2: reading manifest 2 in r.example:5000/web: unauthorized: authentication required"},"error":"initializing source docker://r.example:5000/web:2: reading manifest 2 in r.example:5000/web: unauthorized: authentication required"}"#;
        let socket = dir.join("podman.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut head = vec![0u8; 4096];
                let n = conn.read(&mut head).await.unwrap_or(0);
                if tx.send(String::from_utf8_lossy(&head[..n]).into_owned()).is_err() {
                    return;
                }
                let body = format!("{LINE}\n");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if conn.write_all(answer.as_bytes()).await.is_err() {
                    tracing::debug!("the client went away");
                }
            }
        });
        (socket, rx)
    }

    #[tokio::test]
    async fn credentials_are_asked_for_per_pull_from_a_registry_and_their_absence_is_said() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (socket, mut heads) = refusing_podman(dir.path());
        let client = PodmanClient::new(&socket);
        let none = |_| {};
        let bare = PodmanRuntime::new(client.clone(), Duration::from_secs(1), Duration::from_secs(5));
        let err = bare.pull("r.example:5000/web:2", &none).await.expect_err("refused");
        assert_eq!(
            err.to_string(),
            "registry r.example:5000 refused the credentials for r.example:5000/web:2: reading manifest 2 in \
             r.example:5000/web: unauthorized: authentication required (the agent had no credentials to send)"
        );
        let head = heads.recv().await.expect("request").to_ascii_lowercase();
        assert!(!head.contains("x-registry-auth"), "{head}");

        let asked = Arc::new(Counted::default());
        let with = bare.clone().with_registry_credentials(asked.clone());
        let err = with.pull("r.example:5000/web:2", &none).await.expect_err("refused");
        assert!(!err.to_string().contains("no credentials"), "{err}");
        let head = heads.recv().await.expect("request").to_ascii_lowercase();
        assert!(head.contains("x-registry-auth: "), "{head}");
        // Local and bare names never ask.
        for image in ["localhost/iot-web:v1", "nginx:1"] {
            assert!(with.pull(image, &none).await.is_err(), "the fake refuses every pull");
            heads.recv().await.expect("request");
        }
        let asked = asked
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        assert_eq!(asked, ["r.example:5000"]);
    }

    #[test]
    fn resource_limits_never_wrap() -> Result<(), RuntimeError> {
        let ok = resource_limits(&ResourceLimits {
            memory_mib: Some(64),
            cpu_millicores: Some(500),
        })?;
        assert_eq!(ok["memory"]["limit"], 64 * 1024 * 1024);
        assert_eq!(ok["cpu"]["quota"], 50_000);
        for (mib, milli, field) in [
            (Some(u64::MAX), None, "memory_mib"),
            (Some(u64::MAX / 1024), None, "memory_mib"),
            (None, Some(u64::MAX), "cpu_millicores"),
            (None, Some(u64::MAX / 100), "cpu_millicores"),
        ] {
            let err = resource_limits(&ResourceLimits {
                memory_mib: mib,
                cpu_millicores: milli,
            })
            .err()
            .map(|e| e.message)
            .unwrap_or_default();
            assert!(err.contains(field) && err.contains("too large"), "{err}");
        }
        Ok(())
    }
}
