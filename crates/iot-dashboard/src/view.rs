//! What each page shows, as pure functions of one snapshot of the fleet and the
//! time. Everything the pages render comes from here, and most tests hit these.
//!
//! Silence is a state, not an absence: a device whose last report reached NATS
//! longer ago than the staleness threshold (by the server's timestamp) is stale, and a device
//! that a deployment targets but that never reported is "never seen". Both count as
//! problems everywhere, never as fine.
//!
//! The `Device` objects (labels, `spec.paused`, revocation) come from Kubernetes
//! and are the registry; whether a device is online comes from NATS alone. When
//! the dashboard cannot read the Device objects ([`Snapshot::registry`] is
//! `None`), it shows no labels and marks nothing as unregistered: it does not
//! know, and an unknown registry must not look like an empty one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use harmony_reconciler_contracts::report::Staleness;
use harmony_reconciler_contracts::{
    AgentStatus, DeploymentPhase, DeploymentRef, EventEntry, Id, Phase, PullState, Severity,
};
use iot_api::{Deployment, Device, DeviceSelector, RolloutPhase, SelectorOperator, conditions};
use kube::ResourceExt;

/// The latest report of one device, stamped with when NATS stored it.
#[derive(Debug, Clone)]
pub struct DeviceRecord {
    pub status: AgentStatus,
    pub received_at: DateTime<Utc>,
}

/// One consistent look at the fleet.
#[derive(Debug, Clone)]
pub struct Snapshot<'a> {
    pub devices: &'a HashMap<Id, DeviceRecord>,
    pub deployments: &'a [Arc<Deployment>],
    /// The Device objects by name, once the dashboard has their first full list;
    /// `None` while it may not read them (forbidden, no CRD) or has no list yet.
    pub registry: Option<&'a HashMap<String, Arc<Device>>>,
    pub now: DateTime<Utc>,
    pub staleness: Staleness,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeviceState {
    Online,
    Stale,
    NeverSeen,
}

impl DeviceState {
    pub fn label(self) -> &'static str {
        match self {
            DeviceState::Online => "online",
            DeviceState::Stale => "stale",
            DeviceState::NeverSeen => "never seen",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "online" => Some(DeviceState::Online),
            "stale" => Some(DeviceState::Stale),
            "never" | "never-seen" | "never seen" => Some(DeviceState::NeverSeen),
            _ => None,
        }
    }
}

/// A deployment's overall state, from its conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeploymentState {
    Degraded,
    Progressing,
    Pending,
    Ready,
}

impl DeploymentState {
    pub fn label(self) -> &'static str {
        match self {
            DeploymentState::Degraded => "degraded",
            DeploymentState::Progressing => "progressing",
            DeploymentState::Pending => "pending",
            DeploymentState::Ready => "ready",
        }
    }
}

/// A device's phase for one deployment, as the pages show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DevicePhase {
    Failed,
    Unreported,
    Pending,
    /// Running, but an older spec than the deployment's current one.
    Outdated,
    Running,
}

impl DevicePhase {
    pub fn label(self) -> &'static str {
        match self {
            DevicePhase::Failed => "failed",
            DevicePhase::Unreported => "unreported",
            DevicePhase::Pending => "pending",
            DevicePhase::Outdated => "outdated",
            DevicePhase::Running => "running",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            DevicePhase::Failed,
            DevicePhase::Unreported,
            DevicePhase::Pending,
            DevicePhase::Outdated,
            DevicePhase::Running,
        ]
        .into_iter()
        .find(|p| p.label() == s)
    }
}

impl Snapshot<'_> {
    pub fn device_state(&self, id: &Id) -> DeviceState {
        match self.devices.get(id) {
            None => DeviceState::NeverSeen,
            Some(r) if self.staleness.is_stale(r.received_at, self.now) => DeviceState::Stale,
            Some(_) => DeviceState::Online,
        }
    }

    /// Every device that reported, that some deployment lists, or that has a
    /// Device object.
    fn all_device_ids(&self) -> Vec<Id> {
        let mut ids: BTreeSet<Id> = self.devices.keys().cloned().collect();
        for d in self.deployments {
            if let Ok(targets) = d.spec.target_ids() {
                ids.extend(targets);
            }
        }
        if let Some(registry) = self.registry {
            ids.extend(registry.keys().filter_map(|name| Id::new(name.as_str()).ok()));
        }
        ids.into_iter().collect()
    }

    /// What the Device object of `id` says (labels, paused, revoked), or that the
    /// device reports without one. Nothing while the registry is unknown.
    pub fn registration(&self, id: &Id) -> Registration {
        let Some(registry) = self.registry else {
            return Registration::default();
        };
        match registry.get(id.as_str()) {
            Some(d) => Registration {
                labels: d.label_map().clone(),
                paused: d.spec.paused,
                revoked: revoked_since(d),
                unregistered: false,
            },
            None => Registration {
                unregistered: self.devices.contains_key(id),
                ..Registration::default()
            },
        }
    }

    /// Whether a selector deployment selects the Device named `id`, by the
    /// operator's rule: a registered Device, not revoked, not being deleted, whose
    /// labels match. Never for an unknown registry.
    fn selects(&self, selector: &DeviceSelector, id: &str) -> bool {
        self.registry
            .and_then(|r| r.get(id))
            .is_some_and(|d| selected_by(selector, d))
    }
}

/// The operator's rule for one Device (`iot-operator`'s `targeting::select`).
fn selected_by(selector: &DeviceSelector, d: &Device) -> bool {
    revoked_since(d).is_none() && d.metadata.deletion_timestamp.is_none() && selector.matches(d.label_map())
}

/// When the device was revoked, if it was: `iotctl device revoke`'s annotation,
/// or the operator's `Revoked` condition (either is enough).
pub fn revoked_since(d: &Device) -> Option<String> {
    if let Some(at) = d.revoked_at() {
        return Some(at.to_owned());
    }
    d.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::REVOKED && c.status == "True")
        .map(|c| c.last_transition_time.0.to_string())
}

/// A device's standing in the registry, as the pages mark it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registration {
    /// The Device's labels (none without a Device, or with the registry unknown).
    pub labels: BTreeMap<String, String>,
    /// `spec.paused`: out of every rollout, keeps what it runs.
    pub paused: bool,
    /// Revoked, and since when (as the annotation or condition says it).
    pub revoked: Option<String>,
    /// It reports, but has no Device object: no selector can match it. Only said
    /// when the registry is known.
    pub unregistered: bool,
}

/// A mark the device list can be filtered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mark {
    Revoked,
    Unregistered,
    Paused,
}

impl Mark {
    pub const ALL: [Mark; 3] = [Mark::Revoked, Mark::Unregistered, Mark::Paused];

    pub fn label(self) -> &'static str {
        match self {
            Mark::Revoked => "revoked",
            Mark::Unregistered => "unregistered",
            Mark::Paused => "paused",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Mark::ALL.into_iter().find(|m| m.label() == s)
    }

    fn on(self, r: &Registration) -> bool {
        match self {
            Mark::Revoked => r.revoked.is_some(),
            Mark::Unregistered => r.unregistered,
            Mark::Paused => r.paused,
        }
    }
}

/// A selector as people write it: `site=madrid, ring in (canary, early)`,
/// `gpu`, `!retired`. An empty one says that it matches nothing.
pub fn selector_text(s: &DeviceSelector) -> String {
    if s.is_empty() {
        return "(empty: matches no device)".to_owned();
    }
    let mut parts: Vec<String> = s.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    for r in &s.match_expressions {
        parts.push(match r.operator {
            SelectorOperator::In => format!("{} in ({})", r.key, r.values.join(", ")),
            SelectorOperator::NotIn => format!("{} notin ({})", r.key, r.values.join(", ")),
            SelectorOperator::Exists => r.key.clone(),
            SelectorOperator::DoesNotExist => format!("!{}", r.key),
        });
    }
    parts.join(", ")
}

/// The devices a deployment's page lists. `targetDevices`: exactly those. A
/// selector: the Devices it selects now, plus every device whose live report
/// carries the deployment (it runs there, e.g. while a held removal waits, or
/// while the registry is unknown).
pub fn deployment_devices(snap: &Snapshot<'_>, dep: &Deployment) -> BTreeSet<Id> {
    let Some(selector) = &dep.spec.selector else {
        return dep.spec.target_ids().unwrap_or_default();
    };
    let mut ids = BTreeSet::new();
    if let Some(registry) = snap.registry {
        ids.extend(
            registry
                .iter()
                .filter(|(_, d)| selected_by(selector, d))
                .filter_map(|(name, _)| Id::new(name.as_str()).ok()),
        );
    }
    if let Some(key) = deployment_ref(dep) {
        ids.extend(
            snap.devices
                .iter()
                .filter(|(_, r)| r.status.deployments.contains_key(&key))
                .map(|(id, _)| id.clone()),
        );
    }
    ids
}

/// One deployment on a device's page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDeployment {
    /// `namespace/name`.
    pub deployment: String,
    pub phase: DevicePhase,
    pub error: Option<String>,
    /// The selector that brings it here; `None`: the device is listed by id.
    pub selector: Option<String>,
    /// The image pull it waits on, if any.
    pub pull: Option<PullView>,
}

/// An image pull a deployment waits on, as the pages show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullView {
    /// `pulling IMAGE 12.3/40.0 MiB (30%), 14s`, `pulling IMAGE layers 2/5, 14s` or
    /// `pull failed, retrying: ERROR`.
    pub text: String,
    /// Bytes done and the total, when the total is known (for a progress bar).
    pub bytes: Option<(u64, u64)>,
    pub failed: bool,
}

/// The pull a deployment waits on, from its phase in the device's report. Written
/// like `iotctl devices` writes it. The age counts from the attempt's start on the
/// device's clock.
pub fn pull_view(p: &DeploymentPhase, now: DateTime<Utc>) -> Option<PullView> {
    let pull = p.pull.as_ref()?;
    let took = age(now - pull.started_at);
    let text = harmony_reconciler_contracts::pull_text::pull_summary(p, &took, "dashboard")?;
    Some(PullView {
        text,
        bytes: pull.bytes_total.filter(|t| *t > 0).map(|t| (pull.bytes_done.min(t), t)),
        failed: pull.state == PullState::Failed,
    })
}

/// The pull `device` waits on for `dep`, from its latest report.
fn device_pull(snap: &Snapshot<'_>, device: &Id, dep: &Deployment) -> Option<PullView> {
    let key = deployment_ref(dep)?;
    let p = snap.devices.get(device)?.status.deployments.get(&key)?;
    pull_view(p, snap.now)
}

/// The deployments of one device: those that list it, and the selector
/// deployments whose selector matches its Device or that its live report carries.
pub fn device_deployments(snap: &Snapshot<'_>, id: &Id) -> Vec<DeviceDeployment> {
    let report = snap.devices.get(id);
    snap.deployments
        .iter()
        .filter_map(|d| {
            let key = deployment_ref(d)?;
            let here = match &d.spec.selector {
                None => d.spec.target_devices.iter().any(|t| t == id.as_str()),
                Some(s) => {
                    snap.selects(s, id.as_str()) || report.is_some_and(|r| r.status.deployments.contains_key(&key))
                }
            };
            if !here {
                return None;
            }
            let (phase, error) = device_phase(snap, id, d);
            Some(DeviceDeployment {
                deployment: format!("{}/{}", key.namespace(), key.name()),
                phase,
                error,
                selector: d.spec.selector.as_ref().map(selector_text),
                pull: device_pull(snap, id, d),
            })
        })
        .collect()
}

pub fn deployment_ref(d: &Deployment) -> Option<DeploymentRef> {
    DeploymentRef::new(d.namespace().unwrap_or_default(), d.name_any()).ok()
}

pub fn deployment_state(d: &Deployment) -> DeploymentState {
    let is_true = |kind: &str| {
        d.status
            .as_ref()
            .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == kind && c.status == "True"))
    };
    if is_true(conditions::DEGRADED) {
        DeploymentState::Degraded
    } else if is_true(conditions::READY) {
        DeploymentState::Ready
    } else if is_true(conditions::PROGRESSING) {
        DeploymentState::Progressing
    } else {
        DeploymentState::Pending
    }
}

/// Where one device stands on one deployment.
pub fn device_phase(snap: &Snapshot<'_>, device: &Id, dep: &Deployment) -> (DevicePhase, Option<String>) {
    let Some(r) = snap.devices.get(device) else {
        return (DevicePhase::Unreported, None);
    };
    if snap.device_state(device) != DeviceState::Online {
        return (DevicePhase::Unreported, None);
    }
    let Some(key) = deployment_ref(dep) else {
        return (DevicePhase::Unreported, None);
    };
    let Some(p) = r.status.deployments.get(&key) else {
        return (DevicePhase::Pending, None);
    };
    let current = dep.spec.score.spec_hash();
    let on_current = p.spec_hash.as_ref() == Some(&current);
    let phase = match p.phase {
        Phase::Failed => DevicePhase::Failed,
        Phase::Running if on_current => DevicePhase::Running,
        Phase::Running => DevicePhase::Outdated,
        Phase::Pending | Phase::Unknown => DevicePhase::Pending,
    };
    (phase, p.last_error.clone())
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overview {
    pub online: usize,
    pub stale: usize,
    pub never_seen: usize,
    /// Devices revoked, and devices that report without a Device object; `None`
    /// while the registry is unknown.
    pub revoked: Option<usize>,
    pub unregistered: Option<usize>,
    pub deployments_by_state: BTreeMap<&'static str, usize>,
    pub deployments: usize,
    /// Error message -> devices affected, summed over deployments, most first.
    pub top_errors: Vec<(String, u32, Vec<Id>)>,
    /// Newest device events across the fleet, newest first.
    pub recent: Vec<(Id, EventEntry)>,
}

pub fn overview(snap: &Snapshot<'_>, recent_limit: usize) -> Overview {
    let mut o = Overview::default();
    for id in snap.all_device_ids() {
        match snap.device_state(&id) {
            DeviceState::Online => o.online += 1,
            DeviceState::Stale => o.stale += 1,
            DeviceState::NeverSeen => o.never_seen += 1,
        }
        if snap.registry.is_some() {
            let r = snap.registration(&id);
            *o.revoked.get_or_insert(0) += usize::from(r.revoked.is_some());
            *o.unregistered.get_or_insert(0) += usize::from(r.unregistered);
        }
    }
    if snap.registry.is_some() {
        o.revoked.get_or_insert(0);
        o.unregistered.get_or_insert(0);
    }
    let mut errors: BTreeMap<String, (u32, Vec<Id>)> = BTreeMap::new();
    for d in snap.deployments {
        *o.deployments_by_state.entry(deployment_state(d).label()).or_default() += 1;
        o.deployments += 1;
        for g in d
            .status
            .as_ref()
            .and_then(|s| s.aggregate.as_ref())
            .map(|a| a.top_errors.as_slice())
            .unwrap_or_default()
        {
            let e = errors.entry(g.message.clone()).or_default();
            e.0 += g.devices;
            for dev in &g.example_devices {
                if e.1.len() < 3 && !e.1.contains(dev) {
                    e.1.push(dev.clone());
                }
            }
        }
    }
    let mut top: Vec<_> = errors.into_iter().map(|(m, (n, ex))| (m, n, ex)).collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top.truncate(5);
    o.top_errors = top;
    let mut recent: Vec<(Id, EventEntry)> = snap
        .devices
        .iter()
        .flat_map(|(id, r)| r.status.recent_events.iter().map(move |e| (id.clone(), e.clone())))
        .collect();
    recent.sort_by_key(|e| std::cmp::Reverse(e.1.at));
    recent.truncate(recent_limit);
    o.recent = recent;
    o
}

/// One row of the deployments list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRow {
    pub namespace: String,
    pub name: String,
    pub state: DeploymentState,
    pub targets: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub pending: u32,
    pub unreported: u32,
    /// The selector, as people write it; `None`: the deployment lists its devices.
    pub selector: Option<String>,
    /// Registered, unrevoked Devices the selector matches now (`status.matchedDevices`).
    pub matched: Option<u32>,
    /// `status.currentRevision`.
    pub revision: Option<u64>,
    /// "3/5 on rev 7".
    pub revision_summary: Option<String>,
    /// The newest revision every target ran at once.
    pub last_good_revision: Option<u64>,
    /// (type, status, reason) of each condition.
    pub conditions: Vec<(String, String, String)>,
    pub created: Option<DateTime<Utc>>,
    /// The phase and summary of `.status.rollout` (`batch 2/4, 37/120`).
    pub rollout: Option<(RolloutPhase, String)>,
}

pub fn deployment_rows(snap: &Snapshot<'_>) -> Vec<DeploymentRow> {
    let mut rows: Vec<DeploymentRow> = snap.deployments.iter().map(|d| deployment_row(d)).collect();
    rows.sort_by(|a, b| {
        a.state
            .cmp(&b.state)
            .then_with(|| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)))
    });
    rows
}

pub fn deployment_row(d: &Deployment) -> DeploymentRow {
    let agg = d.status.as_ref().and_then(|s| s.aggregate.clone()).unwrap_or_default();
    let matched = d.status.as_ref().and_then(|s| s.matched_devices);
    // The aggregate counts the devices the deployment runs on (for a selector:
    // matched plus held removals). Before it has any, the spec's list, or for a
    // selector what it matches: never `targetDevices.len()`, which is 0 there.
    let targets = match (agg.targets, &d.spec.selector) {
        (0, None) => d.spec.target_devices.len() as u32,
        (0, Some(_)) => matched.unwrap_or_default(),
        (n, _) => n,
    };
    DeploymentRow {
        namespace: d.namespace().unwrap_or_default(),
        name: d.name_any(),
        state: deployment_state(d),
        targets,
        succeeded: agg.succeeded,
        failed: agg.failed,
        pending: agg.pending,
        unreported: agg.unreported,
        selector: d.spec.selector.as_ref().map(selector_text),
        matched,
        revision: d.status.as_ref().and_then(|s| s.current_revision),
        revision_summary: agg.revision_summary.clone(),
        last_good_revision: agg.last_good_revision,
        conditions: d
            .status
            .as_ref()
            .map(|s| {
                s.conditions
                    .iter()
                    .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
                    .collect()
            })
            .unwrap_or_default(),
        created: d
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| DateTime::from_timestamp_micros(t.0.as_microsecond()).unwrap_or_default()),
        rollout: d
            .status
            .as_ref()
            .and_then(|s| s.rollout.as_ref())
            .map(|r| (r.phase, r.summary.clone())),
    }
}

/// A page of rows and where it sits in the whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub rows: Vec<T>,
    pub total: usize,
    pub page: usize,
    pub pages: usize,
}

pub fn paginate<T>(all: Vec<T>, page: usize, per_page: usize) -> Page<T> {
    let per_page = per_page.max(1);
    let total = all.len();
    let pages = total.div_ceil(per_page).max(1);
    let page = page.clamp(1, pages);
    let rows = all.into_iter().skip((page - 1) * per_page).take(per_page).collect();
    Page {
        rows,
        total,
        page,
        pages,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseRow {
    pub device: Id,
    pub phase: DevicePhase,
    pub error: Option<String>,
    /// The image pull it waits on, if any.
    pub pull: Option<PullView>,
}

/// The per-device table of one deployment, counted by phase and filtered.
pub fn phase_table(
    snap: &Snapshot<'_>,
    dep: &Deployment,
    only: Option<DevicePhase>,
) -> (BTreeMap<DevicePhase, usize>, Vec<PhaseRow>) {
    let mut counts = BTreeMap::new();
    let mut rows = Vec::new();
    for device in deployment_devices(snap, dep) {
        let (phase, error) = device_phase(snap, &device, dep);
        *counts.entry(phase).or_default() += 1;
        if only.is_none_or(|o| o == phase) {
            let pull = device_pull(snap, &device, dep);
            rows.push(PhaseRow {
                device,
                phase,
                error,
                pull,
            });
        }
    }
    rows.sort_by(|a, b| a.phase.cmp(&b.phase).then_with(|| a.device.cmp(&b.device)));
    (counts, rows)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    pub id: Id,
    pub state: DeviceState,
    pub heartbeat_age: Option<Duration>,
    pub agent_version: String,
    pub arch: String,
    pub os: String,
    pub deployments: usize,
    pub failed: usize,
    pub registration: Registration,
}

/// Whether a device is what the search box asks for: its id contains the text, or
/// one of its labels does, written `key=value`.
fn found(id: &Id, labels: &BTreeMap<String, String>, query: &str) -> bool {
    query.is_empty() || id.as_str().contains(query) || labels.iter().any(|(k, v)| format!("{k}={v}").contains(query))
}

pub fn device_rows(snap: &Snapshot<'_>, only: Option<DeviceState>, mark: Option<Mark>, query: &str) -> Vec<DeviceRow> {
    let mut rows: Vec<DeviceRow> = snap
        .all_device_ids()
        .into_iter()
        .map(|id| (snap.registration(&id), id))
        .filter(|(reg, id)| found(id, &reg.labels, query) && mark.is_none_or(|m| m.on(reg)))
        .map(|(registration, id)| {
            let state = snap.device_state(&id);
            let r = snap.devices.get(&id);
            let inv = r.and_then(|r| r.status.inventory.clone()).unwrap_or_default();
            DeviceRow {
                registration,
                state,
                heartbeat_age: r.map(|r| snap.now - r.received_at),
                agent_version: r.map(|r| r.status.agent_version.clone()).unwrap_or_default(),
                arch: inv.arch,
                os: inv.os,
                deployments: r.map(|r| r.status.deployments.len()).unwrap_or_default(),
                failed: r
                    .map(|r| {
                        r.status
                            .deployments
                            .values()
                            .filter(|p| p.phase == Phase::Failed)
                            .count()
                    })
                    .unwrap_or_default(),
                id,
            }
        })
        .filter(|r| only.is_none_or(|o| o == r.state))
        .collect();
    // Problems first: never seen, stale, then failing devices.
    rows.sort_by(|a, b| {
        b.state
            .cmp(&a.state)
            .then_with(|| b.failed.cmp(&a.failed))
            .then_with(|| a.id.cmp(&b.id))
    });
    rows
}

/// A short, human age: "4s", "3m", "2h", "5d".
pub fn age(d: Duration) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

pub fn severity_label(s: Severity) -> &'static str {
    match s {
        Severity::Info => "info",
        Severity::Warning => "warning",
        Severity::Error => "error",
        Severity::Unknown => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use harmony_reconciler_contracts::DeploymentPhase;
    use iot_api::{DeploymentSpec, DeviceSpec};

    fn dep(name: &str, targets: &[&str]) -> Arc<Deployment> {
        let spec: DeploymentSpec = serde_json::from_value(serde_json::json!({
            "targetDevices": targets,
            "score": {"PodmanV0": {"services": [{"name": "web", "image": "localhost/iot-web:v1"}]}}
        }))
        .expect("spec");
        let mut d = Deployment::new(name, spec);
        d.metadata.namespace = Some("default".into());
        Arc::new(d)
    }

    fn report(id: &str, at: DateTime<Utc>, phases: Vec<(&Deployment, Phase, bool)>) -> (Id, DeviceRecord) {
        let mut status: AgentStatus = serde_json::from_value(serde_json::json!({
            "device_id": id, "heartbeat_at": at,
        }))
        .expect("status");
        for (d, phase, current) in phases {
            let hash = if current { Some(d.spec.score.spec_hash()) } else { None };
            let err = (phase == Phase::Failed).then(|| "image not found".to_owned());
            status.deployments.insert(
                deployment_ref(d).expect("ref"),
                DeploymentPhase::new(phase, hash, err, at),
            );
        }
        (
            Id::new(id).expect("id"),
            DeviceRecord {
                status,
                received_at: at,
            },
        )
    }

    #[test]
    fn silence_is_a_problem_not_an_absence() {
        let now = Utc::now();
        let web = dep("web", &["a", "b", "c"]);
        let devices: HashMap<Id, DeviceRecord> = [
            report("a", now - Duration::seconds(2), vec![(&web, Phase::Running, true)]),
            report("b", now - Duration::seconds(120), vec![(&web, Phase::Running, true)]),
        ]
        .into_iter()
        .collect();
        let deployments = vec![web.clone()];
        let snap = Snapshot {
            devices: &devices,
            deployments: &deployments,
            registry: None,
            now,
            staleness: Staleness::default(),
        };
        let o = overview(&snap, 10);
        assert_eq!((o.online, o.stale, o.never_seen), (1, 1, 1));
        let (counts, rows) = phase_table(&snap, &web, None);
        assert_eq!(counts.get(&DevicePhase::Running), Some(&1));
        // b's report says Running, but it is stale: that is not a running device.
        assert_eq!(counts.get(&DevicePhase::Unreported), Some(&2));
        assert_eq!(rows[0].phase, DevicePhase::Unreported);
        let stale = device_rows(&snap, Some(DeviceState::Stale), None, "");
        assert_eq!(stale.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["b"]);
    }

    #[test]
    fn phases_filter_and_an_older_spec_is_not_running() {
        let now = Utc::now();
        let web = dep("web", &["a", "b", "c"]);
        let devices: HashMap<Id, DeviceRecord> = [
            report("a", now, vec![(&web, Phase::Failed, true)]),
            report("b", now, vec![(&web, Phase::Running, false)]),
            report("c", now, vec![(&web, Phase::Running, true)]),
        ]
        .into_iter()
        .collect();
        let deployments = vec![web.clone()];
        let snap = Snapshot {
            devices: &devices,
            deployments: &deployments,
            registry: None,
            now,
            staleness: Staleness::default(),
        };
        let (_, failed) = phase_table(&snap, &web, Some(DevicePhase::Failed));
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].device.as_str(), "a");
        assert_eq!(failed[0].error.as_deref(), Some("image not found"));
        let (counts, _) = phase_table(&snap, &web, None);
        assert_eq!(counts.get(&DevicePhase::Outdated), Some(&1));
        assert_eq!(counts.get(&DevicePhase::Running), Some(&1));
        assert!(failed[0].pull.is_none());
    }

    #[test]
    fn the_device_and_deployment_tables_carry_the_pull_a_device_reports() {
        let now = DateTime::from_timestamp(1_767_225_614, 0).unwrap_or_default();
        let web = dep("web", &["a"]);
        let (id, mut record) = report("a", now, vec![(&web, Phase::Pending, true)]);
        let key = deployment_ref(&web).expect("ref");
        if let Some(p) = record.status.deployments.get_mut(&key) {
            p.pull = pulling(PullState::Pulling, None, (2, 5)).pull;
        }
        let devices: HashMap<Id, DeviceRecord> = [(id.clone(), record)].into_iter().collect();
        let deployments = vec![web.clone()];
        let snap = Snapshot {
            devices: &devices,
            deployments: &deployments,
            registry: None,
            now,
            staleness: Staleness::default(),
        };
        let want = Some("pulling 10.77.0.1:5000/iot/web@sha256:ab12cd34ef56 layers 2/5, 14s".to_owned());
        let (_, rows) = phase_table(&snap, &web, None);
        assert_eq!(rows[0].pull.as_ref().map(|p| p.text.clone()), want);
        let on_device = device_deployments(&snap, &id);
        assert_eq!(on_device[0].pull.as_ref().map(|p| p.text.clone()), want);
    }

    fn selector_dep(name: &str, selector: serde_json::Value, status: serde_json::Value) -> Arc<Deployment> {
        let mut d: Deployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "iot.nationtech.io/v1alpha1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "selector": selector,
                "score": {"PodmanV0": {"services": [{"name": "web", "image": "localhost/iot-web:v1"}]}}
            },
        }))
        .expect("deployment");
        d.status = serde_json::from_value(status).expect("status");
        Arc::new(d)
    }

    fn device_object(name: &str, labels: &[(&str, &str)]) -> Device {
        let mut d = Device::new(name, DeviceSpec::default());
        d.metadata.labels = Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        d
    }

    fn registry_of(devices: Vec<Device>) -> HashMap<String, Arc<Device>> {
        devices
            .into_iter()
            .map(|d| (d.metadata.name.clone().unwrap_or_default(), Arc::new(d)))
            .collect()
    }

    fn marks_of(rows: &[DeviceRow]) -> BTreeMap<String, Registration> {
        rows.iter()
            .map(|r| (r.id.to_string(), r.registration.clone()))
            .collect()
    }

    /// A registry with: `lab-1` labelled and paused, `gone-1` revoked by
    /// `iotctl device revoke`'s annotation, `gone-2` revoked by the operator's
    /// condition only, `quiet-1` registered but never reporting.
    fn fleet_registry() -> HashMap<String, Arc<Device>> {
        let mut paused = device_object("lab-1", &[("site", "madrid"), ("ring", "canary")]);
        paused.spec.paused = true;
        let mut by_annotation = device_object("gone-1", &[("site", "madrid")]);
        by_annotation.metadata.annotations = Some(
            [(
                iot_api::REVOKED_ANNOTATION.to_owned(),
                "2026-01-02T03:04:05Z".to_owned(),
            )]
            .into_iter()
            .collect(),
        );
        let mut by_condition = device_object("gone-2", &[("site", "madrid")]);
        by_condition.status = serde_json::from_value(serde_json::json!({"conditions": [{
            "type": "Revoked", "status": "True", "reason": "IdentityRevoked", "message": "",
            "lastTransitionTime": "2026-01-03T00:00:00Z"
        }]}))
        .expect("status");
        registry_of(vec![
            paused,
            by_annotation,
            by_condition,
            device_object("quiet-1", &[("site", "paris")]),
        ])
    }

    #[test]
    fn revoked_paused_and_unregistered_devices_are_marked_only_when_the_registry_is_known() {
        let now = Utc::now();
        let devices: HashMap<Id, DeviceRecord> = ["lab-1", "gone-1", "gone-2", "stray-1"]
            .into_iter()
            .map(|id| report(id, now, vec![]))
            .collect();
        let registry = fleet_registry();
        let deployments = Vec::new();
        let known = Snapshot {
            devices: &devices,
            deployments: &deployments,
            registry: Some(&registry),
            now,
            staleness: Staleness::default(),
        };
        let marks = marks_of(&device_rows(&known, None, None, ""));
        // Registered but never reporting: listed, never seen, not unregistered.
        assert_eq!(
            marks["quiet-1"],
            Registration {
                labels: [("site".to_owned(), "paris".to_owned())].into_iter().collect(),
                ..Registration::default()
            }
        );
        assert!(
            device_rows(&known, Some(DeviceState::NeverSeen), None, "")
                .iter()
                .any(|r| r.id.as_str() == "quiet-1")
        );
        assert!(marks["lab-1"].paused && marks["lab-1"].revoked.is_none() && !marks["lab-1"].unregistered);
        assert_eq!(marks["lab-1"].labels.get("ring").map(String::as_str), Some("canary"));
        assert_eq!(marks["gone-1"].revoked.as_deref(), Some("2026-01-02T03:04:05Z"));
        assert_eq!(marks["gone-2"].revoked.as_deref(), Some("2026-01-03T00:00:00Z"));
        assert!(marks["stray-1"].unregistered && marks["stray-1"].labels.is_empty());
        assert_eq!(marks.values().filter(|r| r.unregistered).count(), 1);
        // The filters and the overview count the same marks.
        let ids = |mark| {
            device_rows(&known, None, Some(mark), "")
                .into_iter()
                .map(|r| r.id.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(Mark::Revoked), vec!["gone-1", "gone-2"]);
        assert_eq!(ids(Mark::Unregistered), vec!["stray-1"]);
        assert_eq!(ids(Mark::Paused), vec!["lab-1"]);
        let o = overview(&known, 0);
        assert_eq!((o.revoked, o.unregistered), (Some(2), Some(1)));
        assert_eq!((o.online, o.never_seen), (4, 1));
        // The search box finds labels too.
        let found: Vec<_> = device_rows(&known, None, None, "site=madrid")
            .into_iter()
            .map(|r| r.id.to_string())
            .collect();
        assert_eq!(found, vec!["gone-1", "gone-2", "lab-1"]);

        // The registry unknown (forbidden, no CRD, no list yet): no labels, and
        // nobody is called unregistered.
        let unknown = Snapshot {
            registry: None,
            ..known
        };
        let marks = marks_of(&device_rows(&unknown, None, None, ""));
        assert_eq!(marks.len(), 4, "only the reporting devices: {marks:?}");
        assert!(marks.values().all(|r| *r == Registration::default()), "{marks:?}");
        let o = overview(&unknown, 0);
        assert_eq!((o.revoked, o.unregistered), (None, None));
    }

    #[test]
    fn selectors_read_as_people_write_them() {
        let s: DeviceSelector = serde_json::from_value(serde_json::json!({
            "matchLabels": {"site": "madrid"},
            "matchExpressions": [
                {"key": "ring", "operator": "In", "values": ["canary"]},
                {"key": "model", "operator": "NotIn", "values": ["pi3", "pi2"]},
                {"key": "gpu", "operator": "Exists"},
                {"key": "retired", "operator": "DoesNotExist"}
            ]
        }))
        .expect("selector");
        assert_eq!(
            selector_text(&s),
            "site=madrid, ring in (canary), model notin (pi3, pi2), gpu, !retired"
        );
        assert_eq!(selector_text(&DeviceSelector::default()), "(empty: matches no device)");
    }

    #[test]
    fn a_selector_deployment_counts_targets_from_its_status_and_shows_its_revisions() {
        let selector = serde_json::json!({
            "matchLabels": {"site": "madrid"},
            "matchExpressions": [{"key": "ring", "operator": "In", "values": ["canary"]}]
        });
        let full = selector_dep(
            "web",
            selector.clone(),
            serde_json::json!({
                "matchedDevices": 3, "currentRevision": 7,
                "aggregate": {"specHash": "h", "targets": 5, "succeeded": 3, "failed": 0,
                    "pending": 2, "unreported": 0, "revisionSummary": "3/5 on rev 7",
                    "lastGoodRevision": 6}
            }),
        );
        assert!(full.spec.target_devices.is_empty());
        let row = deployment_row(&full);
        // The aggregate counts matched devices plus held removals.
        assert_eq!(row.targets, 5);
        assert_eq!(row.matched, Some(3));
        assert_eq!(row.selector.as_deref(), Some("site=madrid, ring in (canary)"));
        assert_eq!(row.revision, Some(7));
        assert_eq!(row.revision_summary.as_deref(), Some("3/5 on rev 7"));
        assert_eq!(row.last_good_revision, Some(6));
        // Before the aggregate has any: what the selector matches, not the empty list.
        let early = selector_dep("web", selector, serde_json::json!({"matchedDevices": 3}));
        assert_eq!(deployment_row(&early).targets, 3);
        // A listed deployment is unchanged.
        let listed = deployment_row(&dep("web", &["a", "b"]));
        assert_eq!((listed.targets, listed.selector, listed.matched), (2, None, None));
    }

    #[test]
    fn a_selector_deployment_lists_the_devices_it_selects_and_those_that_run_it() {
        let now = Utc::now();
        let sel = selector_dep(
            "web",
            serde_json::json!({"matchLabels": {"site": "madrid"}}),
            serde_json::json!({"matchedDevices": 1}),
        );
        // lab-1 matches (paused, still selected); gone-1/gone-2 match but are
        // revoked; stray-1 has no Device but its report carries the deployment.
        let devices: HashMap<Id, DeviceRecord> = [
            report("lab-1", now, vec![(&sel, Phase::Running, true)]),
            report("stray-1", now, vec![(&sel, Phase::Failed, true)]),
            report("quiet-1", now, vec![]),
        ]
        .into_iter()
        .collect();
        let registry = fleet_registry();
        let deployments = vec![sel.clone()];
        let snap = Snapshot {
            devices: &devices,
            deployments: &deployments,
            registry: Some(&registry),
            now,
            staleness: Staleness::default(),
        };
        let (counts, rows) = phase_table(&snap, &sel, None);
        let listed: Vec<_> = rows.iter().map(|r| (r.device.as_str(), r.phase)).collect();
        assert_eq!(
            listed,
            vec![("stray-1", DevicePhase::Failed), ("lab-1", DevicePhase::Running)]
        );
        assert_eq!(counts.values().sum::<usize>(), 2);
        let on = |id: &str| device_deployments(&snap, &Id::new(id).expect("id"));
        let lab = on("lab-1");
        assert_eq!(lab.len(), 1);
        assert_eq!(lab[0].deployment, "default/web");
        assert_eq!(lab[0].selector.as_deref(), Some("site=madrid"));
        assert_eq!(on("stray-1").len(), 1, "its report carries it");
        assert!(on("gone-1").is_empty(), "revoked: not selected");
        assert!(on("quiet-1").is_empty(), "site=paris");
        // With the registry unknown, only the reports say where it runs.
        let unknown = Snapshot { registry: None, ..snap };
        let (_, rows) = phase_table(&unknown, &sel, None);
        assert_eq!(rows.len(), 2);
    }

    #[test]
    fn pages_are_bounded_and_clamped() {
        let p = paginate((0..105).collect::<Vec<_>>(), 3, 50);
        assert_eq!((p.rows.len(), p.total, p.page, p.pages), (5, 105, 3, 3));
        let p = paginate((0..105).collect::<Vec<_>>(), 99, 50);
        assert_eq!(p.page, 3);
        let p = paginate(Vec::<u8>::new(), 0, 50);
        assert_eq!((p.rows.len(), p.page, p.pages), (0, 1, 1));
    }

    #[test]
    fn ages_read_like_people_say_them() {
        assert_eq!(age(Duration::seconds(4)), "4s");
        assert_eq!(age(Duration::seconds(200)), "3m");
        assert_eq!(age(Duration::hours(5)), "5h");
        assert_eq!(age(Duration::days(3)), "3d");
        assert_eq!(age(Duration::seconds(-3)), "0s");
    }

    fn pulling(state: PullState, bytes_total: Option<u64>, layers: (u32, u32)) -> DeploymentPhase {
        let at = DateTime::from_timestamp(1_767_225_600, 0).unwrap_or_default();
        let mut p = DeploymentPhase::new(Phase::Pending, None, Some("connection reset by peer".into()), at);
        p.pull = Some(harmony_reconciler_contracts::PullProgress {
            image: format!("10.77.0.1:5000/iot/web@sha256:{}", "ab12cd34ef56".repeat(5) + "ab12"),
            state,
            bytes_done: 12_897_485,
            bytes_total,
            layers_done: layers.0,
            layers_total: layers.1,
            started_at: at,
        });
        p
    }

    #[test]
    fn pulls_read_with_bytes_layers_or_the_error() {
        use harmony_reconciler_contracts::pull_text::short_digest;
        let now = DateTime::from_timestamp(1_767_225_614, 0).unwrap_or_default();
        let known = pull_view(&pulling(PullState::Pulling, Some(41_943_040), (2, 5)), now);
        assert_eq!(
            known,
            Some(PullView {
                text: "pulling 10.77.0.1:5000/iot/web@sha256:ab12cd34ef56 12.3/40.0 MiB (30%), 14s".into(),
                bytes: Some((12_897_485, 41_943_040)),
                failed: false,
            })
        );
        let unknown = pull_view(&pulling(PullState::Pulling, None, (2, 5)), now);
        assert_eq!(
            unknown.map(|p| (p.text, p.bytes)),
            Some((
                "pulling 10.77.0.1:5000/iot/web@sha256:ab12cd34ef56 layers 2/5, 14s".into(),
                None
            ))
        );
        let failed = pull_view(&pulling(PullState::Failed, Some(41_943_040), (2, 5)), now);
        assert_eq!(
            failed.map(|p| (p.text, p.failed)),
            Some(("pull failed, retrying: connection reset by peer".into(), true))
        );
        let mut none = pulling(PullState::Pulling, None, (0, 0));
        none.pull = None;
        assert_eq!(pull_view(&none, now), None);
        assert_eq!(short_digest("md5:abc"), "md5:abc");
    }
}
