//! The dashboard's live copy of the fleet, fed by watches and never by polling:
//! - Deployments and their `.status` through a kube-rs reflector;
//! - Device objects (labels, `spec.paused`, revocation) through another, which
//!   the dashboard can do without (see [`devices_reflector`]);
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
use iot_api::{Deployment, Device};
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
    registry: Store<Device>,
    registry_state: RwLock<Registry>,
    started: std::time::Instant,
    changes: watch::Sender<u64>,
    devices_caught_up: watch::Sender<bool>,
    deployments_ready: Arc<std::sync::atomic::AtomicBool>,
    pub staleness: Staleness,
}

/// Whether the dashboard knows the Device objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registry {
    /// No full list yet.
    Loading,
    /// The reflector holds every Device.
    Known,
    /// The Devices cannot be read, and why (forbidden, no CRD, ...). Pages show
    /// no labels and call nobody unregistered; the watch keeps trying.
    Unavailable(String),
}

/// Readiness waits at most this long for the first list of Devices: they add
/// marks to the pages, and the dashboard is useful without them.
const REGISTRY_GRACE: Duration = Duration::from_secs(10);

impl Fleet {
    /// Call inside the runtime: it watches for the reflector's first full list.
    pub fn new(deployments: Store<Deployment>, registry: Store<Device>, stale_after: Duration) -> Arc<Self> {
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
            registry,
            registry_state: RwLock::new(Registry::Loading),
            started: std::time::Instant::now(),
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

    /// Ready with the device reports and the Deployments. The Devices are waited
    /// for only until their first list succeeds or fails, or [`REGISTRY_GRACE`]
    /// has passed: a dashboard that may not read them still shows the fleet.
    pub fn is_ready(&self) -> bool {
        *self.devices_caught_up.borrow()
            && self.deployments_ready.load(std::sync::atomic::Ordering::Acquire)
            && (self.registry_state() != Registry::Loading || self.started.elapsed() >= REGISTRY_GRACE)
    }

    pub fn registry_state(&self) -> Registry {
        self.registry_state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Moves to `next`; returns the state it left.
    fn set_registry(&self, next: Registry) -> Registry {
        let mut state = self.registry_state.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *state, next)
    }

    /// Runs `f` on one consistent snapshot, taken now.
    pub fn with_snapshot<R>(&self, f: impl FnOnce(&Snapshot<'_>) -> R) -> R {
        let devices = self.devices.read().unwrap_or_else(PoisonError::into_inner);
        let mut deployments = self.deployments.state();
        deployments.sort_by_key(|d| (d.metadata.namespace.clone(), d.metadata.name.clone()));
        let registry: Option<HashMap<String, Arc<Device>>> = (self.registry_state() == Registry::Known).then(|| {
            self.registry
                .state()
                .into_iter()
                .filter_map(|d| Some((d.metadata.name.clone()?, d)))
                .collect()
        });
        let snap = Snapshot {
            devices: &devices,
            deployments: &deployments,
            registry: registry.as_ref(),
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

    /// Online and not, of the devices that reported (every second: no registry).
    fn state_counts(&self) -> (usize, usize) {
        let devices = self.devices.read().unwrap_or_else(PoisonError::into_inner);
        let snap = Snapshot {
            devices: &devices,
            deployments: &[],
            registry: None,
            now: Utc::now(),
            staleness: self.staleness,
        };
        devices.keys().fold((0, 0), |(on, st), id| match snap.device_state(id) {
            DeviceState::Online => (on + 1, st),
            _ => (on, st + 1),
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

/// The Devices reflector: its store, and the future that keeps it fed.
///
/// The dashboard reads Devices with its own Kubernetes identity, which may lack
/// `list`/`watch` on this cluster-scoped resource (a namespaced viewer), and an
/// older install may not have the CRD. Neither stops it: Devices only add labels
/// and marks, while the live view comes from NATS. So the first failed list makes
/// the registry [`Registry::Unavailable`] (logged once, not at every retry), pages
/// show no labels and mark nobody unregistered (unknown is not empty), and
/// readiness stops waiting for it. The watch keeps retrying with its backoff (at
/// most every 30 s, one cheap refused request), so a role granted or a CRD
/// installed later is picked up without a restart, and logged. A 403 or 404 after
/// a good list makes it unavailable again: the store would only hold what was.
pub fn devices_reflector(
    client: kube::Client,
) -> (
    Store<Device>,
    impl FnOnce(Arc<Fleet>) -> futures::future::BoxFuture<'static, ()>,
) {
    let (reader, writer) = reflector::store();
    let run = move |fleet: Arc<Fleet>| -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async move {
            let api: Api<Device> = Api::all(client);
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .reflect(writer);
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::InitDone) => {
                        if let Registry::Unavailable(_) = fleet.set_registry(Registry::Known) {
                            tracing::info!("Device objects can be read now: labels and registry marks are shown");
                        }
                        fleet.bump();
                    }
                    // Listed objects reach the store at InitDone, all at once.
                    Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                    Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => fleet.bump(),
                    Err(e) => registry_error(&fleet, &e),
                }
            }
        })
    };
    (reader, run)
}

/// Why the Devices cannot be read, when that is how things are rather than a
/// passing fault: the identity may not list them (403) or there is no such
/// resource (404, no CRD).
fn registry_refusal(e: &watcher::Error) -> Option<String> {
    let (watcher::Error::InitialListFailed(kube::Error::Api(s))
    | watcher::Error::WatchStartFailed(kube::Error::Api(s))
    | watcher::Error::WatchFailed(kube::Error::Api(s))) = e
    else {
        return match e {
            watcher::Error::WatchError(s) if matches!(s.code, 403 | 404) => Some(refusal_text(s)),
            _ => None,
        };
    };
    matches!(s.code, 403 | 404).then(|| refusal_text(s))
}

fn refusal_text(s: &kube::core::Status) -> String {
    match s.code {
        403 => format!(
            "this dashboard's Kubernetes identity may not list Devices (403: {})",
            s.message
        ),
        _ => format!("the Device resource is not installed (404: {})", s.message),
    }
}

/// One error of the Device watch: see [`devices_reflector`] for what it changes.
fn registry_error(fleet: &Fleet, e: &watcher::Error) {
    let state = fleet.registry_state();
    let reason = match (registry_refusal(e), &state) {
        (Some(why), _) => why,
        // A passing fault after a good list: the store keeps it, the watch relists.
        (None, Registry::Known) => {
            tracing::warn!(error = %e, "Device watch error; retrying");
            return;
        }
        (None, _) => format!("the Devices cannot be listed: {e}"),
    };
    if matches!(state, Registry::Unavailable(_)) {
        tracing::debug!(error = %e, "Device objects still unavailable");
        return;
    }
    tracing::warn!(
        reason = %reason,
        "Device objects unavailable: pages show no labels and no revoked or unregistered marks; retrying quietly"
    );
    fleet.set_registry(Registry::Unavailable(reason));
    fleet.bump();
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
        let (registry, _registry_writer) = reflector::store::<Device>();
        let fleet = Fleet::new(store, registry, Duration::from_secs(30));
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

    /// A stand-in API server: answers each request with what `answer` says for
    /// (its path and query, how many came before); `None` holds the connection
    /// open without an answer (a watch with nothing to say).
    async fn fake_api_server(
        answer: impl Fn(&str, usize) -> Option<(u16, String)> + Send + Sync + 'static,
    ) -> anyhow::Result<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let answer = Arc::new(answer);
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (answer, seen) = (answer.clone(), seen.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head);
                    let target = head.split_whitespace().nth(1).unwrap_or_default().to_owned();
                    let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some((code, body)) = answer(&target, n) else {
                        tokio::time::sleep(Duration::from_secs(600)).await;
                        return;
                    };
                    let reply = format!(
                        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(reply.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Ok(port)
    }

    fn refusal(code: u16, reason: &str) -> String {
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("devices.iot.nationtech.io is {reason}"), "reason": reason, "code": code})
        .to_string()
    }

    /// A fleet whose reports and Deployments are in, with the Device reflector
    /// running against the API server on `port`.
    async fn fleet_against(
        port: u16,
    ) -> anyhow::Result<(
        Arc<Fleet>,
        reflector::store::Writer<Deployment>,
        tokio::task::JoinHandle<()>,
    )> {
        let client = kube::Client::try_from(kube::Config::new(format!("http://127.0.0.1:{port}").parse()?))?;
        let (deployments, mut writer) = reflector::store::<Deployment>();
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let (registry, run) = devices_reflector(client);
        let fleet = Fleet::new(deployments, registry, Duration::from_secs(30));
        fleet.devices_caught_up.send_replace(true);
        let bytes = |s: &AgentStatus| serde_json::to_vec(s).unwrap_or_default();
        for d in ["lab-1", "stray-1"] {
            fleet.record(
                &format!("status.{d}"),
                Some(&bytes(&status(d, "1", "2026-12-01T00:00:00Z"))),
                Utc::now(),
            );
        }
        let task = tokio::spawn(run(fleet.clone()));
        Ok((fleet, writer, task))
    }

    async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !ok() {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn marks(fleet: &Fleet) -> Vec<(String, Vec<String>, bool)> {
        fleet.with_snapshot(|s| {
            crate::view::device_rows(s, None, None, "")
                .into_iter()
                .map(|r| {
                    let labels = r.registration.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    (r.id.to_string(), labels, r.registration.unregistered)
                })
                .collect()
        })
    }

    #[tokio::test]
    async fn a_dashboard_that_may_not_read_devices_is_ready_and_marks_nobody() -> anyhow::Result<()> {
        for (code, reason, why) in [
            (403, "Forbidden", "may not list Devices"),
            (404, "NotFound", "not installed"),
        ] {
            let port = fake_api_server(move |_, _| Some((code, refusal(code, reason)))).await?;
            let (fleet, _writer, task) = fleet_against(port).await?;
            wait_for("the registry given up", || {
                matches!(fleet.registry_state(), Registry::Unavailable(_))
            })
            .await?;
            let Registry::Unavailable(text) = fleet.registry_state() else {
                unreachable!()
            };
            assert!(text.contains(why), "{code}: {text}");
            // Ready at once, not after the grace period: the list failed.
            wait_for("ready", || fleet.is_ready()).await?;
            assert!(fleet.started.elapsed() < REGISTRY_GRACE);
            assert!(fleet.with_snapshot(|s| s.registry.is_none()));
            assert_eq!(
                marks(&fleet),
                vec![("lab-1".into(), vec![], false), ("stray-1".into(), vec![], false)],
                "{code}: no labels, nobody unregistered"
            );
            task.abort();
        }
        Ok(())
    }

    #[tokio::test]
    async fn devices_readable_later_are_picked_up_without_a_restart() -> anyhow::Result<()> {
        let list = serde_json::json!({
            "apiVersion": "iot.nationtech.io/v1alpha1", "kind": "DeviceList",
            "metadata": {"resourceVersion": "7"},
            "items": [{"apiVersion": "iot.nationtech.io/v1alpha1", "kind": "Device",
                "metadata": {"name": "lab-1", "resourceVersion": "7", "labels": {"site": "lab"}},
                "spec": {}}]
        })
        .to_string();
        // Forbidden at first (the role is granted a moment later), then a list;
        // the watch after it has nothing to say.
        let port = fake_api_server(move |target, n| match (n, target.contains("watch=")) {
            (0, _) => Some((403, refusal(403, "Forbidden"))),
            (_, false) => Some((200, list.clone())),
            (_, true) => None,
        })
        .await?;
        let (fleet, _writer, task) = fleet_against(port).await?;
        wait_for("the registry known", || fleet.registry_state() == Registry::Known).await?;
        assert!(fleet.is_ready());
        assert_eq!(
            marks(&fleet),
            vec![
                ("lab-1".into(), vec!["site=lab".into()], false),
                ("stray-1".into(), vec![], true),
            ]
        );
        task.abort();
        Ok(())
    }
}
