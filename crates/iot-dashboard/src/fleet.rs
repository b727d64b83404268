//! The dashboard's live copy of the fleet, fed by watches and never by polling:
//! - Deployments and their `.status` through a kube-rs reflector;
//! - device reports through a snapshot from the operator (`iot.status.read.<name>`,
//!   each report stamped with the time NATS stored it) plus a plain subscription
//!   to `$KV.agent-status.>` for every change after it. No JetStream API: the
//!   dashboard's identity reads, and can make the server write nothing.
//!
//! Every change bumps a counter that open pages follow over SSE. Staleness moves
//! with the clock and not with data, so a ticker bumps it too when a device crosses
//! the staleness threshold.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use harmony_reconciler_contracts::Id;
use harmony_reconciler_contracts::report::{self, Staleness};
use iot_api::Deployment;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use crate::view::{DeviceRecord, DeviceState, Snapshot};

pub struct Fleet {
    devices: RwLock<HashMap<Id, DeviceRecord>>,
    /// Devices whose report was deleted, and when (this clock): a snapshot asked
    /// for before must not bring them back.
    removed: std::sync::Mutex<HashMap<Id, chrono::DateTime<Utc>>>,
    deployments: Store<Deployment>,
    changes: watch::Sender<u64>,
    devices_caught_up: watch::Sender<bool>,
    deployments_ready: Arc<std::sync::atomic::AtomicBool>,
    pub staleness: Staleness,
}

impl Fleet {
    /// Call inside the runtime: it watches for the reflector's first full list.
    pub fn new(deployments: Store<Deployment>, stale_after: Duration) -> Arc<Self> {
        let deployments_ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (store, ready) = (deployments.clone(), deployments_ready.clone());
            tokio::spawn(async move {
                if store.wait_until_ready().await.is_ok() {
                    ready.store(true, std::sync::atomic::Ordering::Release);
                }
            });
        }
        Arc::new(Self {
            devices: RwLock::new(HashMap::new()),
            removed: std::sync::Mutex::new(HashMap::new()),
            deployments_ready,
            deployments,
            changes: watch::channel(0).0,
            devices_caught_up: watch::channel(false).0,
            staleness: Staleness::after(stale_after),
        })
    }

    /// Something changed: open pages refresh.
    pub fn bump(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn is_ready(&self) -> bool {
        *self.devices_caught_up.borrow() && self.deployments_ready.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Runs `f` on one consistent snapshot, taken now.
    pub fn with_snapshot<R>(&self, f: impl FnOnce(&Snapshot<'_>) -> R) -> R {
        let devices = self.devices.read().unwrap_or_else(PoisonError::into_inner);
        let mut deployments = self.deployments.state();
        deployments.sort_by_key(|d| (d.metadata.namespace.clone(), d.metadata.name.clone()));
        let snap = Snapshot {
            devices: &devices,
            deployments: &deployments,
            now: Utc::now(),
            staleness: self.staleness,
        };
        f(&snap)
    }

    /// Records one entry of the agent-status bucket. Unparseable reports are kept
    /// out (and logged): one bad device must not blank the page.
    pub fn record(&self, key: &str, value: Option<&[u8]>, received_at: chrono::DateTime<Utc>) {
        let Ok(id) = report::report_device(key) else { return };
        let mut devices = self.devices.write().unwrap_or_else(PoisonError::into_inner);
        match value.map(|bytes| report::decode_report(&id, bytes)) {
            None => {
                devices.remove(&id);
                self.removed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(id, received_at);
            }
            Some(Ok(status)) => {
                devices.insert(id, DeviceRecord { status, received_at });
            }
            // One writer per key, and one bad report must not blank a device: keep
            // the last good one.
            Some(Err(e)) => tracing::warn!(error = %e, "device report refused; keeping the last good one"),
        }
    }

    /// Takes a snapshot asked for at `asked_at`: each report replaces what is held
    /// unless a newer report of that device arrived meanwhile (by the device's own
    /// heartbeat time: one clock per device). Devices the snapshot does not list are
    /// gone, unless they reported since it was asked for.
    pub fn replace_from_snapshot(
        &self,
        records: Vec<harmony_reconciler_contracts::read::StatusRecord>,
        asked_at: chrono::DateTime<Utc>,
    ) {
        let mut devices = self.devices.write().unwrap_or_else(PoisonError::into_inner);
        let removed: HashMap<Id, chrono::DateTime<Utc>> = {
            let mut removed = self.removed.lock().unwrap_or_else(PoisonError::into_inner);
            removed.retain(|_, at| *at >= asked_at);
            removed.clone()
        };
        let records: Vec<_> = records
            .into_iter()
            .filter(|r| !removed.contains_key(&r.device))
            .collect();
        let listed: std::collections::HashSet<Id> = records.iter().map(|r| r.device.clone()).collect();
        devices.retain(|id, held| listed.contains(id) || held.received_at >= asked_at);
        for r in records {
            let newer_held = devices
                .get(&r.device)
                .is_some_and(|held| held.status.heartbeat_at > r.status.heartbeat_at);
            if !newer_held && report::check_report_owner(&r.device, &r.status).is_ok() {
                devices.insert(
                    r.device,
                    DeviceRecord {
                        status: r.status,
                        received_at: r.stored_at,
                    },
                );
            }
        }
    }

    fn state_counts(&self) -> (usize, usize) {
        self.with_snapshot(|s| {
            s.devices.keys().fold((0, 0), |(on, st), id| match s.device_state(id) {
                DeviceState::Online => (on + 1, st),
                _ => (on, st + 1),
            })
        })
    }
}

/// The Deployments reflector: its store, and the future that keeps it fed.
pub fn deployments_reflector(
    client: kube::Client,
) -> (
    Store<Deployment>,
    impl FnOnce(Arc<Fleet>) -> futures::future::BoxFuture<'static, ()>,
) {
    let (reader, writer) = reflector::store();
    let run = move |fleet: Arc<Fleet>| -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async move {
            let api: Api<Deployment> = Api::all(client);
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .reflect(writer)
                .touched_objects();
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(_) => fleet.bump(),
                    Err(e) => tracing::warn!(error = %e, "Deployment watch error; retrying"),
                }
            }
        })
    };
    (reader, run)
}

/// How often the snapshot is taken again although nothing was missed: core NATS
/// delivery is at-most-once, and a report lost to a slow-consumer cut would
/// otherwise show until the device's next one.
const RESNAPSHOT_EVERY: Duration = Duration::from_secs(300);

/// Follows every device's reports forever: subscribes to changes first, then takes
/// a snapshot (again after every reconnect and every [`RESNAPSHOT_EVERY`]).
pub async fn follow_devices(fleet: Arc<Fleet>, conn: iot_nats::NatsConnection, viewer: Id) {
    let iot_nats::NatsConnection { client, mut connects } = conn;
    let subject = format!("$KV.{}.>", harmony_reconciler_contracts::AGENT_STATUS_BUCKET);
    let subscribe = || async {
        loop {
            match client.subscribe(subject.clone()).await {
                Ok(sub) => break sub,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot subscribe to device reports; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    };
    let mut changes = subscribe().await;
    let mut failures = 0u32;
    let mut next_snapshot = tokio::time::Instant::now();
    loop {
        tokio::select! {
            msg = changes.next() => {
                let Some(msg) = msg else {
                    // Subscribe again, and take a snapshot for what passed meanwhile.
                    tracing::warn!("the device report subscription ended; subscribing again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    changes = subscribe().await;
                    next_snapshot = tokio::time::Instant::now();
                    continue;
                };
                let Some(key) = harmony_reconciler_contracts::keys::key_from_subject(
                    harmony_reconciler_contracts::AGENT_STATUS_BUCKET,
                    &msg.subject,
                ) else {
                    continue;
                };
                let op = msg.headers.as_ref().and_then(|h| h.get("KV-Operation")).map(|v| v.as_str().to_owned());
                let deleted = matches!(op.as_deref(), Some("DEL") | Some("PURGE"));
                // Stamped on arrival: it reached NATS an instant ago.
                fleet.record(key, (!deleted).then_some(msg.payload.as_ref()), Utc::now());
                fleet.bump();
            }
            changed = connects.changed() => {
                if changed.is_err() {
                    return;
                }
                // Reports sent while we were away were not delivered.
                next_snapshot = tokio::time::Instant::now();
            }
            _ = tokio::time::sleep_until(next_snapshot) => {
                let asked_at = Utc::now();
                match iot_nats::status_snapshot::read_status_snapshot(&client, &viewer, Duration::from_secs(10)).await {
                    Ok(records) => {
                        failures = 0;
                        fleet.replace_from_snapshot(records, asked_at);
                        fleet.devices_caught_up.send_replace(true);
                        fleet.bump();
                        next_snapshot = tokio::time::Instant::now() + iot_timing::jittered(RESNAPSHOT_EVERY);
                    }
                    Err(e) => {
                        failures += 1;
                        let delay = iot_timing::backoff(failures, Duration::from_secs(30));
                        tracing::warn!(error = %e, retry_in = ?delay, "cannot read the fleet's reports from the operator; retrying");
                        next_snapshot = tokio::time::Instant::now() + delay;
                    }
                }
            }
        }
    }
}

/// Devices fall silent without any event: re-check once a second and tell open
/// pages when one crosses the staleness threshold (either way).
pub async fn staleness_ticker(fleet: Arc<Fleet>) {
    let mut last = fleet.state_counts();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = fleet.state_counts();
        if now != last {
            last = now;
            fleet.bump();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use harmony_reconciler_contracts::AgentStatus;
    use harmony_reconciler_contracts::read::StatusRecord;

    use super::*;

    fn status(device: &str, version: &str, heartbeat: &str) -> AgentStatus {
        serde_json::from_value(serde_json::json!({
            "device_id": device, "agent_version": version, "heartbeat_at": heartbeat
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn id(s: &str) -> Id {
        Id::new(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn a_snapshot_never_undoes_what_arrived_live_after_it_was_asked_for() {
        let (store, _writer) = reflector::store::<Deployment>();
        let fleet = Fleet::new(store, Duration::from_secs(30));
        let bytes = |s: &AgentStatus| serde_json::to_vec(s).unwrap_or_default();
        let asked_at = Utc::now() - chrono::Duration::seconds(5);
        // Live, after the snapshot was asked for: a newer report of d1, a new
        // device d4, and d2's report deleted.
        fleet.record(
            "status.d1",
            Some(&bytes(&status("d1", "new", "2026-12-01T00:00:10Z"))),
            Utc::now(),
        );
        fleet.record(
            "status.d4",
            Some(&bytes(&status("d4", "1", "2026-12-01T00:00:10Z"))),
            Utc::now(),
        );
        fleet.record("status.d2", None, Utc::now());
        // A report under someone else's key is kept out, live as in a snapshot.
        fleet.record(
            "status.d9",
            Some(&bytes(&status("d1", "forged", "2026-12-01T00:00:11Z"))),
            Utc::now(),
        );
        let old = |d: &str| StatusRecord {
            device: id(d),
            stored_at: asked_at,
            status: status(d, "old", "2026-12-01T00:00:00Z"),
        };
        fleet.replace_from_snapshot(vec![old("d1"), old("d2"), old("d3")], asked_at);
        let versions: BTreeMap<String, String> = fleet.with_snapshot(|s| {
            s.devices
                .iter()
                .map(|(k, v)| (k.to_string(), v.status.agent_version.clone()))
                .collect()
        });
        let want: BTreeMap<String, String> = [("d1", "new"), ("d3", "old"), ("d4", "1")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(versions, want);
    }
}
