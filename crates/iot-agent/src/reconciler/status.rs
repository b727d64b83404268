//! What the device reports: each deployment's phase, derived after every pass
//! from what the runtime really has ([`super::phase::derive_phase`]), the event
//! ring, and the hand-over to the status reporter.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use harmony_reconciler_contracts::{DeploymentPhase, DeploymentRef, EventEntry, Phase, Severity, SpecHash};
use tokio::time::Instant;

use super::Reconciler;
use super::phase::{PhaseInputs, derive_phase};
use crate::plan::{Assessment, DesiredContent};
use crate::runtime::ContainerRuntime;

impl<R: ContainerRuntime> Reconciler<R> {
    /// Derives every desired deployment's phase from what this pass found, and
    /// keeps the retry book in step.
    pub(super) fn update_phases(
        &mut self,
        desired: &BTreeMap<DeploymentRef, DesiredContent>,
        assessments: &BTreeMap<DeploymentRef, Assessment>,
        revisions: &BTreeMap<DeploymentRef, Option<u64>>,
        errors: &BTreeMap<DeploymentRef, Vec<String>>,
        rolled_back: &BTreeSet<DeploymentRef>,
        backing_off: &BTreeSet<DeploymentRef>,
    ) {
        let now = Instant::now();
        self.images_of = desired
            .iter()
            .map(|(dep, content)| {
                let images = match content {
                    DesiredContent::Valid { services, .. } => services.iter().map(|s| s.image.clone()).collect(),
                    DesiredContent::Invalid { .. } => BTreeSet::new(),
                };
                (dep.clone(), images)
            })
            .collect();
        self.phases.retain(|dep, _| desired.contains_key(dep));
        self.retries.retain(|dep| desired.contains_key(dep));
        for (dep, content) in desired {
            let spec_hash = content.spec_hash().cloned();
            let failed_now = errors.get(dep).map(|errs| errs.join("; "));
            if let Some(error) = &failed_now {
                let rolled_back = rolled_back.contains(dep);
                self.retries
                    .failed(dep, spec_hash.clone(), error.clone(), rolled_back, now);
            }
            let held = backing_off.contains(dep) && failed_now.is_none();
            let assessment = assessments.get(dep);
            if !held && failed_now.is_none() && matches!(assessment, Some(Assessment::Converged)) {
                self.retries.succeeded(dep);
            }
            let crash_loop = self.restarts.crash_loop(dep, now);
            let derived = derive_phase(PhaseInputs {
                failed_now: failed_now.as_deref(),
                held_by: held.then(|| self.retries.last_error(dep)),
                assessment,
                crash_loop: crash_loop.as_deref(),
            });
            let revision = revisions.get(dep).copied().flatten();
            self.set_phase(dep, derived.phase, spec_hash, revision, derived.error, derived.detail);
        }
        self.refresh_pulls(now);
    }

    /// Sets each deployment's `pull`: the first of its images being pulled, or
    /// whose failed pull waits for its retry. Cleared once the image is on the
    /// device (the container is created in the same pass).
    pub(super) fn refresh_pulls(&mut self, now: Instant) {
        for (dep, phase) in &mut self.phases {
            phase.pull = self
                .images_of
                .get(dep)
                .and_then(|images| images.iter().find_map(|i| self.images.status(i, now)));
        }
    }

    pub(super) fn set_phase(
        &mut self,
        dep: &DeploymentRef,
        phase: Phase,
        spec_hash: Option<SpecHash>,
        // The revision of what runs (see [`crate::plan::running_revision`]).
        revision: Option<u64>,
        error: Option<String>,
        detail: Option<String>,
    ) {
        let counts = self.restarts.counts(dep, Instant::now());
        let previous = self.phases.get(dep);
        let changed = !previous.is_some_and(|p| p.phase == phase && p.spec_hash == spec_hash && p.last_error == error);
        let before = previous.map(|p| p.phase);
        // Which pull the deployment waits for is kept; `update_phases` sets it.
        let pull = previous.and_then(|p| p.pull.clone());
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
                revision,
                pull,
            },
        );
    }

    pub(super) fn event(&mut self, severity: Severity, deployment: Option<DeploymentRef>, message: String) {
        self.events.push(EventEntry {
            at: Utc::now(),
            severity,
            deployment,
            message,
        });
    }

    /// Hands the current state to the reporter; returns the report's revision. A
    /// change other than `last_reconcile_at` bumps the revision and wakes the reporter.
    pub(super) fn publish(&self, reconciled_at: Option<DateTime<Utc>>) -> u64 {
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
