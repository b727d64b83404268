//! The thin, stateful executor around the pure planner.
//!
//! One pass: decode desired state, list containers, plan, execute, look again, and
//! derive each deployment's phase from what is really there. State kept between
//! passes is only what cannot be observed: which services were seen before (to
//! recognise out-of-band removals), per-deployment retry backoff, image pulls in
//! flight, restart accounting, and the event ring.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use harmony_reconciler_contracts::text::normalize_error;
use harmony_reconciler_contracts::{
    DeploymentPhase, DeploymentRef, EventEntry, EventRing, Id, Phase, RestartPolicy, RuntimeState, RuntimeStatus,
    Severity, SpecHash,
};
use iot_kv::DesiredView;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::images::{ImageTracker, PullOutcome};
use crate::interpret::interpret_all;
use crate::metrics::AgentMetrics;
use crate::plan::{Action, Assessment, CreateCause, DesiredContent, OldContainer, PlanInput, RemoveCause, plan};
use crate::restarts::RestartBook;
use crate::runtime::{
    ContainerRuntime, ContainerSpec, ObservedContainer, RuntimeError, RuntimeEvent, RuntimeEventKind,
};

/// What the status reporter publishes; replaced wholesale after every pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub deployments: BTreeMap<DeploymentRef, DeploymentPhase>,
    pub events: Vec<EventEntry>,
    pub runtime: RuntimeStatus,
    pub last_reconcile_at: Option<DateTime<Utc>>,
    /// Increases with every change worth publishing at once (a new
    /// `last_reconcile_at` alone rides along with the next heartbeat).
    pub revision: u64,
}

/// Retry state of a deployment whose last attempt failed.
#[derive(Debug, Clone)]
struct Failure {
    spec_hash: Option<SpecHash>,
    attempts: u32,
    retry_at: Instant,
    error: String,
}

/// Backoff after the n-th consecutive failure: 1 s, 2 s, 4 s ... capped at 60 s.
pub fn failure_backoff(attempts: u32) -> Duration {
    iot_kv::backoff(attempts, Duration::from_secs(60))
}

/// Backoff after the n-th consecutive rolled-back upgrade: 30 s doubling to 10 min.
pub fn rollback_backoff(attempts: u32) -> Duration {
    (Duration::from_secs(30) * 2u32.saturating_pow(attempts.saturating_sub(1).min(8))).min(Duration::from_secs(600))
}

/// Knobs of the reconciler.
#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    pub device: Id,
    pub event_capacity: usize,
    /// How long a replacement container must stay up before the old one is removed.
    pub settle: Duration,
    /// Describes the runtime in "waiting for ..." messages (the podman socket path).
    pub runtime_name: String,
}

/// Summary of one pass, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassSummary {
    pub executed: usize,
    pub failed: usize,
    pub skipped_backoff: usize,
    pub pulls_started: usize,
}

/// Why a replacement did not happen, and whether the old container was put back.
struct ReplaceFailure {
    error: String,
    rolled_back: bool,
}

pub struct Reconciler<R> {
    runtime: R,
    config: ReconcilerConfig,
    seen: BTreeSet<(DeploymentRef, String)>,
    failures: BTreeMap<DeploymentRef, Failure>,
    /// Failed starts of a previous version ([`Action::StartPrevious`]): attempts and
    /// when the next may run.
    previous_retry: BTreeMap<DeploymentRef, (u32, Instant)>,
    phases: BTreeMap<DeploymentRef, DeploymentPhase>,
    events: EventRing,
    images: ImageTracker,
    restarts: RestartBook,
    runtime_status: RuntimeStatus,
    /// The runtime answered at least once since the agent started.
    runtime_reached: bool,
    /// Malformed keys under this device's prefix already reported as events.
    reported_invalid_keys: BTreeSet<String>,
    report: watch::Sender<Report>,
    /// The revision the reporter last published, when a reporter is attached.
    published: Option<watch::Receiver<u64>>,
    pull_tx: mpsc::Sender<PullOutcome>,
    pull_rx: mpsc::Receiver<PullOutcome>,
    metrics: Arc<AgentMetrics>,
    /// A pull finished since the last flush to disk.
    unflushed_pulls: bool,
}

impl<R: ContainerRuntime> Reconciler<R> {
    pub fn new(runtime: R, config: ReconcilerConfig, report: watch::Sender<Report>) -> Self {
        let (pull_tx, pull_rx) = mpsc::channel(64);
        Self {
            runtime,
            events: EventRing::new(config.event_capacity),
            config,
            seen: BTreeSet::new(),
            failures: BTreeMap::new(),
            previous_retry: BTreeMap::new(),
            phases: BTreeMap::new(),
            images: ImageTracker::default(),
            restarts: RestartBook::default(),
            runtime_status: RuntimeStatus {
                state: RuntimeState::Starting,
                message: None,
            },
            runtime_reached: false,
            reported_invalid_keys: BTreeSet::new(),
            report,
            published: None,
            pull_tx,
            pull_rx,
            metrics: Arc::new(AgentMetrics::default()),
            unflushed_pulls: false,
        }
    }

    /// Waits (briefly) for the reporter to publish before a restore, so the moment a
    /// container is missing is visible in status, not only the restore counter.
    pub fn with_published(mut self, published: watch::Receiver<u64>) -> Self {
        self.published = Some(published);
        self
    }

    pub fn with_metrics(mut self, metrics: Arc<AgentMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn runtime(&self) -> &R {
        &self.runtime
    }

    fn device(&self) -> &Id {
        &self.config.device
    }

    /// The next finished background pull. Cancel-safe: use it in `select!`.
    pub async fn next_pull(&mut self) -> Option<PullOutcome> {
        self.pull_rx.recv().await
    }

    /// Records a finished pull; the caller runs a pass next.
    pub fn pull_finished(&mut self, outcome: PullOutcome) {
        match &outcome.result {
            Ok(took) => {
                tracing::info!(image = %outcome.image, took = ?took, "pulled image");
                self.unflushed_pulls = true;
                self.metrics.pulls.get_or_create(&crate::metrics::result("ok")).inc();
                self.event(Severity::Info, None, format!("pulled image {}", outcome.image));
            }
            Err(e) => {
                tracing::warn!(image = %outcome.image, error = %e, "pull failed");
                self.metrics.pulls.get_or_create(&crate::metrics::result("error")).inc();
            }
        }
        self.images.finished(&outcome, Instant::now());
    }

    /// Records what the runtime's event stream said. Events only count restarts here;
    /// the caller runs a pass to look at the containers again.
    pub fn runtime_event(&mut self, ev: &RuntimeEvent) {
        let Some(dep) = &ev.deployment else { return };
        match ev.kind {
            RuntimeEventKind::Restarted => {
                self.restarts.restarted(dep, Instant::now());
                self.metrics.restarts.inc();
            }
            RuntimeEventKind::Died { exit_code } => self.restarts.died(dep, exit_code),
            RuntimeEventKind::Removed | RuntimeEventKind::Paused | RuntimeEventKind::Other(_) => {}
        }
    }

    /// Ready means: the desired state was read in full, and the runtime answers.
    pub fn readiness(&self, view: &DesiredView) -> Result<(), String> {
        if !view.synced {
            return Err("desired state not read from NATS yet".into());
        }
        match self.runtime_status.state {
            RuntimeState::Available => Ok(()),
            _ => Err(self
                .runtime_status
                .message
                .clone()
                .unwrap_or_else(|| "container runtime not reached yet".into())),
        }
    }

    /// One level-triggered pass over the whole desired state.
    #[tracing::instrument(skip_all, fields(device = %self.config.device, deployments = view.entries.len()))]
    pub async fn reconcile(&mut self, view: &DesiredView) -> PassSummary {
        self.metrics.passes.inc();
        let desired = interpret_all(&view.entries);
        self.metrics.deployments.set(desired.len() as i64);
        for key in &view.invalid_keys {
            if self.reported_invalid_keys.insert(key.clone()) {
                self.event(
                    Severity::Warning,
                    None,
                    format!("ignoring desired-state key {key:?}: expected <device>.<namespace>_<name>"),
                );
            }
        }
        let wanted_images: BTreeSet<&str> = desired
            .values()
            .filter_map(|c| match c {
                DesiredContent::Valid { services, .. } => Some(services.iter().map(|s| s.image.as_str())),
                DesiredContent::Invalid { .. } => None,
            })
            .flatten()
            .collect();
        self.images.retain(&wanted_images);
        self.restarts.retain(|d| desired.contains_key(d));

        let mut summary = PassSummary::default();
        let mut errors: BTreeMap<DeploymentRef, Vec<String>> = BTreeMap::new();
        let mut rolled_back: BTreeSet<DeploymentRef> = BTreeSet::new();
        let mut backing_off = BTreeSet::new();
        let mut present: BTreeSet<String> = BTreeSet::new();
        let mut observed = Vec::new();
        // A second round runs only when images were found on the device in the first,
        // so their creates happen in this pass instead of the next. It lists the
        // containers again only if the first round changed any.
        for round in 0..2 {
            if round == 0 || summary.executed > 0 {
                observed = match self.observe(&desired).await {
                    Some(o) => o,
                    None => return summary,
                };
            }
            let now = Instant::now();
            let backing = self.backing_off(&desired, now);
            let images = self.images.planner_view(&present, now);
            let planned = plan(PlanInput {
                device: self.device(),
                desired: &desired,
                observed: &observed,
                synced: view.synced,
                seen: &self.seen,
                images: &images,
                on_hold: &backing,
            });
            self.announce_restores(&planned, &desired, &backing).await;
            let mut found = false;
            for action in &planned.actions {
                if let Some(dep) = action.deployment() {
                    if let Action::StartPrevious { .. } = action {
                        // Not held by the upgrade's backoff, only by its own.
                        if self.previous_retry.get(dep).is_some_and(|(_, at)| *at > now) {
                            continue;
                        }
                    } else if backing.contains(dep) {
                        backing_off.insert(dep.clone());
                        summary.skipped_backoff += 1;
                        continue;
                    }
                    // Failed earlier in this pass: the next attempt waits for its backoff.
                    if errors.contains_key(dep) {
                        continue;
                    }
                }
                if let Action::EnsureImage { image, deployments } = action {
                    match self.ensure_image(image).await {
                        Ok(true) => {
                            present.insert(image.clone());
                            found = true;
                        }
                        Ok(false) => summary.pulls_started += 1,
                        Err(e) => {
                            for dep in deployments {
                                errors.entry(dep.clone()).or_default().push(e.clone());
                            }
                        }
                    }
                    continue;
                }
                summary.executed += 1;
                if let Action::StartPrevious { deployment, .. } = action {
                    // Its failure is reported as an event and retried on its own
                    // backoff; the deployment's phase stays what the upgrade says.
                    let failed = self.execute(action).await.is_err();
                    self.previous_started(deployment, failed, now);
                    summary.failed += usize::from(failed);
                    continue;
                }
                if let Err(f) = self.execute(action).await {
                    summary.failed += 1;
                    if let Some(dep) = action.deployment() {
                        errors.entry(dep.clone()).or_default().push(f.error);
                        if f.rolled_back {
                            rolled_back.insert(dep.clone());
                        }
                    }
                }
            }
            if !found {
                break;
            }
        }

        // Changes and finished pulls are flushed before they are reported, so what a
        // report says the device runs survives a power cut.
        let pulled = std::mem::take(&mut self.unflushed_pulls);
        if summary.executed > 0 || pulled {
            self.runtime.flush_to_disk().await;
        }
        // Look again so phases reflect what podman really has, not what we hoped,
        // and what the pulls started in this pass are doing.
        if summary.executed > 0 {
            observed = match self.observe(&desired).await {
                Some(o) => o,
                None => return summary,
            };
        }
        let now = Instant::now();
        let images = self.images.planner_view(&present, now);
        let backing = self.backing_off(&desired, now);
        let assessments = plan(PlanInput {
            device: self.device(),
            desired: &desired,
            observed: &observed,
            synced: view.synced,
            seen: &self.seen,
            images: &images,
            on_hold: &backing,
        })
        .assessments;
        // A deployment on hold that is not converged stays Failed with the error
        // that put it there, whether its actions were skipped or not planned.
        for dep in &backing {
            if !matches!(assessments.get(dep), Some(Assessment::Converged)) {
                backing_off.insert(dep.clone());
            }
        }

        self.update_phases(&desired, &assessments, &errors, &rolled_back, &backing_off);
        self.publish(Some(Utc::now()));
        summary
    }

    /// Deployments whose last attempt at their current spec failed and whose retry
    /// is not due yet.
    fn backing_off(&self, desired: &BTreeMap<DeploymentRef, DesiredContent>, now: Instant) -> BTreeSet<DeploymentRef> {
        self.failures
            .iter()
            .filter(|(dep, f)| {
                f.retry_at > now && f.spec_hash.as_ref() == desired.get(*dep).and_then(DesiredContent::spec_hash)
            })
            .map(|(dep, _)| dep.clone())
            .collect()
    }

    /// Records how starting a previous version went: a failure waits 1 s, doubling
    /// to 60 s, before the next try (podman's events would otherwise trigger the
    /// next pass, and the next try, at once).
    fn previous_started(&mut self, dep: &DeploymentRef, failed: bool, now: Instant) {
        if failed {
            let attempts = self.previous_retry.get(dep).map_or(1, |(n, _)| n + 1);
            self.previous_retry
                .insert(dep.clone(), (attempts, now + failure_backoff(attempts)));
        } else {
            self.previous_retry.remove(dep);
        }
    }

    /// Lists the device's containers. When the runtime does not answer, every phase
    /// says so: the device cannot vouch for containers it cannot see.
    async fn observe(&mut self, desired: &BTreeMap<DeploymentRef, DesiredContent>) -> Option<Vec<ObservedContainer>> {
        match self.runtime.list(self.device()).await {
            Ok(observed) => {
                let was = std::mem::replace(
                    &mut self.runtime_status,
                    RuntimeStatus {
                        state: RuntimeState::Available,
                        message: None,
                    },
                );
                if was.state == RuntimeState::Unavailable {
                    tracing::info!("container runtime reachable again");
                    self.event(Severity::Info, None, "container runtime reachable again".into());
                } else if !self.runtime_reached {
                    tracing::info!(runtime = %self.config.runtime_name, "container runtime reachable");
                }
                self.runtime_reached = true;
                for c in &observed {
                    if let (Some(dep), crate::runtime::ContainerState::Running) = (&c.deployment, &c.state) {
                        self.seen.insert((dep.clone(), c.service.clone()));
                    }
                }
                Some(observed)
            }
            Err(e) => {
                self.runtime_unavailable(desired, &e);
                None
            }
        }
    }

    fn runtime_unavailable(&mut self, desired: &BTreeMap<DeploymentRef, DesiredContent>, error: &RuntimeError) {
        let error = clean(error);
        if !self.runtime_reached {
            // Booting: podman's socket often appears after the agent starts.
            let message = format!(
                "waiting for the container runtime at {}: {error}",
                self.config.runtime_name
            );
            if self.runtime_status.state != RuntimeState::Starting || self.runtime_status.message.is_none() {
                tracing::info!(runtime = %self.config.runtime_name, error = %error, "waiting for the container runtime");
            }
            self.runtime_status = RuntimeStatus {
                state: RuntimeState::Starting,
                message: Some(message),
            };
            for (dep, content) in desired {
                self.set_phase(
                    dep,
                    Phase::Pending,
                    content.spec_hash().cloned(),
                    None,
                    Some("waiting for the container runtime".into()),
                );
            }
        } else {
            let message = format!("container runtime unavailable: {error}");
            if self.runtime_status.state != RuntimeState::Unavailable {
                tracing::warn!(error = %error, "container runtime unavailable; will retry on the next pass");
                self.event(Severity::Error, None, message.clone());
            }
            self.runtime_status = RuntimeStatus {
                state: RuntimeState::Unavailable,
                message: Some(message.clone()),
            };
            for (dep, content) in desired {
                self.set_phase(
                    dep,
                    Phase::Failed,
                    content.spec_hash().cloned(),
                    Some(message.clone()),
                    None,
                );
            }
        }
        self.phases.retain(|d, _| desired.contains_key(d));
        self.publish(None);
    }

    /// Before re-creating containers removed out of band, report those deployments as
    /// not running and give the reporter a moment to publish that.
    async fn announce_restores(
        &mut self,
        planned: &crate::plan::Plan,
        desired: &BTreeMap<DeploymentRef, DesiredContent>,
        backing_off: &BTreeSet<DeploymentRef>,
    ) {
        let restoring: BTreeSet<DeploymentRef> = planned
            .restoring()
            .filter(|d| !backing_off.contains(*d))
            .cloned()
            .collect();
        if restoring.is_empty() {
            return;
        }
        for dep in &restoring {
            let note = match planned.assessments.get(dep) {
                Some(Assessment::InProgress(Some(note))) => note.clone(),
                _ => "restoring a container removed outside the agent".to_owned(),
            };
            let hash = desired.get(dep).and_then(DesiredContent::spec_hash).cloned();
            self.set_phase(dep, Phase::Pending, hash, None, Some(note));
        }
        let revision = self.publish(None);
        if let Some(published) = &mut self.published {
            let waited = tokio::time::timeout(Duration::from_secs(2), published.wait_for(|p| *p >= revision)).await;
            if waited.is_err() {
                tracing::debug!("status not published before the restore (NATS slow or down)");
            }
        }
    }

    /// Whether `image` is on the device; if not, starts a background pull.
    async fn ensure_image(&mut self, image: &str) -> Result<bool, String> {
        if self.images.in_flight(image) {
            return Ok(false);
        }
        match self.runtime.image_present(image).await {
            Ok(true) => Ok(true),
            Ok(false) if self.images.just_pulled(image, Instant::now()) => {
                let error = format!("image {image} was pulled, but podman does not find it under that name");
                tracing::warn!(image, "{error}");
                self.images.failed(image, error.clone(), Instant::now());
                Err(error)
            }
            Ok(false) => {
                tracing::info!(image, "image not on the device; pulling in the background");
                self.event(Severity::Info, None, format!("pulling image {image}"));
                self.images.started(image);
                let runtime = self.runtime.clone();
                let tx = self.pull_tx.clone();
                let image = image.to_owned();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let result = runtime.pull(&image).await.map(|()| started.elapsed()).map_err(|e| {
                        format!(
                            "image {image} is not on the device and pulling it failed: {}",
                            clean(&e)
                        )
                    });
                    // The receiver only goes away when the agent stops.
                    if tx.send(PullOutcome { image, result }).await.is_err() {
                        tracing::debug!("pull finished after the reconciler stopped");
                    }
                });
                Ok(false)
            }
            Err(e) => Err(format!("checking image {image}: {}", clean(&e))),
        }
    }

    async fn execute(&mut self, action: &Action) -> Result<(), ReplaceFailure> {
        let kind = action_kind(action);
        let result = self.execute_inner(action).await;
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .actions
            .get_or_create(&crate::metrics::action(kind, label))
            .inc();
        if let Err(f) = &result {
            tracing::warn!(deployment = ?action.deployment().map(ToString::to_string), action = kind, error = %f.error, "action failed");
        }
        result
    }

    async fn execute_inner(&mut self, action: &Action) -> Result<(), ReplaceFailure> {
        let fail = |error: String| ReplaceFailure {
            error,
            rolled_back: false,
        };
        match action {
            Action::EnsureImage { .. } => Ok(()),
            Action::Remove {
                deployment,
                container_id,
                name,
                cause,
            } => match self.runtime.remove(container_id).await {
                Ok(()) => {
                    let shown = shown(name, self.device());
                    let (severity, why) = match cause {
                        RemoveCause::DeploymentDeleted => (Severity::Info, "deployment deleted"),
                        RemoveCause::SpecChanged => (Severity::Info, "spec changed"),
                        RemoveCause::Duplicate => (Severity::Warning, "duplicate of another container"),
                        RemoveCause::UnknownDeployment => (Severity::Warning, "unreadable deployment label"),
                    };
                    tracing::info!(container = %name, reason = why, "removed container");
                    self.event(
                        severity,
                        deployment.clone(),
                        format!("removed container {shown}: {why}"),
                    );
                    if let Some(dep) = deployment
                        && *cause == RemoveCause::DeploymentDeleted
                    {
                        self.seen.retain(|(d, _)| d != dep);
                    }
                    Ok(())
                }
                Err(e) => Err(fail(format!(
                    "removing container {} failed: {}",
                    shown(name, self.device()),
                    clean(&e)
                ))),
            },
            Action::Create { spec, cause } => {
                let id = self.create_and_start(spec).await.map_err(fail)?;
                let short = short(&id);
                let shown = shown(&spec.name, self.device());
                let (severity, msg) = match cause {
                    CreateCause::New => (
                        Severity::Info,
                        format!("created container {shown} ({})", spec.service.image),
                    ),
                    CreateCause::Restore => {
                        self.restarts.restored(&spec.deployment, Instant::now());
                        self.metrics.restores.inc();
                        (
                            Severity::Warning,
                            format!("restored container {shown}, which was removed outside the agent"),
                        )
                    }
                };
                tracing::info!(container = %spec.name, cause = ?cause, id = %short, "created container");
                self.event(severity, Some(spec.deployment.clone()), msg);
                self.seen.insert((spec.deployment.clone(), spec.service.name.clone()));
                Ok(())
            }
            Action::Replace { .. } | Action::FinishReplace { .. } => {
                let (spec, id) = match action {
                    Action::Replace { spec, old, stop_first } => {
                        let id = self.replace(spec, old, *stop_first).await?;
                        (spec, id)
                    }
                    Action::FinishReplace { spec, new, old } => {
                        self.finish_replace(spec, new, old).await?;
                        (spec, new.id.clone())
                    }
                    _ => return Ok(()),
                };
                tracing::info!(container = %spec.name, id = %short(&id), "replaced container");
                self.event(
                    Severity::Info,
                    Some(spec.deployment.clone()),
                    format!(
                        "replaced service {} with spec {} ({})",
                        spec.service.name, spec.spec_hash, spec.service.image
                    ),
                );
                self.restarts.reset(&spec.deployment);
                self.seen.insert((spec.deployment.clone(), spec.service.name.clone()));
                Ok(())
            }
            Action::Start {
                deployment,
                container_id,
                name,
                exit_code,
            } => match self.runtime.start(container_id).await {
                Ok(()) => {
                    let shown = shown(name, self.device());
                    let (severity, msg) = match exit_code {
                        Some(code) => {
                            self.restarts.died(deployment, Some(*code));
                            self.restarts.restarted(deployment, Instant::now());
                            self.metrics.restarts.inc();
                            (
                                Severity::Warning,
                                format!("restarted container {shown}, which had stopped (exit code {code})"),
                            )
                        }
                        None => (Severity::Info, format!("started container {shown}")),
                    };
                    tracing::info!(container = %name, "started container");
                    self.event(severity, Some(deployment.clone()), msg);
                    Ok(())
                }
                Err(e) => Err(fail(format!(
                    "starting container {} failed: {}",
                    shown(name, self.device()),
                    clean(&e)
                ))),
            },
            Action::StartPrevious {
                deployment,
                container_id,
                name,
                exit_code,
            } => match self.runtime.start(container_id).await {
                Ok(()) => {
                    if let Some(code) = exit_code {
                        self.restarts.died(deployment, Some(*code));
                    }
                    self.restarts.restarted(deployment, Instant::now());
                    self.metrics.restarts.inc();
                    let shown = shown(name, self.device());
                    let how = exit_code.map(|c| format!(" (exit code {c})")).unwrap_or_default();
                    tracing::info!(container = %name, "started the previous version while its upgrade waits");
                    self.event(
                        Severity::Warning,
                        Some(deployment.clone()),
                        format!(
                            "restarted container {shown} of the previous version, which had stopped{how}: it serves until the upgrade succeeds"
                        ),
                    );
                    Ok(())
                }
                Err(e) => {
                    let error = format!(
                        "starting container {} of the previous version failed: {}",
                        shown(name, self.device()),
                        clean(&e)
                    );
                    self.event(Severity::Error, Some(deployment.clone()), error.clone());
                    Err(fail(error))
                }
            },
            Action::Unpause {
                deployment,
                container_id,
                name,
            } => match self.runtime.unpause(container_id).await {
                Ok(()) => {
                    tracing::info!(container = %name, "unpaused container");
                    self.event(
                        Severity::Warning,
                        Some(deployment.clone()),
                        format!(
                            "unpaused container {}, which was paused outside the agent",
                            shown(name, self.device())
                        ),
                    );
                    Ok(())
                }
                Err(e) => Err(fail(format!(
                    "unpausing container {} failed: {}",
                    shown(name, self.device()),
                    clean(&e)
                ))),
            },
        }
    }

    /// Creates and starts a container. A container that was created but failed to
    /// start is removed again: the next attempt creates it afresh, and nothing holds
    /// its name meanwhile.
    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, String> {
        let svc = &spec.service.name;
        let id = self
            .runtime
            .create(spec)
            .await
            .map_err(|e| format!("service {svc}: creating the container failed: {}", clean(&e)))?;
        if let Err(e) = self.runtime.start(&id).await {
            if let Err(re) = self.runtime.remove(&id).await {
                tracing::warn!(container = %spec.name, error = %re, "could not remove a container that failed to start");
            }
            return Err(format!("service {svc}: the container failed to start: {}", clean(&e)));
        }
        Ok(id)
    }

    /// Brings the new container up before the old one goes; see [`Action::Replace`].
    async fn replace(
        &mut self,
        spec: &ContainerSpec,
        old: &[OldContainer],
        stop_first: bool,
    ) -> Result<String, ReplaceFailure> {
        let svc = &spec.service.name;
        let mut stopped: Vec<&OldContainer> = Vec::new();
        if stop_first {
            for o in old.iter().filter(|o| o.running) {
                if let Err(e) = self.runtime.stop(&o.id).await {
                    let restarted = self.restart_old(&stopped).await;
                    return Err(ReplaceFailure {
                        error: format!(
                            "service {svc}: stopping the previous container failed: {}{}",
                            clean(&e),
                            restarted.err().unwrap_or_default()
                        ),
                        rolled_back: false,
                    });
                }
                stopped.push(o);
            }
        }
        match self.create_and_start(spec).await {
            Ok(id) => self.settle_or_roll_back(spec, &id, old, &stopped).await.map(|()| id),
            Err(error) => {
                let restarted = self.restart_old(&stopped).await;
                Err(self.rollback_failure(spec, &error, old, &stopped, restarted))
            }
        }
    }

    /// The new container `id` must pass the settle check; then the old ones go. If it
    /// fails, it goes and the `stopped` old ones run again.
    async fn settle_or_roll_back(
        &mut self,
        spec: &ContainerSpec,
        id: &str,
        old: &[OldContainer],
        stopped: &[&OldContainer],
    ) -> Result<(), ReplaceFailure> {
        match self.settled(spec, id).await {
            Ok(()) => {
                for o in old {
                    if let Err(e) = self.runtime.remove(&o.id).await {
                        // The next pass finishes the replacement.
                        tracing::warn!(container = %o.name, error = %e, "could not remove the replaced container");
                    }
                }
                Ok(())
            }
            Err(error) => {
                if let Err(e) = self.runtime.remove(id).await {
                    // The next pass sees it next to the old one and settles it again.
                    tracing::warn!(container = %spec.name, error = %e, "could not remove the failed replacement");
                }
                let restarted = self.restart_old(stopped).await;
                Err(self.rollback_failure(spec, &error, old, stopped, restarted))
            }
        }
    }

    /// Finishes a replacement an earlier pass left half done: see
    /// [`Action::FinishReplace`]. Old containers that are not running (stopped for
    /// their ports when the agent went away) are started again on failure.
    async fn finish_replace(
        &mut self,
        spec: &ContainerSpec,
        new: &OldContainer,
        old: &[OldContainer],
    ) -> Result<(), ReplaceFailure> {
        let stopped: Vec<&OldContainer> = old.iter().filter(|o| !o.running).collect();
        if !new.running
            && let Err(e) = self.runtime.start(&new.id).await
        {
            tracing::debug!(container = %new.name, error = %e, "the interrupted replacement does not start");
        }
        self.settle_or_roll_back(spec, &new.id, old, &stopped).await
    }

    fn rollback_failure(
        &self,
        spec: &ContainerSpec,
        error: &str,
        old: &[OldContainer],
        stopped: &[&OldContainer],
        restarted: Result<(), String>,
    ) -> ReplaceFailure {
        let (kept, rolled_back) = match restarted {
            Err(why) => (why, false),
            Ok(()) if old.iter().any(|o| o.running) || !stopped.is_empty() => {
                ("; the previous version keeps running".to_owned(), !stopped.is_empty())
            }
            Ok(()) => (String::new(), false),
        };
        ReplaceFailure {
            error: format!("upgrade to spec {} failed: {error}{kept}", spec.spec_hash),
            rolled_back,
        }
    }

    /// Starts the old containers again; on failure, says so in a form that can be
    /// appended to the error.
    async fn restart_old(&self, stopped: &[&OldContainer]) -> Result<(), String> {
        let mut failed = Vec::new();
        for o in stopped {
            if let Err(e) = self.runtime.start(&o.id).await {
                tracing::error!(container = %o.name, error = %e, "could not restart the previous container after a failed upgrade");
                failed.push(clean(&e));
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "; restarting the previous version failed too: {}",
                failed.join("; ")
            ))
        }
    }

    /// A replacement must still be up after the settle time, without restarts,
    /// before the old container goes. A clean exit of a service that is allowed to
    /// finish (restart policy OnFailure or Never) counts as up.
    async fn settled(&self, spec: &ContainerSpec, id: &str) -> Result<(), String> {
        if self.config.settle.is_zero() {
            return Ok(());
        }
        tokio::time::sleep(self.config.settle).await;
        let svc = &spec.service.name;
        let h = self
            .runtime
            .health(id)
            .await
            .map_err(|e| format!("service {svc}: cannot inspect the new container: {}", clean(&e)))?;
        let finished_cleanly = !h.running && h.exit_code == 0 && spec.service.restart_policy != RestartPolicy::Always;
        if (h.running && h.restart_count == 0) || finished_cleanly {
            return Ok(());
        }
        let settle = humantime::format_duration(self.config.settle);
        if h.running {
            // Restarted by podman's policy; inspect shows the current run, whose exit
            // code is not known yet, so none is claimed.
            Err(format!(
                "service {svc}: the new container kept exiting and being restarted within {settle}"
            ))
        } else {
            Err(format!(
                "service {svc}: the new container exited with code {} within {settle}",
                h.exit_code
            ))
        }
    }

    fn update_phases(
        &mut self,
        desired: &BTreeMap<DeploymentRef, DesiredContent>,
        assessments: &BTreeMap<DeploymentRef, Assessment>,
        errors: &BTreeMap<DeploymentRef, Vec<String>>,
        rolled_back: &BTreeSet<DeploymentRef>,
        backing_off: &BTreeSet<DeploymentRef>,
    ) {
        let now = Instant::now();
        self.phases.retain(|dep, _| desired.contains_key(dep));
        self.failures.retain(|dep, _| desired.contains_key(dep));
        self.previous_retry.retain(|dep, _| desired.contains_key(dep));
        for (dep, content) in desired {
            let spec_hash = content.spec_hash().cloned();
            let (phase, error, detail) = if let Some(errs) = errors.get(dep) {
                let error = errs.join("; ");
                let attempts = match self.failures.get(dep) {
                    Some(f) if f.spec_hash == spec_hash => f.attempts + 1,
                    _ => 1,
                };
                // After a rolled-back upgrade retries wait longer: each retry of a
                // service with host ports briefly stops the version that works.
                let delay = if rolled_back.contains(dep) {
                    rollback_backoff(attempts)
                } else {
                    failure_backoff(attempts)
                };
                self.failures.insert(
                    dep.clone(),
                    Failure {
                        spec_hash: spec_hash.clone(),
                        attempts,
                        retry_at: now + delay,
                        error: error.clone(),
                    },
                );
                (Phase::Failed, Some(error), None)
            } else if backing_off.contains(dep) {
                let error = self.failures.get(dep).map(|f| f.error.clone());
                (Phase::Failed, error, None)
            } else {
                match assessments.get(dep) {
                    Some(Assessment::Invalid(e) | Assessment::Stopped(e) | Assessment::ImageUnavailable(e)) => {
                        (Phase::Failed, Some(e.clone()), None)
                    }
                    Some(Assessment::Converged) => {
                        self.failures.remove(dep);
                        (Phase::Running, None, None)
                    }
                    Some(Assessment::InProgress(note)) => (Phase::Pending, None, note.clone()),
                    None => (Phase::Pending, None, None),
                }
            };
            // A service that keeps dying is not healthy, whatever this instant shows.
            let (phase, error) = match self.restarts.crash_loop(dep, now) {
                Some(why) if phase != Phase::Failed => (Phase::Failed, Some(why)),
                _ => (phase, error),
            };
            self.set_phase(dep, phase, spec_hash, error, detail);
        }
    }

    fn set_phase(
        &mut self,
        dep: &DeploymentRef,
        phase: Phase,
        spec_hash: Option<SpecHash>,
        error: Option<String>,
        detail: Option<String>,
    ) {
        let counts = self.restarts.counts(dep, Instant::now());
        let previous = self.phases.get(dep);
        let changed = !previous.is_some_and(|p| p.phase == phase && p.spec_hash == spec_hash && p.last_error == error);
        let before = previous.map(|p| p.phase);
        let last_event_at = match previous {
            Some(p) if !changed => p.last_event_at,
            _ => Utc::now(),
        };
        if changed {
            tracing::info!(deployment = %dep, ?phase, ?before, error = error.as_deref().unwrap_or(""), "deployment phase");
            match (&phase, &error) {
                (Phase::Failed, Some(e)) => self.event(Severity::Error, Some(dep.clone()), e.clone()),
                (Phase::Running, _) if before != Some(Phase::Running) => self.event(
                    Severity::Info,
                    Some(dep.clone()),
                    format!(
                        "running spec {}",
                        spec_hash.as_ref().map(SpecHash::as_str).unwrap_or("?")
                    ),
                ),
                _ => {}
            }
        }
        self.phases.insert(
            dep.clone(),
            DeploymentPhase {
                phase,
                spec_hash,
                last_error: error,
                last_event_at,
                detail,
                restarts: counts.restarts,
                restores: counts.restores,
                recent_restarts: counts.recent,
            },
        );
    }

    fn event(&mut self, severity: Severity, deployment: Option<DeploymentRef>, message: String) {
        self.events.push(EventEntry {
            at: Utc::now(),
            severity,
            deployment,
            message,
        });
    }

    /// Hands the current state to the reporter; returns the report's revision. A
    /// change other than `last_reconcile_at` bumps the revision and wakes the reporter.
    fn publish(&self, reconciled_at: Option<DateTime<Utc>>) -> u64 {
        let mut revision = 0;
        self.report.send_if_modified(|current| {
            let last_reconcile_at = reconciled_at.or(current.last_reconcile_at);
            let same = current.deployments == self.phases
                && current.events == self.events.to_vec()
                && current.runtime == self.runtime_status;
            current.last_reconcile_at = last_reconcile_at;
            if same {
                revision = current.revision;
                return false;
            }
            current.deployments = self.phases.clone();
            current.events = self.events.to_vec();
            current.runtime = self.runtime_status.clone();
            current.revision += 1;
            revision = current.revision;
            true
        });
        revision
    }
}

fn action_kind(action: &Action) -> &'static str {
    match action {
        Action::Remove { .. } => "remove",
        Action::EnsureImage { .. } => "ensure_image",
        Action::Create { .. } => "create",
        Action::Replace { .. } | Action::FinishReplace { .. } => "replace",
        Action::Start { .. } => "start",
        Action::StartPrevious { .. } => "start_previous",
        Action::Unpause { .. } => "unpause",
    }
}

/// A runtime's message without the tokens that differ per device and attempt
/// (container ids, timestamps, durations), so the same failure reads the same on
/// every device. Our own wording around it is stable already.
fn clean(e: &RuntimeError) -> String {
    normalize_error(&e.0, None)
}

/// A container name without the device id it starts with: the same on every device,
/// and the device is known from where the report comes from.
fn shown<'a>(name: &'a str, device: &Id) -> &'a str {
    name.strip_prefix(device.as_str())
        .and_then(|rest| rest.strip_prefix('.'))
        .unwrap_or(name)
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
