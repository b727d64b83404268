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
}

/// The token that confirms removing exactly `devices`.
pub fn shrink_token(devices: &BTreeSet<Id>) -> String {
    let ids: Vec<&str> = devices.iter().map(Id::as_str).collect();
    spec_hash_of(&ids).as_str().chars().take(10).collect()
}

/// Applies the shrink guard: `holding` are the devices that hold the deployment
/// now (its keys in KV), `matched` what the selector matches.
pub fn guard_removals(
    matched: BTreeSet<Id>,
    holding: &BTreeSet<Id>,
    max_shrink_percent: u32,
    confirmation: Option<&str>,
) -> Guarded {
    let removals: BTreeSet<Id> = holding.difference(&matched).cloned().collect();
    let matched_count = matched.len();
    let too_many = removals.len() > 1 && removals.len() * 100 > holding.len() * max_shrink_percent as usize;
    if !too_many {
        return Guarded {
            targets: matched,
            matched: matched_count,
            held: None,
        };
    }
    let token = shrink_token(&removals);
    if confirmation == Some(token.as_str()) {
        return Guarded {
            targets: matched,
            matched: matched_count,
            held: None,
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
    }
}

/// What the write path last wrote for a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub targets: BTreeSet<Id>,
    pub revision: Option<u64>,
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
