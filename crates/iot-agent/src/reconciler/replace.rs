//! Replacing a deployment's containers without an outage: the new container comes
//! up first (or, for services that hold host ports, right after the old one
//! stops), must settle, and only then does the old one go; a replacement that
//! fails is removed and the old version runs again.

use harmony_reconciler_contracts::RestartPolicy;

use super::{Reconciler, ReplaceFailure, stable_error};
use crate::plan::OldContainer;
use crate::runtime::{ContainerRuntime, ContainerSpec};

impl<R: ContainerRuntime> Reconciler<R> {
    /// Creates and starts a container. A container that was created but failed to
    /// start is removed again: the next attempt creates it afresh, and nothing holds
    /// its name meanwhile.
    pub(super) async fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, String> {
        let svc = &spec.service.name;
        let id = self
            .runtime
            .create(spec)
            .await
            .map_err(|e| format!("service {svc}: creating the container failed: {}", stable_error(&e)))?;
        if let Err(e) = self.runtime.start(&id).await {
            if let Err(re) = self.runtime.remove(&id).await {
                tracing::warn!(container = %spec.name, error = %re, "could not remove a container that failed to start");
            }
            return Err(format!(
                "service {svc}: the container failed to start: {}",
                stable_error(&e)
            ));
        }
        Ok(id)
    }

    /// Brings the new container up before the old one goes; see [`Action::Replace`].
    pub(super) async fn replace(
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
                            stable_error(&e),
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
    pub(super) async fn settle_or_roll_back(
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
                self.forget_failed_replacement(&spec.deployment, id);
                let restarted = self.restart_old(stopped).await;
                Err(self.rollback_failure(spec, &error, old, stopped, restarted))
            }
        }
    }

    /// Finishes a replacement an earlier pass left half done: see
    /// [`Action::FinishReplace`]. Old containers that are not running (stopped for
    /// their ports when the agent went away) are started again on failure.
    pub(super) async fn finish_replace(
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

    pub(super) fn rollback_failure(
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
    pub(super) async fn restart_old(&self, stopped: &[&OldContainer]) -> Result<(), String> {
        let mut failed = Vec::new();
        for o in stopped {
            if let Err(e) = self.runtime.start(&o.id).await {
                tracing::error!(container = %o.name, error = %e, "could not restart the previous container after a failed upgrade");
                failed.push(stable_error(&e));
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
    pub(super) async fn settled(&self, spec: &ContainerSpec, id: &str) -> Result<(), String> {
        if self.config.settle.is_zero() {
            return Ok(());
        }
        tokio::time::sleep(self.config.settle).await;
        let svc = &spec.service.name;
        let h = self
            .runtime
            .health(id)
            .await
            .map_err(|e| format!("service {svc}: cannot inspect the new container: {}", stable_error(&e)))?;
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
}
