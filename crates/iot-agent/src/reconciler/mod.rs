//! The thin, stateful executor around the pure planner.
//!
//! One pass: decode desired state, list containers, plan, execute, look again, and
//! derive each deployment's phase from what is really there. State kept between
//! passes is only what cannot be observed: which services were seen before (to
//! recognise out-of-band removals), per-deployment retry backoff, image pulls in
//! flight, restart accounting, and the event ring.
//!
//! This module runs the pass; its parts live next to it:
//! - [`execute`]: carrying out actions, and the image gate before creates;
//! - [`replace`]: replace, settle, roll back;
//! - [`status`]: phases, events and the hand-over to the reporter, with the pure
//!   [`phase::derive_phase`];
//! - [`retry`]: the pure backoff bookkeeping.

mod execute;
pub mod phase;
pub mod prune;
mod replace;
pub mod retry;
mod status;

pub use retry::{failure_backoff, rollback_backoff};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use harmony_reconciler_contracts::text::normalize_error;
use harmony_reconciler_contracts::{
    DeploymentPhase, DeploymentRef, EventEntry, EventRing, Id, Phase, RuntimeState, RuntimeStatus, Severity,
};
use iot_nats::DesiredView;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::decode::decode_all;
use crate::images::{ImageTracker, PullCounts, PullMessage, PullOutcome};
use crate::metrics::AgentMetrics;
use crate::plan::{Action, Assessment, DesiredContent, PlanInput, plan};
use crate::restarts::RestartBook;
use crate::runtime::{ContainerRuntime, ObservedContainer, RuntimeError, RuntimeEvent, RuntimeEventKind};

/// Least time between two status publishes caused by pull progress alone.
pub const PROGRESS_PUBLISH_GAP: Duration = Duration::from_secs(2);

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
    retries: retry::RetryBook,
    phases: BTreeMap<DeploymentRef, DeploymentPhase>,
    events: EventRing,
    images: ImageTracker,
    restarts: RestartBook,
    /// Replacements removed after they failed to settle: the runtime's restart
    /// events about them (some arrive after the removal) are not the deployment's
    /// restarts, which the previous version, kept running, would be blamed for.
    failed_replacements: std::collections::VecDeque<String>,
    runtime_status: RuntimeStatus,
    /// The runtime answered at least once since the agent started.
    runtime_reached: bool,
    /// Malformed keys under this device's prefix already reported as events.
    reported_invalid_keys: BTreeSet<String>,
    report: watch::Sender<Report>,
    /// The revision the reporter last published, when a reporter is attached.
    published: Option<watch::Receiver<u64>>,
    pull_tx: mpsc::Sender<PullMessage>,
    pull_rx: mpsc::Receiver<PullMessage>,
    /// The images of each desired deployment, as of the last pass: which
    /// deployments a pull's progress belongs to.
    images_of: BTreeMap<DeploymentRef, BTreeSet<String>>,
    /// When pull progress last went to the reporter on its own (not with a pass).
    progress_published: Option<Instant>,
    metrics: Arc<AgentMetrics>,
    /// Containers changed or a pull finished since the last flush to disk.
    unflushed: bool,
    /// When image pruning is due ([`prune`]): at the first pass that read the
    /// desired state in full, after a completed replacement, and a while after a
    /// removal failed. `None`: nothing to do.
    prune_due: Option<Instant>,
}

/// How long after a failed image removal pruning runs again.
pub const PRUNE_RETRY: Duration = Duration::from_secs(600);

impl<R: ContainerRuntime> Reconciler<R> {
    pub fn new(runtime: R, config: ReconcilerConfig, report: watch::Sender<Report>) -> Self {
        let (pull_tx, pull_rx) = mpsc::channel(64);
        Self {
            runtime,
            events: EventRing::new(config.event_capacity),
            config,
            seen: BTreeSet::new(),
            retries: retry::RetryBook::default(),
            phases: BTreeMap::new(),
            images: ImageTracker::default(),
            restarts: RestartBook::default(),
            failed_replacements: std::collections::VecDeque::new(),
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
            images_of: BTreeMap::new(),
            progress_published: None,
            metrics: Arc::new(AgentMetrics::default()),
            unflushed: false,
            prune_due: Some(Instant::now()),
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

    /// The next finished background pull; the progress of pulls that arrives on
    /// the way is recorded. Cancel-safe: use it in `select!`.
    pub async fn next_pull(&mut self) -> Option<PullOutcome> {
        loop {
            match self.pull_rx.recv().await? {
                PullMessage::Progress { image, counts } => self.pull_progress(&image, counts),
                PullMessage::Finished(outcome) => return Some(outcome),
            }
        }
    }

    /// Records how far a pull got. The deployments waiting for it show that in
    /// their status; progress alone reaches the reporter at most once per
    /// [`PROGRESS_PUBLISH_GAP`] (podman reports every layer once a second), through
    /// the same report revision as every other change.
    pub fn pull_progress(&mut self, image: &str, counts: PullCounts) {
        if !self.images.progress(image, counts) {
            return;
        }
        let now = Instant::now();
        if self
            .progress_published
            .is_some_and(|t| now.duration_since(t) < PROGRESS_PUBLISH_GAP)
        {
            return;
        }
        self.progress_published = Some(now);
        self.refresh_pulls(now);
        self.publish(None);
    }

    /// Records a finished pull; the caller runs a pass next.
    pub fn pull_finished(&mut self, outcome: PullOutcome) {
        match &outcome.result {
            Ok(took) => {
                tracing::info!(image = %outcome.image, took = ?took, "pulled image");
                self.unflushed = true;
                self.metrics.pulls.get_or_create(&crate::metrics::result("ok")).inc();
                self.event(Severity::Info, None, format!("pulled image {}", outcome.image));
            }
            Err(e) => {
                tracing::warn!(image = %outcome.image, kind = e.kind(), error = %e, "pull failed");
                self.metrics.pulls.get_or_create(&crate::metrics::result("error")).inc();
            }
        }
        self.images.finished(&outcome, Instant::now());
    }

    /// Records what the runtime's event stream said. Events only count restarts here;
    /// the caller runs a pass to look at the containers again.
    pub fn runtime_event(&mut self, ev: &RuntimeEvent) {
        let Some(dep) = &ev.deployment else { return };
        if self.failed_replacements.contains(&ev.container_id) {
            return;
        }
        match ev.kind {
            RuntimeEventKind::Restarted => {
                self.restarts.restarted(dep, Instant::now());
                self.metrics.restarts.inc();
            }
            RuntimeEventKind::Died { exit_code } => self.restarts.died(dep, exit_code),
            RuntimeEventKind::Removed | RuntimeEventKind::Paused | RuntimeEventKind::Other(_) => {}
        }
    }

    /// A replacement that failed to settle was removed: its restarts so far were its
    /// own, not the deployment's, and so are any still on their way.
    fn forget_failed_replacement(&mut self, deployment: &DeploymentRef, container_id: &str) {
        const KEPT: usize = 16;
        if self.failed_replacements.len() == KEPT {
            self.failed_replacements.pop_front();
        }
        self.failed_replacements.push_back(container_id.to_owned());
        self.restarts.reset(deployment);
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
        let desired = decode_all(&view.entries);
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
                    None => {
                        self.flush_if_changed().await;
                        return summary;
                    }
                };
            }
            let now = Instant::now();
            let (planned, backing) = self.plan_now(&desired, &observed, view.synced, &present, now);
            self.announce_restores(&planned, &desired, &backing).await;
            let mut found = false;
            for action in &planned.actions {
                if let Some(dep) = action.deployment() {
                    if let Action::StartPrevious { .. } = action {
                        // Not held by the upgrade's backoff, only by its own.
                        if self.retries.previous_waits(dep, now) {
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
                self.unflushed = true;
                if let Action::StartPrevious { deployment, .. } = action {
                    // Its failure is reported as an event and retried on its own
                    // backoff; the deployment's phase stays what the upgrade says.
                    let failed = self.execute(action).await.is_err();
                    self.retries.previous_started(deployment, failed, now);
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

        // Look again so phases reflect what podman really has, not what we hoped,
        // and what the pulls started in this pass are doing.
        if summary.executed > 0 {
            observed = match self.observe(&desired).await {
                Some(o) => o,
                None => {
                    // Podman does not answer; the disk does.
                    self.flush_if_changed().await;
                    return summary;
                }
            };
        }
        let (planned, backing) = self.plan_now(&desired, &observed, view.synced, &present, Instant::now());
        let (assessments, revisions) = (planned.assessments, planned.revisions);
        // A deployment on hold that is not converged stays Failed with the error
        // that put it there, whether its actions were skipped or not planned.
        for dep in &backing {
            if !matches!(assessments.get(dep), Some(Assessment::Converged)) {
                backing_off.insert(dep.clone());
            }
        }

        self.update_phases(&desired, &assessments, &revisions, &errors, &rolled_back, &backing_off);
        self.publish(Some(Utc::now()));
        // Old images go after the report too, off its path, before the flush that
        // makes their removal durable with the rest.
        if view.synced && self.prune_due.is_some_and(|t| t <= Instant::now()) {
            self.prune_images(&desired, &observed).await;
        }
        // Changes and finished pulls are flushed to disk while the reporter sends
        // the report, not before: the flush is off the report's path, and the next
        // pass (the next change) starts only once it is done.
        self.flush_if_changed().await;
        summary
    }

    /// Removes the images [`prune::images_to_prune`] chooses. A removal that fails
    /// (in use, another name refers to it) is logged and tried again after
    /// [`PRUNE_RETRY`]; it never fails a deployment.
    async fn prune_images(
        &mut self,
        desired: &BTreeMap<DeploymentRef, DesiredContent>,
        observed: &[ObservedContainer],
    ) {
        let desired_images: BTreeSet<String> = desired
            .values()
            .filter_map(|c| match c {
                DesiredContent::Valid { services, .. } => Some(services.iter().map(|s| s.image.clone())),
                DesiredContent::Invalid { .. } => None,
            })
            .flatten()
            .collect();
        let images = match self.runtime.images().await {
            Ok(images) => images,
            Err(e) => {
                tracing::debug!(error = %e, "listing images for pruning failed; trying again later");
                self.prune_due = Some(Instant::now() + PRUNE_RETRY);
                return;
            }
        };
        let mut failed = false;
        for image in prune::images_to_prune(&desired_images, observed, &images) {
            let names = image.tags.join(", ");
            match self.runtime.remove_image(&image.id).await {
                Ok(()) => {
                    self.unflushed = true;
                    tracing::info!(image = %short_id(&image.id), names, "removed an image no container needs");
                }
                Err(e) => {
                    failed = true;
                    tracing::debug!(image = %short_id(&image.id), names, error = %e, "could not remove an old image; trying again later");
                }
            }
        }
        self.prune_due = failed.then(|| Instant::now() + PRUNE_RETRY);
    }

    /// Makes the containers changed and images pulled since the last flush
    /// survive a power cut.
    async fn flush_if_changed(&mut self) {
        if std::mem::take(&mut self.unflushed) {
            self.runtime.flush_to_disk().await;
        }
    }

    /// The planner's view of this moment: what to do, and which deployments wait
    /// for their retry.
    fn plan_now(
        &self,
        desired: &BTreeMap<DeploymentRef, DesiredContent>,
        observed: &[ObservedContainer],
        synced: bool,
        present: &BTreeSet<String>,
        now: Instant,
    ) -> (crate::plan::Plan, BTreeSet<DeploymentRef>) {
        let backing = self.retries.backing_off(desired, now);
        let images = self.images.planner_view(present, now);
        let planned = plan(PlanInput {
            device: self.device(),
            desired,
            observed,
            synced,
            seen: &self.seen,
            images: &images,
            on_hold: &backing,
        });
        (planned, backing)
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
        // A runtime that accepts calls but never answers (frozen, deadlocked) is as
        // unavailable as one that refuses them, and the message says which.
        let (error, why) = match error.no_answer_within {
            Some(after) => {
                let after = humantime::format_duration(after);
                (
                    format!("no answer within {after}"),
                    format!("container runtime did not answer within {after}"),
                )
            }
            None => {
                let error = stable_error(error);
                let why = format!("container runtime unavailable: {error}");
                (error, why)
            }
        };
        // What runs cannot be seen: the revision last seen stays.
        let revision = |phases: &BTreeMap<DeploymentRef, DeploymentPhase>, dep: &DeploymentRef| {
            phases.get(dep).and_then(|p| p.revision)
        };
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
                let revision = revision(&self.phases, dep);
                self.set_phase(
                    dep,
                    Phase::Pending,
                    content.spec_hash().cloned(),
                    revision,
                    None,
                    Some("waiting for the container runtime".into()),
                );
            }
        } else {
            let message = why;
            if self.runtime_status.state != RuntimeState::Unavailable {
                tracing::warn!(error = %error, "{message}; will retry on the next pass");
                self.event(Severity::Error, None, message.clone());
            }
            self.runtime_status = RuntimeStatus {
                state: RuntimeState::Unavailable,
                message: Some(message.clone()),
            };
            for (dep, content) in desired {
                let revision = revision(&self.phases, dep);
                self.set_phase(
                    dep,
                    Phase::Failed,
                    content.spec_hash().cloned(),
                    revision,
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
            let revision = planned.revisions.get(dep).copied().flatten();
            self.set_phase(dep, Phase::Pending, hash, revision, None, Some(note));
        }
        let revision = self.publish(None);
        if let Some(published) = &mut self.published {
            let waited = tokio::time::timeout(Duration::from_secs(2), published.wait_for(|p| *p >= revision)).await;
            if waited.is_err() {
                tracing::debug!("status not published before the restore (NATS slow or down)");
            }
        }
    }
}

/// A runtime's message without the tokens that differ per device and attempt
/// (container ids, timestamps, durations), so the same failure reads the same on
/// every device. Our own wording around it is stable already.
fn stable_error(e: &RuntimeError) -> String {
    normalize_error(&e.message, None)
}

/// A container name without the device id it starts with: the same on every device,
/// and the device is known from where the report comes from.
fn name_on_device<'a>(name: &'a str, device: &Id) -> &'a str {
    name.strip_prefix(device.as_str())
        .and_then(|rest| rest.strip_prefix('.'))
        .unwrap_or(name)
}

use crate::podman::short_id;
