//! What each page shows, as pure functions of one snapshot of the fleet and the
//! time. Everything the pages render comes from here, and most tests hit these.
//!
//! Silence is a state, not an absence: a device whose last report reached NATS
//! longer ago than the staleness threshold (by the server's timestamp) is stale, and a device
//! that a deployment targets but that never reported is "never seen". Both count as
//! problems everywhere, never as fine.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Duration, Utc};
use harmony_reconciler_contracts::report::Staleness;
use harmony_reconciler_contracts::{AgentStatus, DeploymentRef, EventEntry, Id, Phase, Severity};
use iot_api::{Deployment, conditions};
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
    pub deployments: &'a [std::sync::Arc<Deployment>],
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

    /// Every device that reported or that some deployment targets.
    fn all_device_ids(&self) -> Vec<Id> {
        let mut ids: std::collections::BTreeSet<Id> = self.devices.keys().cloned().collect();
        for d in self.deployments {
            if let Ok(targets) = d.spec.target_ids() {
                ids.extend(targets);
            }
        }
        ids.into_iter().collect()
    }
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
    /// (type, status, reason) of each condition.
    pub conditions: Vec<(String, String, String)>,
    pub created: Option<DateTime<Utc>>,
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
    DeploymentRow {
        namespace: d.namespace().unwrap_or_default(),
        name: d.name_any(),
        state: deployment_state(d),
        targets: if agg.targets == 0 {
            d.spec.target_devices.len() as u32
        } else {
            agg.targets
        },
        succeeded: agg.succeeded,
        failed: agg.failed,
        pending: agg.pending,
        unreported: agg.unreported,
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
}

/// The per-device table of one deployment, counted by phase and filtered.
pub fn phase_table(
    snap: &Snapshot<'_>,
    dep: &Deployment,
    only: Option<DevicePhase>,
) -> (BTreeMap<DevicePhase, usize>, Vec<PhaseRow>) {
    let mut counts = BTreeMap::new();
    let mut rows = Vec::new();
    for device in dep.spec.target_ids().unwrap_or_default() {
        let (phase, error) = device_phase(snap, &device, dep);
        *counts.entry(phase).or_default() += 1;
        if only.is_none_or(|o| o == phase) {
            rows.push(PhaseRow { device, phase, error });
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
}

pub fn device_rows(snap: &Snapshot<'_>, only: Option<DeviceState>, query: &str) -> Vec<DeviceRow> {
    let mut rows: Vec<DeviceRow> = snap
        .all_device_ids()
        .into_iter()
        .filter(|id| query.is_empty() || id.as_str().contains(query))
        .map(|id| {
            let state = snap.device_state(&id);
            let r = snap.devices.get(&id);
            let inv = r.and_then(|r| r.status.inventory.clone()).unwrap_or_default();
            DeviceRow {
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
    use iot_api::DeploymentSpec;
    use std::sync::Arc;

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
        let stale = device_rows(&snap, Some(DeviceState::Stale), "");
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
}
