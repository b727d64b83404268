//! Carrying out the planner's actions on the runtime, one at a time, and the
//! image gate in front of creates: a missing image is pulled in the background
//! and never blocks a pass.

use harmony_reconciler_contracts::Severity;
use harmony_reconciler_contracts::text::normalize_error;
use tokio::time::Instant;

use super::{Reconciler, ReplaceFailure, name_on_device, short_id, stable_error};
use crate::images::{PullError, PullMessage, PullOutcome};
use crate::plan::{Action, CreateCause, RemoveCause};
use crate::runtime::ContainerRuntime;

impl<R: ContainerRuntime> Reconciler<R> {
    /// Whether `image` is on the device; if not, starts a background pull.
    pub(super) async fn ensure_image(&mut self, image: &str) -> Result<bool, String> {
        if self.images.in_flight(image) {
            return Ok(false);
        }
        match self.runtime.image_present(image).await {
            Ok(true) => Ok(true),
            Ok(false) if self.images.just_pulled(image, Instant::now()) => {
                let error = PullError::Other {
                    image: image.to_owned(),
                    detail: "pulled, but podman does not find it under that name".into(),
                };
                tracing::warn!(image, "{error}");
                self.images.failed(image, error.clone(), Instant::now());
                Err(error.to_string())
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
                    // Progress is best effort: when the reconciler is behind, a
                    // report is dropped and the next one says more.
                    let progress = {
                        let (tx, image) = (tx.clone(), image.clone());
                        move |counts| {
                            let report = PullMessage::Progress {
                                image: image.clone(),
                                counts,
                            };
                            if tx.try_send(report).is_err() {
                                tracing::trace!("pull progress dropped");
                            }
                        }
                    };
                    let result = runtime
                        .pull(&image, &progress)
                        .await
                        .map(|()| started.elapsed())
                        .map_err(|e| e.map_detail(|d| normalize_error(d, None)));
                    // The receiver only goes away when the agent stops.
                    if tx
                        .send(PullMessage::Finished(PullOutcome { image, result }))
                        .await
                        .is_err()
                    {
                        tracing::debug!("pull finished after the reconciler stopped");
                    }
                });
                Ok(false)
            }
            Err(e) => Err(format!("checking image {image}: {}", stable_error(&e))),
        }
    }

    pub(super) async fn execute(&mut self, action: &Action) -> Result<(), ReplaceFailure> {
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

    pub(super) async fn execute_inner(&mut self, action: &Action) -> Result<(), ReplaceFailure> {
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
                    let shown = name_on_device(name, self.device());
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
                    name_on_device(name, self.device()),
                    stable_error(&e)
                ))),
            },
            Action::Create { spec, cause } => {
                let id = self.create_and_start(spec).await.map_err(fail)?;
                let short = short_id(&id);
                let shown = name_on_device(&spec.name, self.device());
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
                tracing::info!(container = %spec.name, id = %short_id(&id), "replaced container");
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
                // The previous version's container is gone: its older images may go.
                self.prune_due = Some(Instant::now());
                Ok(())
            }
            Action::Start {
                deployment,
                container_id,
                name,
                exit_code,
            } => match self.runtime.start(container_id).await {
                Ok(()) => {
                    let shown = name_on_device(name, self.device());
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
                    name_on_device(name, self.device()),
                    stable_error(&e)
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
                    let shown = name_on_device(name, self.device());
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
                        name_on_device(name, self.device()),
                        stable_error(&e)
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
                            name_on_device(name, self.device())
                        ),
                    );
                    Ok(())
                }
                Err(e) => Err(fail(format!(
                    "unpausing container {} failed: {}",
                    name_on_device(name, self.device()),
                    stable_error(&e)
                ))),
            },
        }
    }
}

pub(super) fn action_kind(action: &Action) -> &'static str {
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
