//! Each deployment's phase after a pass, as a pure function of what the pass
//! found. The order of the rules is the contract:
//! 1. an attempt that failed in this pass: `Failed`, with its errors;
//! 2. a deployment held back by its retry backoff: `Failed`, with the error that
//!    holds it (whatever the containers look like meanwhile);
//! 3. otherwise what the planner assessed: converged is `Running`, work under way
//!    is `Pending` (with a note for people), and a payload that cannot be acted
//!    on, a stopped service or an image that cannot be had are `Failed`;
//! 4. a service that keeps dying is `Failed` whatever this instant shows, unless
//!    it is `Failed` already (the error that made it so says more).

use harmony_reconciler_contracts::Phase;

use crate::plan::Assessment;

/// What a pass found about one deployment.
#[derive(Debug, Clone, Copy, Default)]
pub struct PhaseInputs<'a> {
    /// Errors of attempts that failed in this pass, joined.
    pub failed_now: Option<&'a str>,
    /// `Some` when the deployment waits for its retry: the error that holds it.
    pub held_by: Option<Option<&'a str>>,
    pub assessment: Option<&'a Assessment>,
    /// Why the deployment's services count as crash-looping, if they do.
    pub crash_loop: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivedPhase {
    pub phase: Phase,
    pub error: Option<String>,
    /// A note for people about work under way.
    pub detail: Option<String>,
}

pub fn derive_phase(found: PhaseInputs<'_>) -> DerivedPhase {
    let failed = |error: Option<&str>| DerivedPhase {
        phase: Phase::Failed,
        error: error.map(str::to_owned),
        detail: None,
    };
    let derived = if let Some(error) = found.failed_now {
        failed(Some(error))
    } else if let Some(held_by) = found.held_by {
        failed(held_by)
    } else {
        match found.assessment {
            Some(Assessment::Invalid(e) | Assessment::Stopped(e) | Assessment::ImageUnavailable(e)) => failed(Some(e)),
            Some(Assessment::Converged) => DerivedPhase {
                phase: Phase::Running,
                error: None,
                detail: None,
            },
            Some(Assessment::InProgress(note)) => DerivedPhase {
                phase: Phase::Pending,
                error: None,
                detail: note.clone(),
            },
            None => DerivedPhase {
                phase: Phase::Pending,
                error: None,
                detail: None,
            },
        }
    };
    match found.crash_loop {
        // The note about work under way still says what is going on.
        Some(why) if derived.phase != Phase::Failed => DerivedPhase {
            phase: Phase::Failed,
            error: Some(why.to_owned()),
            detail: derived.detail,
        },
        _ => derived,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase_of(found: PhaseInputs<'_>) -> (Phase, Option<String>) {
        let d = derive_phase(found);
        (d.phase, d.error)
    }

    #[test]
    fn what_failed_now_wins_then_the_backoff_then_the_assessment() {
        let converged = Some(&Assessment::Converged);
        assert_eq!(
            phase_of(PhaseInputs {
                failed_now: Some("create failed"),
                held_by: Some(Some("older")),
                assessment: converged,
                crash_loop: None
            }),
            (Phase::Failed, Some("create failed".into()))
        );
        // Held back: Failed with the error that holds it, even if the containers
        // look converged (the old version may be what runs).
        assert_eq!(
            phase_of(PhaseInputs {
                held_by: Some(Some("upgrade failed")),
                assessment: converged,
                ..Default::default()
            }),
            (Phase::Failed, Some("upgrade failed".into()))
        );
        assert_eq!(
            phase_of(PhaseInputs {
                assessment: converged,
                ..Default::default()
            }),
            (Phase::Running, None)
        );
        let pulling = Assessment::InProgress(Some("pulling img".into()));
        let d = derive_phase(PhaseInputs {
            assessment: Some(&pulling),
            ..Default::default()
        });
        assert_eq!((d.phase, d.detail.as_deref()), (Phase::Pending, Some("pulling img")));
        let stopped = Assessment::Stopped("exited 1".into());
        assert_eq!(
            phase_of(PhaseInputs {
                assessment: Some(&stopped),
                ..Default::default()
            }),
            (Phase::Failed, Some("exited 1".into()))
        );
        assert_eq!(phase_of(PhaseInputs::default()), (Phase::Pending, None));
    }

    #[test]
    fn a_crash_loop_fails_a_running_deployment_but_does_not_hide_an_earlier_error() {
        let converged = Some(&Assessment::Converged);
        assert_eq!(
            phase_of(PhaseInputs {
                assessment: converged,
                crash_loop: Some("restarted 5 times"),
                ..Default::default()
            }),
            (Phase::Failed, Some("restarted 5 times".into()))
        );
        assert_eq!(
            phase_of(PhaseInputs {
                failed_now: Some("start failed"),
                crash_loop: Some("restarted 5 times"),
                ..Default::default()
            }),
            (Phase::Failed, Some("start failed".into()))
        );
        let restarting = Assessment::InProgress(Some("restarting the previous version".into()));
        let d = derive_phase(PhaseInputs {
            assessment: Some(&restarting),
            crash_loop: Some("restarted 5 times"),
            ..Default::default()
        });
        assert_eq!(d.phase, Phase::Failed);
        assert_eq!(
            d.detail.as_deref(),
            Some("restarting the previous version"),
            "the note stays"
        );
    }
}
