//! `Device.status`, from the device's reports: the one writer of it.
//!
//! A heartbeat every few seconds from 10,000 devices must not become 10,000 API
//! writes a minute (Kubernetes moved node heartbeats out of Node status into Leases
//! for the same reason). So a Device's status is written when something a person
//! would see changes (online or offline, runtime, inventory, phase counts,
//! revocation), and its `lastSeenAt` alone is refreshed at most every
//! `last_seen_every` (15 minutes by default), paced so that a fleet spreads these
//! refreshes out: about `devices / last_seen_every` per second. The live heartbeat
//! stays in NATS.
//!
//! Nothing from a report reaches labels or spec: this writes the status
//! subresource only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use harmony_reconciler_contracts::report::Staleness;
use harmony_reconciler_contracts::{Phase, RuntimeState};
use iot_api::conditions::*;
use iot_api::{Device, DeviceInventory, DeviceStatus, PhaseCounts};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::Store;

use crate::conditions::carry_condition;
use crate::device_index::DeviceIndex;
use crate::fleet_aggregate::DeviceReport;
use crate::metrics::OperatorMetrics;
use crate::status_writer::FIELD_MANAGER;

#[derive(Debug, Clone, Copy)]
pub struct DeviceStatusConfig {
    /// A device whose last report reached NATS longer ago than this is offline.
    pub stale_after: Duration,
    /// `lastSeenAt` alone is written at most this often per device.
    pub last_seen_every: Duration,
}

impl Default for DeviceStatusConfig {
    fn default() -> Self {
        Self {
            stale_after: Staleness::DEFAULT_AFTER,
            last_seen_every: Duration::from_secs(15 * 60),
        }
    }
}

/// The status a Device should have. Pure. `previous` provides the transition times.
pub fn device_status(
    device: &Device,
    report: Option<&DeviceReport>,
    previous: Option<&DeviceStatus>,
    now: DateTime<Utc>,
    staleness: Staleness,
) -> DeviceStatus {
    let before = previous.map(|p| p.conditions.as_slice()).unwrap_or_default();
    let cond = |type_: &str, status: &str, reason: &str, message: String| -> Condition {
        carry_condition(before, type_, status, reason, &message, None, now)
    };
    let fresh = report.filter(|r| !staleness.is_stale(r.received_at, now));
    let online = match (report, fresh) {
        (None, _) => cond(
            ONLINE,
            "False",
            REASON_NEVER_REPORTED,
            "no report has reached NATS".into(),
        ),
        (Some(_), None) => cond(
            ONLINE,
            "False",
            REASON_SILENT,
            format!(
                "no report has reached NATS for more than {}s (the server's clock)",
                staleness.window().as_secs()
            ),
        ),
        (Some(_), Some(_)) => cond(ONLINE, "True", REASON_REPORTING, "reporting".into()),
    };
    let runtime = match fresh.map(|r| &r.about.runtime) {
        None => cond(
            RUNTIME_READY,
            "Unknown",
            REASON_RUNTIME_UNKNOWN,
            "the device is not reporting".into(),
        ),
        Some(rt) => {
            let message = rt.message.as_deref().map(bounded);
            match rt.state {
                RuntimeState::Available => cond(RUNTIME_READY, "True", REASON_RUNTIME_ANSWERS, "podman answers".into()),
                RuntimeState::Unavailable => cond(
                    RUNTIME_READY,
                    "False",
                    REASON_RUNTIME_UNAVAILABLE,
                    message.unwrap_or_else(|| "podman does not answer".into()),
                ),
                RuntimeState::Starting => cond(
                    RUNTIME_READY,
                    "False",
                    REASON_RUNTIME_STARTING,
                    message.unwrap_or_else(|| "waiting for podman".into()),
                ),
                RuntimeState::Unknown => cond(
                    RUNTIME_READY,
                    "Unknown",
                    REASON_RUNTIME_UNKNOWN,
                    "the agent does not report its runtime".into(),
                ),
            }
        }
    };
    let revoked = match device.revoked_at() {
        Some(at) => cond(REVOKED, "True", REASON_REVOKED, format!("identity revoked at {at}")),
        None => cond(REVOKED, "False", REASON_NOT_REVOKED, "identity not revoked".into()),
    };
    DeviceStatus {
        conditions: vec![online, runtime, revoked],
        last_seen_at: report.map(|r| seconds(r.received_at)),
        agent_version: report.map(|r| r.about.agent_version.clone()).filter(|v| !v.is_empty()),
        inventory: report
            .and_then(|r| r.about.inventory.as_ref())
            .map(|i| DeviceInventory {
                arch: i.arch.clone(),
                os: i.os.clone(),
                kernel: i.kernel.clone(),
                hostname: i.hostname.clone(),
                cpu_cores: i.cpu_cores,
                memory_mib: i.memory_bytes >> 20,
                disk_total_mib: i.disk_total_bytes >> 20,
            }),
        deployments: report.map(|r| {
            let mut counts = PhaseCounts {
                total: r.deployments.len() as u32,
                ..Default::default()
            };
            for p in r.deployments.values() {
                match p.phase {
                    Phase::Running => counts.running += 1,
                    Phase::Failed => counts.failed += 1,
                    Phase::Pending => counts.pending += 1,
                    Phase::Unknown => {}
                }
            }
            counts
        }),
    }
}

/// What a device says goes into etcd and into every reader's cache of Devices:
/// each string is cut to a size a person reads.
fn bounded(s: &str) -> String {
    const MAX: usize = 256;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Kubernetes times have second precision.
fn seconds(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
}

/// Why a write is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Nothing a person would see changed, and `lastSeenAt` is recent enough.
    No,
    /// Something a person would see changed.
    Change,
    /// Only `lastSeenAt`, and it is older than `last_seen_every`.
    Refresh,
}

/// Pure: whether `next` must be written over `current`.
pub fn due(current: Option<&DeviceStatus>, next: &DeviceStatus, last_seen_every: Duration) -> Due {
    let Some(current) = current else { return Due::Change };
    let same_but_seen = DeviceStatus {
        last_seen_at: current.last_seen_at,
        ..next.clone()
    };
    if same_but_seen != *current {
        return Due::Change;
    }
    match (current.last_seen_at, next.last_seen_at) {
        (Some(was), Some(now)) if (now - was).to_std().is_ok_and(|d| d >= last_seen_every) => Due::Refresh,
        _ => Due::No,
    }
}

/// Paces `lastSeenAt` refreshes: about `devices / last_seen_every` per second, so
/// that a whole fleet is refreshed once per period, spread out.
#[derive(Debug)]
struct RefreshBudget {
    tokens: f64,
}

impl RefreshBudget {
    fn top_up(&mut self, devices: usize, every: Duration, elapsed: Duration) {
        let rate = devices as f64 / every.as_secs_f64().max(1.0);
        // At most about a second's worth of burst; the fraction a tick leaves over
        // is kept, or 11.1 refreshes a second would become 11 and the fleet's last
        // hundred devices would never be refreshed.
        self.tokens = (self.tokens + rate * elapsed.as_secs_f64()).min(rate + 1.0);
    }

    fn take(&mut self) -> bool {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

const CONCURRENT_WRITES: usize = 8;
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const TICK: Duration = Duration::from_secs(1);

/// Writes Device statuses forever. Start it once the device index has caught up
/// (before, every device would look offline).
pub async fn run_device_status(
    client: kube::Client,
    devices: Store<Device>,
    index: Arc<DeviceIndex>,
    config: DeviceStatusConfig,
    metrics: Arc<OperatorMetrics>,
) {
    if devices.wait_until_ready().await.is_err() {
        tracing::error!("the Device reflector ended before it was ready");
        return;
    }
    let staleness = Staleness::after(config.stale_after);
    // What this process last wrote, by object uid (the reflector lags our writes).
    let mut written: HashMap<String, DeviceStatus> = HashMap::new();
    let mut budget = RefreshBudget { tokens: 0.0 };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Utc::now();
        let objects = devices.state();
        budget.top_up(objects.len(), config.last_seen_every, TICK);
        let mut changes = Vec::new();
        let mut refreshes = Vec::new();
        {
            let reports = index.reports();
            for obj in &objects {
                let (Some(uid), Some(name)) = (obj.metadata.uid.clone(), obj.metadata.name.clone()) else {
                    continue;
                };
                let report = harmony_reconciler_contracts::Id::new(name.as_str())
                    .ok()
                    .and_then(|id| reports.get(&id));
                let current = written.get(&uid).cloned().or_else(|| obj.status.clone());
                let next = device_status(obj, report, current.as_ref(), now, staleness);
                match due(current.as_ref(), &next, config.last_seen_every) {
                    Due::No => {}
                    Due::Change => changes.push((name, uid, next)),
                    Due::Refresh => refreshes.push((name, uid, next)),
                }
            }
        }
        let live: std::collections::HashSet<&str> = objects.iter().filter_map(|o| o.metadata.uid.as_deref()).collect();
        written.retain(|uid, _| live.contains(uid.as_str()));
        // Real changes first, all of them; refreshes as the budget allows, the
        // longest unrefreshed first, so no device waits for ever.
        refreshes.sort_by_key(|(_, uid, _)| written.get(uid).and_then(|w| w.last_seen_at));
        refreshes.retain(|_| budget.take());
        let api: Api<Device> = Api::all(client.clone());
        let mut queue = changes
            .into_iter()
            .map(|w| ("change", w))
            .chain(refreshes.into_iter().map(|w| ("refresh", w)));
        let mut in_flight = FuturesUnordered::new();
        loop {
            while in_flight.len() < CONCURRENT_WRITES {
                let Some((kind, (name, uid, status))) = queue.next() else {
                    break;
                };
                let api = api.clone();
                in_flight.push(async move {
                    let result = write(&api, &name, &status).await;
                    (kind, name, uid, status, result)
                });
            }
            let Some((kind, name, uid, status, result)) = in_flight.next().await else {
                break;
            };
            let label = match &result {
                Ok(()) => {
                    written.insert(uid, status);
                    "ok"
                }
                Err(e) => {
                    tracing::warn!(device = %name, error = %e, "Device status write failed; retried next pass");
                    "error"
                }
            };
            metrics.device_status_write(kind, label);
        }
    }
}

async fn write(api: &Api<Device>, name: &str, status: &DeviceStatus) -> Result<(), String> {
    let patch = serde_json::json!({
        "apiVersion": "iot.nationtech.io/v1alpha1",
        "kind": "Device",
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match tokio::time::timeout(WRITE_TIMEOUT, api.patch_status(name, &params, &Patch::Apply(&patch))).await {
        Err(_) => Err(format!("no answer within {WRITE_TIMEOUT:?}")),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

/// Devices that report but have no Device object: listed, never created on their
/// own say-so.
pub fn unregistered<'a>(
    reports: impl IntoIterator<Item = &'a harmony_reconciler_contracts::Id>,
    devices: &Store<Device>,
) -> Vec<harmony_reconciler_contracts::Id> {
    reports
        .into_iter()
        .filter(|id| {
            devices
                .get(&kube::runtime::reflector::ObjectRef::new(id.as_str()))
                .is_none()
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refresh_budget_keeps_fractions_so_a_whole_fleet_is_refreshed_each_period() {
        let mut budget = RefreshBudget { tokens: 0.0 };
        let every = Duration::from_secs(900);
        let mut refreshed = 0;
        for _ in 0..900 {
            budget.top_up(10_000, every, TICK);
            while budget.take() {
                refreshed += 1;
            }
        }
        // 10,000 devices in 900 one-second ticks: all of them, less at most one.
        assert!(refreshed >= 9_999, "{refreshed}");
        assert!(refreshed <= 10_001, "{refreshed}");
    }
}
