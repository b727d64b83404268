//! The pure planner: desired deployments + observed containers + image availability
//! -> actions.
//!
//! No I/O here. The reconciler calls [`plan`] with everything it knows and executes
//! the result; most agent behaviour is tested through this function alone.
//!
//! Safety rules the planner guarantees:
//! - A container with an outdated spec is never removed on its own: it is *replaced*
//!   ([`Action::Replace`]), and only once the new image is on the device. The
//!   executor starts the new container before it removes the old one, and rolls back
//!   if the new one does not come up (see the reconciler).
//! - Nothing is removed before the desired state was read in full once.
//! - Invalid desired state leaves the deployment's containers alone.

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
        /// The payload's `DeploymentRevision` number (`None` from operators that
        /// predate revisions).
        revision: Option<u64>,
    },
    /// Cannot be acted on. Existing containers of the deployment are left running:
    /// a bad update must not take down what works.
    Invalid {
        spec_hash: Option<SpecHash>,
        error: String,
        /// `None` also when the payload did not parse.
        revision: Option<u64>,
    },
}

impl DesiredContent {
    pub fn spec_hash(&self) -> Option<&SpecHash> {
        match self {
            DesiredContent::Valid { spec_hash, .. } => Some(spec_hash),
            DesiredContent::Invalid { spec_hash, .. } => spec_hash.as_ref(),
        }
    }

    pub fn revision(&self) -> Option<u64> {
        match self {
            DesiredContent::Valid { revision, .. } | DesiredContent::Invalid { revision, .. } => *revision,
        }
    }
}

/// What the agent knows about an image the plan needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageState {
    Present,
    /// A pull runs in the background.
    Pulling,
    /// The last pull failed and its retry is not due yet.
    Failed(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum CreateCause {
    /// First time this service is created.
    New,
    /// The container disappeared (removed out of band) and is put back.
    Restore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveCause {
    DeploymentDeleted,
    /// A service dropped from the score, or a leftover of an earlier replacement.
    SpecChanged,
    Duplicate,
    UnknownDeployment,
}

/// A container a replacement supersedes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldContainer {
    pub id: String,
    pub name: String,
    pub running: bool,
    /// The image id it runs (empty if unknown).
    pub image_id: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Remove {
        deployment: Option<DeploymentRef>,
        container_id: String,
        name: String,
        cause: RemoveCause,
    },
    /// Find out whether `image` is on the device, and pull it in the background if not.
    EnsureImage {
        image: String,
        deployments: Vec<DeploymentRef>,
    },
    Create {
        spec: Box<ContainerSpec>,
        cause: CreateCause,
    },
    /// Bring up `spec` in place of `old`. With `stop_first` (the service publishes host
    /// ports, which the old container holds) the old one is stopped first and started
    /// again if the new one fails; otherwise the old one runs until the new one is up.
    Replace {
        spec: Box<ContainerSpec>,
        old: Vec<OldContainer>,
        stop_first: bool,
    },
    /// A container with the new spec exists next to outdated ones: an earlier
    /// replacement was interrupted (the agent stopped during the settle check, or a
    /// failed replacement could not be removed). The new one must pass the settle
    /// check before the old ones go; if it fails, it goes and the old ones run again.
    FinishReplace {
        spec: Box<ContainerSpec>,
        new: OldContainer,
        old: Vec<OldContainer>,
    },
    Start {
        deployment: DeploymentRef,
        container_id: String,
        name: String,
        /// Exit code if it had exited, `None` if it was only created.
        exit_code: Option<i32>,
    },
    /// The previous version's container stopped (a power cut, an OOM kill) while
    /// its upgrade cannot happen yet: the new image is being pulled or failed to
    /// pull, or the last attempt was rolled back and its retry is not due. It is
    /// started again, so the old version keeps serving until the new one is ready.
    /// Unlike every other action of such a deployment, this one does not wait for
    /// the upgrade's retry backoff.
    StartPrevious {
        deployment: DeploymentRef,
        container_id: String,
        name: String,
        exit_code: Option<i32>,
    },
    /// A container paused outside the agent holds its ports and serves nothing.
    Unpause {
        deployment: DeploymentRef,
        container_id: String,
        name: String,
    },
}

impl Action {
    /// The one deployment this action is for (`EnsureImage` may serve several).
    pub fn deployment(&self) -> Option<&DeploymentRef> {
        match self {
            Action::Remove { deployment, .. } => deployment.as_ref(),
            Action::EnsureImage { .. } => None,
            Action::Create { spec, .. } | Action::Replace { spec, .. } | Action::FinishReplace { spec, .. } => {
                Some(&spec.deployment)
            }
            Action::Start { deployment, .. }
            | Action::StartPrevious { deployment, .. }
            | Action::Unpause { deployment, .. } => Some(deployment),
        }
    }
}

/// The planner's view of a deployment before acting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assessment {
    /// Every service runs with the desired spec; nothing to do.
    Converged,
    /// Actions are planned or something is under way; the note says what, for people.
    InProgress(Option<String>),
    /// The desired state cannot be acted on.
    Invalid(String),
    /// A container exited and its restart policy says to leave it.
    Stopped(String),
    /// An image the deployment needs could not be pulled; whatever ran before still runs.
    ImageUnavailable(String),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Removals first (they free names and host ports), then image checks, creates,
    /// replacements, starts and unpauses.
    pub actions: Vec<Action>,
    pub assessments: BTreeMap<DeploymentRef, Assessment>,
    /// The revision each desired deployment runs, as seen before acting
    /// ([`running_revision`]).
    pub revisions: BTreeMap<DeploymentRef, Option<u64>>,
}

impl Plan {
    /// Deployments that will get a container back that was removed out of band.
    pub fn restoring(&self) -> impl Iterator<Item = &DeploymentRef> {
        self.actions.iter().filter_map(|a| match a {
            Action::Create {
                spec,
                cause: CreateCause::Restore,
            } => Some(&spec.deployment),
            _ => None,
        })
    }
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
    /// Images known to be present, being pulled, or failing. An image the plan needs
    /// that is not listed gets an [`Action::EnsureImage`] and nothing else.
    pub images: &'a BTreeMap<String, ImageState>,
    /// Deployments whose last attempt failed and whose retry is not due yet. The
    /// executor skips their actions; the planner plans no replacement for them, only
    /// [`Action::StartPrevious`] where the previous version has stopped.
    pub on_hold: &'a BTreeSet<DeploymentRef>,
}

/// Hash of one service's spec; the container label that decides "up to date".
pub fn service_hash(service: &PodmanService) -> SpecHash {
    spec_hash_of(service)
}

/// An image reference split into its repository (`registry/path`, without tag or
/// digest) and what follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageRef<'a> {
    pub repository: &'a str,
    pub tag: Option<&'a str>,
    /// `sha256:...` of a `repo@sha256:...` reference.
    pub digest: Option<&'a str>,
}

impl<'a> ImageRef<'a> {
    /// Parses `repo`, `repo:tag`, `repo@digest` or `repo:tag@digest`; the port of a
    /// registry (`10.77.0.1:5000/iot/web`) is not a tag.
    pub fn parse(reference: &'a str) -> Self {
        let (name, digest) = match reference.split_once('@') {
            Some((name, digest)) => (name, Some(digest)),
            None => (reference, None),
        };
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        match name[last_slash..].rfind(':') {
            Some(i) => ImageRef {
                repository: &name[..last_slash + i],
                tag: Some(&name[last_slash + i + 1..]),
                digest,
            },
            None => ImageRef {
                repository: name,
                tag: None,
                digest,
            },
        }
    }
}

/// Whether container `c` runs what `svc` asks for, `hash` being `svc`'s hash.
///
/// Either its service-hash label is `hash`, or the operator pinned the tag it was
/// created from to the digest of the very image it runs: `svc` names
/// `NAME@sha256:D`, `c` was created from `NAME:TAG`, `svc` with `NAME:TAG` in
/// place of its image hashes to `c`'s label, and `c`'s image has digest D (its
/// `RepoDigests` hold `svc.image`, or its `Digest` is D). That way the operator's
/// move to digests restarts nothing, while any other difference still does.
pub fn runs_desired(c: &ObservedContainer, svc: &PodmanService, hash: &SpecHash) -> bool {
    if c.service_hash == hash.as_str() {
        return true;
    }
    let desired = ImageRef::parse(&svc.image);
    let (Some(digest), None) = (desired.digest, desired.tag) else {
        return false;
    };
    let created = ImageRef::parse(&c.image.name);
    if created.repository != desired.repository || created.tag.is_none() || created.digest.is_some() {
        return false;
    }
    let same_image = c.image.repo_digests.contains(&svc.image) || c.image.digest.as_deref() == Some(digest);
    if !same_image {
        return false;
    }
    let mut as_created = svc.clone();
    as_created.image.clone_from(&c.image.name);
    service_hash(&as_created).as_str() == c.service_hash
}

/// Per-deployment findings while planning.
#[derive(Default)]
struct Findings {
    acted: bool,
    notes: Vec<String>,
    problems: Vec<String>,
    image_problems: Vec<String>,
}

impl Findings {
    fn assessment(self) -> Assessment {
        if !self.image_problems.is_empty() {
            Assessment::ImageUnavailable(self.image_problems.join("; "))
        } else if !self.problems.is_empty() && !self.acted {
            Assessment::Stopped(self.problems.join("; "))
        } else if self.acted || !self.notes.is_empty() {
            Assessment::InProgress((!self.notes.is_empty()).then(|| self.notes.join("; ")))
        } else {
            Assessment::Converged
        }
    }
}

/// Actions by kind while planning; [`Planned::into_plan`] puts them in the order
/// they run.
#[derive(Default)]
struct Planned {
    removes: Vec<Action>,
    /// Images to check, and the deployments waiting on each.
    ensure: BTreeMap<String, Vec<DeploymentRef>>,
    creates: Vec<Action>,
    replaces: Vec<Action>,
    starts: Vec<Action>,
}

impl Planned {
    fn into_plan(
        self,
        assessments: BTreeMap<DeploymentRef, Assessment>,
        revisions: BTreeMap<DeploymentRef, Option<u64>>,
    ) -> Plan {
        let mut actions = self.removes;
        actions.extend(
            self.ensure
                .into_iter()
                .map(|(image, deployments)| Action::EnsureImage { image, deployments }),
        );
        actions.extend(self.creates);
        actions.extend(self.replaces);
        actions.extend(self.starts);
        Plan {
            actions,
            assessments,
            revisions,
        }
    }
}

/// The containers of one service, as the planner sorts them.
struct ServiceContainers<'c> {
    /// One container with the desired spec, if any.
    keeper: Option<&'c ObservedContainer>,
    /// Containers with an older spec.
    outdated: Vec<&'c ObservedContainer>,
}

pub fn plan(input: PlanInput<'_>) -> Plan {
    let mut planned = Planned::default();
    let mut assessments = BTreeMap::new();
    let mut revisions = BTreeMap::new();
    let by_deployment = group_by_deployment(&input, &mut planned);
    for (dep, content) in input.desired {
        let observed = by_deployment.get(dep).map(Vec::as_slice).unwrap_or(&[]);
        let labels = observed.iter().map(|c| c.revision);
        let (spec_hash, services, revision) = match content {
            DesiredContent::Invalid { error, revision, .. } => {
                assessments.insert(dep.clone(), Assessment::Invalid(error.clone()));
                // Whatever runs is left alone, and is older than this payload.
                let older = !observed.is_empty();
                revisions.insert(dep.clone(), running_revision(*revision, false, older, labels));
                continue;
            }
            DesiredContent::Valid {
                spec_hash,
                services,
                revision,
            } => (spec_hash, services, *revision),
        };
        let mut f = Findings::default();
        let wanted: BTreeSet<&str> = services.iter().map(|s| s.name.as_str()).collect();
        // Services dropped from the score.
        let mut older = false;
        for c in observed.iter().filter(|c| !wanted.contains(c.service.as_str())) {
            planned.removes.push(remove(dep, c, RemoveCause::SpecChanged));
            f.acted = true;
            older = true;
        }
        for svc in services {
            let hash = service_hash(svc);
            let containers = sort_service(dep, observed, svc, &hash, &mut planned, &mut f);
            older |= !containers.outdated.is_empty();
            let spec = Box::new(ContainerSpec {
                device: input.device.clone(),
                deployment: dep.clone(),
                name: container_name(input.device, dep, &svc.name, &hash),
                service: svc.clone(),
                service_hash: hash.clone(),
                spec_hash: spec_hash.clone(),
                revision,
                previous_image: None,
            });
            match containers.keeper {
                None => plan_missing(&input, dep, svc, spec, &containers.outdated, &mut planned, &mut f),
                Some(keeper) if !containers.outdated.is_empty() => {
                    // An interrupted replacement: settle it before anything else.
                    planned.replaces.push(Action::FinishReplace {
                        spec,
                        new: old_container(keeper),
                        old: containers.outdated.iter().copied().map(old_container).collect(),
                    });
                    f.acted = true;
                }
                Some(keeper) => plan_keeper(dep, svc, keeper, &mut planned, &mut f),
            }
        }
        let assessment = f.assessment();
        let converged = assessment == Assessment::Converged;
        revisions.insert(dep.clone(), running_revision(revision, converged, older, labels));
        assessments.insert(dep.clone(), assessment);
    }
    planned.into_plan(assessments, revisions)
}

/// The revision a deployment runs on the device, reported next to its phase.
///
/// - `desired`: the payload's revision; without one (an operator that predates
///   revisions, a payload that does not parse) the answer is `None`, unknown.
/// - Converged, or nothing of an older spec on the device (the deployment is new,
///   being restored, or stopped at its current spec): the phase is about the
///   desired spec, and so is the revision.
/// - Containers of an older spec are still there (an upgrade that waits for its
///   image, failed, or was rolled back; a payload that cannot be acted on): the
///   previous version is what serves, so the revision is the newest one the
///   deployment's containers were created for (their [`crate::labels::REVISION`],
///   which survives an agent restart), below the desired one. A service the last
///   upgrades did not change keeps its older container and label, which is why the
///   newest, not the oldest, is taken. `None` if no container says (created by an
///   agent that predates revisions).
///
/// `labels` are the revisions of all the deployment's containers.
pub fn running_revision(
    desired: Option<u64>,
    converged: bool,
    older: bool,
    labels: impl IntoIterator<Item = Option<u64>>,
) -> Option<u64> {
    let desired = desired?;
    if converged || !older {
        return Some(desired);
    }
    labels.into_iter().flatten().filter(|r| *r < desired).max()
}

/// Observed containers by deployment. A container without a readable deployment
/// label is removed, and so are containers of deployments no longer desired, but
/// only once the desired state was read in full.
fn group_by_deployment<'c>(
    input: &PlanInput<'c>,
    planned: &mut Planned,
) -> BTreeMap<&'c DeploymentRef, Vec<&'c ObservedContainer>> {
    let mut by_deployment: BTreeMap<&DeploymentRef, Vec<&ObservedContainer>> = BTreeMap::new();
    for c in input.observed {
        match &c.deployment {
            Some(d) => by_deployment.entry(d).or_default().push(c),
            None if input.synced => planned.removes.push(Action::Remove {
                deployment: None,
                container_id: c.id.clone(),
                name: c.name.clone(),
                cause: RemoveCause::UnknownDeployment,
            }),
            None => {}
        }
    }
    if input.synced {
        for (dep, containers) in &by_deployment {
            if !input.desired.contains_key(*dep) {
                for c in containers {
                    planned.removes.push(remove(dep, c, RemoveCause::DeploymentDeleted));
                }
            }
        }
    }
    by_deployment
}

/// Sorts a service's containers into the one to keep and the outdated ones;
/// duplicates of the keeper are removed.
fn sort_service<'c>(
    dep: &DeploymentRef,
    observed: &[&'c ObservedContainer],
    svc: &PodmanService,
    hash: &SpecHash,
    planned: &mut Planned,
    f: &mut Findings,
) -> ServiceContainers<'c> {
    let mine: Vec<&ObservedContainer> = observed.iter().copied().filter(|c| c.service == svc.name).collect();
    // One labelled with the desired hash first, then one that runs the same image
    // under its tag.
    let keeper = mine
        .iter()
        .copied()
        .find(|c| c.service_hash == hash.as_str())
        .or_else(|| mine.iter().copied().find(|c| runs_desired(c, svc, hash)));
    for c in mine.iter().filter(|c| runs_desired(c, svc, hash)) {
        if keeper.is_some_and(|k| k.id != c.id) {
            planned.removes.push(remove(dep, c, RemoveCause::Duplicate));
            f.acted = true;
        }
    }
    let outdated = mine.into_iter().filter(|c| !runs_desired(c, svc, hash)).collect();
    ServiceContainers { keeper, outdated }
}

/// No container runs the desired spec: create one, or replace the outdated ones,
/// once the image is on the device and the deployment is not waiting for a retry.
/// Until then the previous version, if it stopped, is started again so it keeps
/// serving.
fn plan_missing(
    input: &PlanInput<'_>,
    dep: &DeploymentRef,
    svc: &PodmanService,
    spec: Box<ContainerSpec>,
    outdated: &[&ObservedContainer],
    planned: &mut Planned,
    f: &mut Findings,
) {
    let keep_previous = |planned: &mut Planned, f: &mut Findings| {
        if let Some(prev) = previous_to_restart(outdated, svc) {
            f.acted = true;
            f.notes.push(format!(
                "restarting the previous version of service {} while the upgrade waits",
                svc.name
            ));
            planned.starts.push(Action::StartPrevious {
                deployment: dep.clone(),
                container_id: prev.id.clone(),
                name: prev.name.clone(),
                exit_code: match prev.state {
                    ContainerState::Exited { code } => Some(code),
                    _ => None,
                },
            });
        }
    };
    match input.images.get(&svc.image) {
        Some(ImageState::Present) => {}
        Some(ImageState::Pulling) => {
            f.notes.push(format!("pulling image {}", svc.image));
            return keep_previous(planned, f);
        }
        Some(ImageState::Failed(e)) => {
            f.image_problems.push(format!("service {}: {e}", svc.name));
            return keep_previous(planned, f);
        }
        None => {
            planned.ensure.entry(svc.image.clone()).or_default().push(dep.clone());
            f.notes.push(format!("checking image {}", svc.image));
            return keep_previous(planned, f);
        }
    }
    if !outdated.is_empty() && input.on_hold.contains(dep) {
        f.notes
            .push(format!("the upgrade of service {} waits for its retry", svc.name));
        return keep_previous(planned, f);
    }
    f.acted = true;
    if outdated.is_empty() {
        let restore = input.seen.contains(&(dep.clone(), svc.name.clone()));
        if restore {
            f.notes.push(format!(
                "restoring service {}, whose container was removed outside the agent",
                svc.name
            ));
        }
        planned.creates.push(Action::Create {
            spec,
            cause: if restore {
                CreateCause::Restore
            } else {
                CreateCause::New
            },
        });
    } else {
        let old: Vec<OldContainer> = outdated.iter().copied().map(old_container).collect();
        let stop_first = !svc.ports.is_empty() && old.iter().any(|o| o.running);
        let mut spec = spec;
        spec.previous_image = previous_image(outdated);
        planned.replaces.push(Action::Replace { spec, old, stop_first });
    }
}

/// The container with the desired spec exists: start, unpause or leave it, as its
/// state and the restart policy say.
fn plan_keeper(
    dep: &DeploymentRef,
    svc: &PodmanService,
    keeper: &ObservedContainer,
    planned: &mut Planned,
    f: &mut Findings,
) {
    match &keeper.state {
        ContainerState::Running => {}
        ContainerState::Created => {
            planned.starts.push(start(dep, keeper, None));
            f.acted = true;
        }
        ContainerState::Paused => {
            planned.starts.push(Action::Unpause {
                deployment: dep.clone(),
                container_id: keeper.id.clone(),
                name: keeper.name.clone(),
            });
            f.acted = true;
            f.notes
                .push(format!("service {} was paused outside the agent", svc.name));
        }
        ContainerState::Other(state) => {
            f.notes.push(format!("service {}: container is {state}", svc.name));
        }
        ContainerState::Exited { code } => {
            let restart = match svc.restart_policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => *code != 0,
                RestartPolicy::Never => false,
            };
            if restart {
                planned.starts.push(start(dep, keeper, Some(*code)));
                f.acted = true;
            } else {
                f.problems.push(format!(
                    "service {} exited with code {code} and its restart policy is {:?}",
                    svc.name, svc.restart_policy
                ));
            }
        }
    }
}

fn old_container(c: &ObservedContainer) -> OldContainer {
    OldContainer {
        id: c.id.clone(),
        name: c.name.clone(),
        running: matches!(c.state, ContainerState::Running | ContainerState::Paused),
        image_id: c.image.id.clone(),
    }
}

/// The image of the version a replacement supersedes: the running outdated
/// container's, else any outdated container's whose image is known.
fn previous_image(outdated: &[&ObservedContainer]) -> Option<String> {
    let known = || outdated.iter().filter(|c| !c.image.id.is_empty());
    known()
        .find(|c| matches!(c.state, ContainerState::Running | ContainerState::Paused))
        .or_else(|| known().next())
        .map(|c| c.image.id.clone())
}

/// The outdated container to start again while an upgrade waits, if the previous
/// version is down: none of the outdated containers runs (or is paused or in
/// transition), and the service's restart policy would restart it. With several
/// outdated containers (a leftover of an interrupted replacement) one is enough.
fn previous_to_restart<'c>(outdated: &[&'c ObservedContainer], svc: &PodmanService) -> Option<&'c ObservedContainer> {
    let down = |c: &&&ObservedContainer| matches!(c.state, ContainerState::Exited { .. } | ContainerState::Created);
    if outdated.is_empty() || !outdated.iter().all(|c| down(&c)) {
        return None;
    }
    outdated.iter().copied().find(|c| match c.state {
        ContainerState::Created => true,
        ContainerState::Exited { code } => match svc.restart_policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => code != 0,
            RestartPolicy::Never => false,
        },
        _ => false,
    })
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

#[cfg(test)]
mod tests {
    use super::running_revision;

    #[test]
    fn the_revision_is_the_desired_one_unless_an_older_version_is_what_is_there() {
        // Converged, or nothing older on the device: the desired revision, whatever
        // older labels unchanged services carry.
        assert_eq!(running_revision(Some(4), true, true, [Some(2), Some(4)]), Some(4));
        assert_eq!(running_revision(Some(4), false, false, [Some(2)]), Some(4));
        assert_eq!(running_revision(Some(4), false, false, []), Some(4));
        // An upgrade to 4 that did not happen: the previous version's revision.
        assert_eq!(running_revision(Some(4), false, true, [Some(3)]), Some(3));
        // Web replaced at 3 (db unchanged, still labelled 1), then 4 fails for web:
        // the device ran 3, the newest label below the desired one.
        assert_eq!(running_revision(Some(4), false, true, [Some(1), Some(3)]), Some(3));
        // A service already replaced for 4 while another still waits does not
        // make it 4.
        assert_eq!(running_revision(Some(4), false, true, [Some(4), Some(3)]), Some(3));
        // Containers from an agent that predates revisions: unknown.
        assert_eq!(running_revision(Some(4), false, true, [None]), None);
        // Payloads without a revision (older operators): unknown, always.
        assert_eq!(running_revision(None, true, false, [Some(3)]), None);
        assert_eq!(running_revision(None, false, true, [Some(3)]), None);
    }
}
