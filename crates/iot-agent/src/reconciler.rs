//! The thin, stateful executor around the pure planner.
//!
//! One pass: decode desired state, list containers, plan, execute, look again, and
//! derive each deployment's phase from what is really there. State kept between
//! passes is only what cannot be observed: which services were seen before (to
//! recognise out-of-band removals), per-deployment retry backoff, and the event ring.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::Utc;
use harmony_reconciler_contracts::{
    DeploymentPhase, DeploymentRef, EventEntry, EventRing, Id, Phase, Severity, SpecHash,
};
use iot_kv::DesiredView;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::interpret::interpret_all;
use crate::plan::{Action, Assessment, CreateCause, DesiredContent, PlanInput, RemoveCause, plan};
use crate::runtime::{ContainerRuntime, ContainerState, ObservedContainer};

/// What the status reporter publishes; replaced wholesale after every pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub deployments: BTreeMap<DeploymentRef, DeploymentPhase>,
    pub events: Vec<EventEntry>,
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

fn action_failed(deployment: Option<DeploymentRef>, message: String) -> String {
    tracing::warn!(deployment = ?deployment.map(|d| d.to_string()), error = %message, "action failed");
    message
}

/// Summary of one pass, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassSummary {
    pub executed: usize,
    pub failed: usize,
    pub skipped_backoff: usize,
}

pub struct Reconciler<R> {
    runtime: R,
    device: Id,
    seen: BTreeSet<(DeploymentRef, String)>,
    failures: BTreeMap<DeploymentRef, Failure>,
    phases: BTreeMap<DeploymentRef, DeploymentPhase>,
    events: EventRing,
    last_list_error: Option<String>,
    /// Malformed keys under this device's prefix already reported as events.
    reported_invalid_keys: BTreeSet<String>,
    report: watch::Sender<Report>,
}

impl<R: ContainerRuntime> Reconciler<R> {
    pub fn new(runtime: R, device: Id, event_capacity: usize, report: watch::Sender<Report>) -> Self {
        Self {
            runtime,
            device,
            seen: BTreeSet::new(),
            failures: BTreeMap::new(),
            phases: BTreeMap::new(),
            events: EventRing::new(event_capacity),
            last_list_error: None,
            reported_invalid_keys: BTreeSet::new(),
            report,
        }
    }

    pub fn runtime(&self) -> &R {
        &self.runtime
    }

    /// One level-triggered pass over the whole desired state.
    #[tracing::instrument(skip_all, fields(device = %self.device, deployments = view.entries.len()))]
    pub async fn reconcile(&mut self, view: &DesiredView) -> PassSummary {
        let desired = interpret_all(&view.entries);
        for key in &view.invalid_keys {
            if self.reported_invalid_keys.insert(key.clone()) {
                self.event(
                    Severity::Warning,
                    None,
                    format!("ignoring desired-state key {key:?}: expected <device>.<namespace>_<name>"),
                );
            }
        }
        let Some(observed) = self.observe().await else {
            return PassSummary::default();
        };
        let first = plan(PlanInput {
            device: &self.device,
            desired: &desired,
            observed: &observed,
            synced: view.synced,
            seen: &self.seen,
        });

        let now = Instant::now();
        let mut summary = PassSummary::default();
        let mut errors: BTreeMap<DeploymentRef, Vec<String>> = BTreeMap::new();
        let mut backing_off = BTreeSet::new();
        for action in &first.actions {
            if let Some(dep) = action.deployment() {
                let current = desired.get(dep).and_then(DesiredContent::spec_hash);
                if let Some(f) = self.failures.get(dep)
                    && f.spec_hash.as_ref() == current
                    && f.retry_at > now
                {
                    backing_off.insert(dep.clone());
                    summary.skipped_backoff += 1;
                    continue;
                }
            }
            summary.executed += 1;
            if let Err(e) = self.execute(action).await {
                summary.failed += 1;
                if let Some(dep) = action.deployment() {
                    errors.entry(dep.clone()).or_default().push(e);
                }
            }
        }

        // Look again so phases reflect what podman really has, not what we hoped.
        let assessments = if summary.executed > 0 {
            match self.observe().await {
                Some(observed) => {
                    plan(PlanInput {
                        device: &self.device,
                        desired: &desired,
                        observed: &observed,
                        synced: view.synced,
                        seen: &self.seen,
                    })
                    .assessments
                }
                None => first.assessments,
            }
        } else {
            first.assessments
        };

        self.update_phases(&desired, &assessments, &errors, &backing_off);
        self.publish();
        summary
    }

    async fn observe(&mut self) -> Option<Vec<ObservedContainer>> {
        match self.runtime.list(&self.device).await {
            Ok(observed) => {
                if self.last_list_error.take().is_some() {
                    self.event(Severity::Info, None, "container runtime reachable again".into());
                }
                for c in &observed {
                    if let (Some(dep), ContainerState::Running) = (&c.deployment, &c.state) {
                        self.seen.insert((dep.clone(), c.service.clone()));
                    }
                }
                Some(observed)
            }
            Err(e) => {
                let msg = format!("cannot list containers: {e}");
                tracing::warn!(error = %e, "cannot list containers; will retry on the next pass");
                if self.last_list_error.as_deref() != Some(msg.as_str()) {
                    self.event(Severity::Error, None, msg.clone());
                    self.last_list_error = Some(msg);
                    self.publish();
                }
                None
            }
        }
    }

    async fn execute(&mut self, action: &Action) -> Result<(), String> {
        match action {
            Action::Remove {
                deployment,
                container_id,
                name,
                cause,
            } => match self.runtime.remove(container_id).await {
                Ok(()) => {
                    let (severity, why) = match cause {
                        RemoveCause::DeploymentDeleted => (Severity::Info, "deployment deleted"),
                        RemoveCause::SpecChanged => (Severity::Info, "spec changed"),
                        RemoveCause::Duplicate => (Severity::Warning, "duplicate of another container"),
                        RemoveCause::UnknownDeployment => (Severity::Warning, "unreadable deployment label"),
                    };
                    tracing::info!(container = %name, reason = why, "removed container");
                    self.event(severity, deployment.clone(), format!("removed container {name}: {why}"));
                    if let Some(dep) = deployment
                        && *cause == RemoveCause::DeploymentDeleted
                    {
                        self.seen.retain(|(d, _)| d != dep);
                    }
                    Ok(())
                }
                Err(e) => Err(action_failed(
                    deployment.clone(),
                    format!("removing container {name} failed: {e}"),
                )),
            },
            Action::Create { spec, cause } => match self.runtime.create_and_start(spec).await {
                Ok(id) => {
                    let short = id.get(..12).unwrap_or(&id);
                    let (severity, msg) = match cause {
                        CreateCause::New => (
                            Severity::Info,
                            format!("created container {} ({}) id {short}", spec.name, spec.service.image),
                        ),
                        CreateCause::Upgrade => (
                            Severity::Info,
                            format!(
                                "replaced container {} with spec {} ({}) id {short}",
                                spec.name, spec.spec_hash, spec.service.image
                            ),
                        ),
                        CreateCause::Restore => (
                            Severity::Warning,
                            format!(
                                "restored container {}, which was removed outside the agent; new id {short}",
                                spec.name
                            ),
                        ),
                    };
                    tracing::info!(container = %spec.name, cause = ?cause, id = %short, "created container");
                    self.event(severity, Some(spec.deployment.clone()), msg);
                    self.seen.insert((spec.deployment.clone(), spec.service.name.clone()));
                    Ok(())
                }
                Err(e) => Err(action_failed(
                    Some(spec.deployment.clone()),
                    format!("service {}: {e}", spec.service.name),
                )),
            },
            Action::Start {
                deployment,
                container_id,
                name,
                exit_code,
            } => match self.runtime.start(container_id).await {
                Ok(()) => {
                    let (severity, msg) = match exit_code {
                        Some(code) => (
                            Severity::Warning,
                            format!("restarted container {name}, which had stopped (exit code {code})"),
                        ),
                        None => (Severity::Info, format!("started container {name}")),
                    };
                    tracing::info!(container = %name, "started container");
                    self.event(severity, Some(deployment.clone()), msg);
                    Ok(())
                }
                Err(e) => Err(action_failed(
                    Some(deployment.clone()),
                    format!("starting container {name} failed: {e}"),
                )),
            },
        }
    }

    fn update_phases(
        &mut self,
        desired: &BTreeMap<DeploymentRef, DesiredContent>,
        assessments: &BTreeMap<DeploymentRef, Assessment>,
        errors: &BTreeMap<DeploymentRef, Vec<String>>,
        backing_off: &BTreeSet<DeploymentRef>,
    ) {
        let now = Instant::now();
        self.phases.retain(|dep, _| desired.contains_key(dep));
        self.failures.retain(|dep, _| desired.contains_key(dep));
        for (dep, content) in desired {
            let spec_hash = content.spec_hash().cloned();
            let (phase, error) = if let Some(errs) = errors.get(dep) {
                let error = errs.join("; ");
                let attempts = match self.failures.get(dep) {
                    Some(f) if f.spec_hash == spec_hash => f.attempts + 1,
                    _ => 1,
                };
                self.failures.insert(
                    dep.clone(),
                    Failure {
                        spec_hash: spec_hash.clone(),
                        attempts,
                        retry_at: now + failure_backoff(attempts),
                        error: error.clone(),
                    },
                );
                (Phase::Failed, Some(error))
            } else if backing_off.contains(dep) {
                let error = self.failures.get(dep).map(|f| f.error.clone());
                (Phase::Failed, error)
            } else {
                match assessments.get(dep) {
                    Some(Assessment::Invalid(e)) => (Phase::Failed, Some(e.clone())),
                    Some(Assessment::Stopped(e)) => (Phase::Failed, Some(e.clone())),
                    Some(Assessment::Converged) => {
                        self.failures.remove(dep);
                        (Phase::Running, None)
                    }
                    Some(Assessment::InProgress) | None => (Phase::Pending, None),
                }
            };
            self.set_phase(dep, phase, spec_hash, error);
        }
    }

    fn set_phase(&mut self, dep: &DeploymentRef, phase: Phase, spec_hash: Option<SpecHash>, error: Option<String>) {
        let unchanged = self
            .phases
            .get(dep)
            .is_some_and(|p| p.phase == phase && p.spec_hash == spec_hash && p.last_error == error);
        if unchanged {
            return;
        }
        let before = self.phases.get(dep).map(|p| p.phase);
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
        self.phases.insert(
            dep.clone(),
            DeploymentPhase {
                phase,
                spec_hash,
                last_error: error,
                last_event_at: Utc::now(),
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

    fn publish(&self) {
        let report = Report {
            deployments: self.phases.clone(),
            events: self.events.to_vec(),
        };
        self.report.send_if_modified(|current| {
            if *current == report {
                false
            } else {
                *current = report;
                true
            }
        });
    }
}
