//! Which devices a Deployment runs on. Pure, except for [`TargetBook`], the shared
//! record of what the write path last decided, which the aggregator counts over.
//!
//! - `targetDevices`: exactly the listed ids, registered or not.
//! - `selector`: the registered `Device`s whose labels match and that are not
//!   revoked. Membership is continuous: a device labelled in gets the deployment,
//!   one labelled out (or revoked, or deleted) loses it.
//! - A selector that suddenly matches far fewer devices is suspicious (a typo in a
//!   label can remove a service from a whole region). When one change would take
//!   the deployment off more than `maxShrinkPercent` of the devices that hold it,
//!   and more than one device, the removals are held: those devices keep it until
//!   a person confirms with the token the `RemovalsHeld` condition names, or undoes
//!   the change.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use harmony_reconciler_contracts::{DeploymentRef, Id, spec_hash_of};
use iot_api::{Device, DeviceSelector};

/// The registered devices a selector matches: not revoked, named by a valid id.
pub fn select<'a>(devices: impl IntoIterator<Item = &'a Device>, selector: &DeviceSelector) -> BTreeSet<Id> {
    devices
        .into_iter()
        .filter(|d| d.revoked_at().is_none() && d.metadata.deletion_timestamp.is_none())
        .filter(|d| selector.matches(d.label_map()))
        .filter_map(|d| Id::new(d.metadata.name.clone()?).ok())
        .collect()
}

/// Removals the guard holds back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub devices: BTreeSet<Id>,
    /// What the confirmation annotation must say to let exactly these go.
    pub token: String,
}

/// What the write path acts on for a selector Deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guarded {
    /// Devices that get the deployment: the matched ones plus any held removals.
    pub targets: BTreeSet<Id>,
    pub matched: usize,
    pub held: Option<Held>,
    /// Devices this decision takes the deployment off.
    pub removals: BTreeSet<Id>,
    /// A person confirmed these removals.
    pub confirmed: bool,
}

/// The token that confirms removing exactly `devices`.
pub fn shrink_token(devices: &BTreeSet<Id>) -> String {
    let ids: Vec<&str> = devices.iter().map(Id::as_str).collect();
    spec_hash_of(&ids).as_str().chars().take(10).collect()
}

/// Applies the shrink guard. `holding` are the devices that hold the deployment
/// now (its keys in KV), `matched` what the selector matches, and `recent` the
/// devices it was taken off within the last [`SHRINK_WINDOW`] without a
/// confirmation: a region relabelled one device at a time (`kubectl label` sends
/// one request per object) counts as one shrink, not as many small ones.
pub fn guard_removals(
    matched: BTreeSet<Id>,
    holding: &BTreeSet<Id>,
    recent: &BTreeSet<Id>,
    max_shrink_percent: u32,
    confirmation: Option<&str>,
) -> Guarded {
    let removals: BTreeSet<Id> = holding.difference(&matched).cloned().collect();
    let matched_count = matched.len();
    let still_gone: BTreeSet<&Id> = recent.iter().filter(|d| !matched.contains(*d)).collect();
    let shrink = removals.len() + still_gone.iter().filter(|d| !holding.contains(**d)).count();
    let baseline = holding.len() + still_gone.iter().filter(|d| !holding.contains(**d)).count();
    let too_many = !removals.is_empty() && shrink > 1 && shrink * 100 > baseline * max_shrink_percent as usize;
    let token = shrink_token(&removals);
    let confirmed = too_many && confirmation == Some(token.as_str());
    if !too_many || confirmed {
        return Guarded {
            targets: matched,
            matched: matched_count,
            held: None,
            removals,
            confirmed,
        };
    }
    let mut targets = matched;
    targets.extend(removals.iter().cloned());
    Guarded {
        targets,
        matched: matched_count,
        held: Some(Held {
            devices: removals,
            token,
        }),
        removals: BTreeSet::new(),
        confirmed: false,
    }
}

/// How long removals count towards one shrink.
pub const SHRINK_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// Devices each deployment was recently taken off without a confirmation, for
/// [`guard_removals`]. In memory: an operator restart forgets it (the guard then
/// starts counting again).
#[derive(Debug, Default)]
pub struct ShrinkLedger {
    removed: Mutex<HashMap<DeploymentRef, Vec<(std::time::Instant, Id)>>>,
}

impl ShrinkLedger {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeploymentRef, Vec<(std::time::Instant, Id)>>> {
        self.removed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The devices removed within the window.
    pub fn recent(&self, deployment: &DeploymentRef) -> BTreeSet<Id> {
        let mut map = self.lock();
        let Some(list) = map.get_mut(deployment) else {
            return BTreeSet::new();
        };
        list.retain(|(at, _)| at.elapsed() < SHRINK_WINDOW);
        let ids = list.iter().map(|(_, d)| d.clone()).collect();
        if list.is_empty() {
            map.remove(deployment);
        }
        ids
    }

    /// Removals that went through unconfirmed (small ones) count for the window.
    pub fn record(&self, deployment: &DeploymentRef, removed: impl IntoIterator<Item = Id>) {
        let now = std::time::Instant::now();
        let mut map = self.lock();
        let list = map.entry(deployment.clone()).or_default();
        list.extend(removed.into_iter().map(|d| (now, d)));
        if list.is_empty() {
            map.remove(deployment);
        }
    }

    /// A person confirmed a shrink (or the deployment is gone): start afresh.
    pub fn clear(&self, deployment: &DeploymentRef) {
        self.lock().remove(deployment);
    }
}

/// What the write path last wrote for a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub targets: BTreeSet<Id>,
    pub revision: Option<u64>,
    /// The hash devices report once they run the current revision (its images
    /// pinned); `None` before the write path decided.
    pub spec_hash: Option<harmony_reconciler_contracts::SpecHash>,
    /// The generation that decision was for: a fleet summary judged against
    /// `spec_hash` is about this generation, not a later edit not written yet
    /// (its tags may be unresolvable for a while).
    pub generation: Option<i64>,
}

/// The write path's latest decision per deployment, shared with the aggregator
/// (which counts over the devices that hold a deployment) and with the Device
/// watch (which must wake the deployments a device leaves).
#[derive(Debug, Default)]
pub struct TargetBook {
    resolved: Mutex<HashMap<DeploymentRef, Arc<Resolved>>>,
}

impl TargetBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeploymentRef, Arc<Resolved>>> {
        self.resolved.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set(&self, deployment: DeploymentRef, resolved: Resolved) {
        let mut map = self.lock();
        if map.get(&deployment).map(|r| r.as_ref()) != Some(&resolved) {
            map.insert(deployment, Arc::new(resolved));
        }
    }

    pub fn get(&self, deployment: &DeploymentRef) -> Option<Arc<Resolved>> {
        self.lock().get(deployment).cloned()
    }

    pub fn forget(&self, deployment: &DeploymentRef) {
        self.lock().remove(deployment);
    }

    /// Deployments whose targets include `device`.
    pub fn holding(&self, device: &Id) -> Vec<DeploymentRef> {
        self.lock()
            .iter()
            .filter(|(_, r)| r.targets.contains(device))
            .map(|(d, _)| d.clone())
            .collect()
    }
}
