//! The pure planner: desired deployments + observed containers -> actions.
//!
//! No I/O here. The reconciler calls [`plan`] with everything it knows and executes
//! the result; most agent behaviour is tested through this function alone.

use std::collections::{BTreeMap, BTreeSet};

use harmony_reconciler_contracts::{DeploymentRef, Id, PodmanService, RestartPolicy, SpecHash, spec_hash_of};

use crate::labels::container_name;
use crate::runtime::{ContainerSpec, ContainerState, ObservedContainer};

/// What the device should run for one deployment, after decoding and validation.
#[derive(Debug, Clone, PartialEq)]
pub enum DesiredContent {
    Valid {
        spec_hash: SpecHash,
        services: Vec<PodmanService>,
    },
    /// Cannot be acted on. Existing containers of the deployment are left running:
    /// a bad update must not take down what works.
    Invalid { spec_hash: Option<SpecHash>, error: String },
}

impl DesiredContent {
    pub fn spec_hash(&self) -> Option<&SpecHash> {
        match self {
            DesiredContent::Valid { spec_hash, .. } => Some(spec_hash),
            DesiredContent::Invalid { spec_hash, .. } => spec_hash.as_ref(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum CreateCause {
    /// First time this service is created.
    New,
    /// The container disappeared (removed out of band) and is put back.
    Restore,
    /// Replaces a container with an outdated spec.
    Upgrade,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveCause {
    DeploymentDeleted,
    SpecChanged,
    Duplicate,
    UnknownDeployment,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Remove {
        deployment: Option<DeploymentRef>,
        container_id: String,
        name: String,
        cause: RemoveCause,
    },
    Create {
        spec: Box<ContainerSpec>,
        cause: CreateCause,
    },
    Start {
        deployment: DeploymentRef,
        container_id: String,
        name: String,
        /// Exit code if it had exited, `None` if it was only created.
        exit_code: Option<i32>,
    },
}

impl Action {
    pub fn deployment(&self) -> Option<&DeploymentRef> {
        match self {
            Action::Remove { deployment, .. } => deployment.as_ref(),
            Action::Create { spec, .. } => Some(&spec.deployment),
            Action::Start { deployment, .. } => Some(deployment),
        }
    }
}

/// The planner's view of a deployment before acting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assessment {
    /// Every service runs with the desired spec; nothing to do.
    Converged,
    /// Actions are planned.
    InProgress,
    /// The desired state cannot be acted on.
    Invalid(String),
    /// A container exited and its restart policy says to leave it.
    Stopped(String),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Removals first (they free names and host ports), then creates, then starts.
    pub actions: Vec<Action>,
    pub assessments: BTreeMap<DeploymentRef, Assessment>,
}

/// Everything the planner needs.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    pub device: &'a Id,
    pub desired: &'a BTreeMap<DeploymentRef, DesiredContent>,
    pub observed: &'a [ObservedContainer],
    /// False until the desired state has been read in full once. Until then nothing
    /// is removed: an absent deployment may just not have been read yet.
    pub synced: bool,
    /// (deployment, service) pairs this agent has seen running before, so a missing
    /// container can be told apart as "removed out of band".
    pub seen: &'a BTreeSet<(DeploymentRef, String)>,
}

/// Hash of one service's spec; the container label that decides "up to date".
pub fn service_hash(service: &PodmanService) -> SpecHash {
    spec_hash_of(service)
}

pub fn plan(input: PlanInput<'_>) -> Plan {
    let mut removes = Vec::new();
    let mut creates = Vec::new();
    let mut starts = Vec::new();
    let mut assessments = BTreeMap::new();

    let mut by_deployment: BTreeMap<&DeploymentRef, Vec<&ObservedContainer>> = BTreeMap::new();
    for c in input.observed {
        match &c.deployment {
            Some(d) => by_deployment.entry(d).or_default().push(c),
            None if input.synced => removes.push(Action::Remove {
                deployment: None,
                container_id: c.id.clone(),
                name: c.name.clone(),
                cause: RemoveCause::UnknownDeployment,
            }),
            None => {}
        }
    }

    // Containers of deployments that are no longer desired.
    if input.synced {
        for (dep, containers) in &by_deployment {
            if !input.desired.contains_key(*dep) {
                for c in containers {
                    removes.push(remove(dep, c, RemoveCause::DeploymentDeleted));
                }
            }
        }
    }

    for (dep, content) in input.desired {
        let observed = by_deployment.get(dep).map(Vec::as_slice).unwrap_or(&[]);
        let (spec_hash, services) = match content {
            DesiredContent::Invalid { error, .. } => {
                assessments.insert(dep.clone(), Assessment::Invalid(error.clone()));
                continue;
            }
            DesiredContent::Valid { spec_hash, services } => (spec_hash, services),
        };
        let mut acted = false;
        let mut stopped = None;
        let wanted: BTreeSet<&str> = services.iter().map(|s| s.name.as_str()).collect();
        // Services dropped from the score.
        for c in observed.iter().filter(|c| !wanted.contains(c.service.as_str())) {
            removes.push(remove(dep, c, RemoveCause::SpecChanged));
            acted = true;
        }
        for svc in services {
            let hash = service_hash(svc);
            let mine: Vec<&&ObservedContainer> = observed.iter().filter(|c| c.service == svc.name).collect();
            let mut keeper = None;
            let mut outdated = false;
            for c in &mine {
                if c.service_hash == hash.as_str() && keeper.is_none() {
                    keeper = Some(*c);
                } else {
                    let cause = if c.service_hash == hash.as_str() {
                        RemoveCause::Duplicate
                    } else {
                        outdated = true;
                        RemoveCause::SpecChanged
                    };
                    removes.push(remove(dep, c, cause));
                    acted = true;
                }
            }
            match keeper {
                None => {
                    let cause = if outdated {
                        CreateCause::Upgrade
                    } else if input.seen.contains(&(dep.clone(), svc.name.clone())) {
                        CreateCause::Restore
                    } else {
                        CreateCause::New
                    };
                    creates.push(Action::Create {
                        spec: Box::new(ContainerSpec {
                            device: input.device.clone(),
                            deployment: dep.clone(),
                            name: container_name(input.device, dep, &svc.name),
                            service: svc.clone(),
                            service_hash: hash,
                            spec_hash: spec_hash.clone(),
                        }),
                        cause,
                    });
                    acted = true;
                }
                Some(c) => match &c.state {
                    ContainerState::Running | ContainerState::Other(_) => {}
                    ContainerState::Created => {
                        starts.push(start(dep, c, None));
                        acted = true;
                    }
                    ContainerState::Exited { code } => {
                        let restart = match svc.restart_policy {
                            RestartPolicy::Always => true,
                            RestartPolicy::OnFailure => *code != 0,
                            RestartPolicy::Never => false,
                        };
                        if restart {
                            starts.push(start(dep, c, Some(*code)));
                            acted = true;
                        } else {
                            stopped = Some(format!(
                                "service {} exited with code {code} and its restart policy is {:?}",
                                svc.name, svc.restart_policy
                            ));
                        }
                    }
                },
            }
        }
        let assessment = match (acted, stopped) {
            (true, _) => Assessment::InProgress,
            (false, Some(msg)) => Assessment::Stopped(msg),
            (false, None) => Assessment::Converged,
        };
        assessments.insert(dep.clone(), assessment);
    }

    let mut actions = removes;
    actions.extend(creates);
    actions.extend(starts);
    Plan { actions, assessments }
}

fn remove(dep: &DeploymentRef, c: &ObservedContainer, cause: RemoveCause) -> Action {
    Action::Remove {
        deployment: Some(dep.clone()),
        container_id: c.id.clone(),
        name: c.name.clone(),
        cause,
    }
}

fn start(dep: &DeploymentRef, c: &ObservedContainer, exit_code: Option<i32>) -> Action {
    Action::Start {
        deployment: dep.clone(),
        container_id: c.id.clone(),
        name: c.name.clone(),
        exit_code,
    }
}
