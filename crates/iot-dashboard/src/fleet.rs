//! The dashboard's live copy of the fleet, fed by watches and never by polling:
//! - Deployments and their `.status` through a kube-rs reflector;
//! - device reports through ONE watch of the `agent-status` bucket (one ordered
//!   consumer, whatever the fleet size), stamped with the server's time.
//!
//! Every change bumps a counter that open pages follow over SSE. Staleness moves
//! with the clock and not with data, so a ticker bumps it too when a device crosses
//! the staleness threshold.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use chrono::Utc;
use futures::StreamExt;
use harmony_reconciler_contracts::{AgentStatus, Id, parse_agent_status_key};
use iot_api::Deployment;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use crate::view::{DeviceRecord, DeviceState, Snapshot};

pub struct Fleet {
    devices: RwLock<HashMap<Id, DeviceRecord>>,
    deployments: Store<Deployment>,
    changes: watch::Sender<u64>,
    devices_caught_up: watch::Sender<bool>,
    deployments_ready: Arc<std::sync::atomic::AtomicBool>,
    pub stale_after: chrono::Duration,
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
            deployments_ready,
            deployments,
            changes: watch::channel(0).0,
            devices_caught_up: watch::channel(false).0,
            stale_after: chrono::Duration::from_std(stale_after).unwrap_or(chrono::Duration::seconds(30)),
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
            stale_after: self.stale_after,
        };
        f(&snap)
    }

    /// Records one entry of the agent-status bucket. Unparseable reports are kept
    /// out (and logged): one bad device must not blank the page.
    pub fn record(&self, key: &str, value: Option<&[u8]>, received_at: chrono::DateTime<Utc>) {
        let Ok(id) = parse_agent_status_key(key) else { return };
        let mut devices = self.devices.write().unwrap_or_else(PoisonError::into_inner);
        match value.map(serde_json::from_slice::<AgentStatus>) {
            None => {
                devices.remove(&id);
            }
            Some(Ok(status)) => {
                devices.insert(id, DeviceRecord { status, received_at });
            }
            Some(Err(e)) => {
                tracing::warn!(device = %id, error = %e, "unreadable device report; keeping the last good one")
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

/// Follows the whole agent-status bucket with one watch, forever.
pub async fn follow_devices(fleet: Arc<Fleet>, store: kv::Store) {
    loop {
        if store.status().await.is_ok_and(|s| s.values() == 0) {
            fleet.devices_caught_up.send_replace(true);
        }
        match store.watch_with_history(">").await {
            Ok(mut watch) => {
                while let Some(entry) = watch.next().await {
                    match entry {
                        Ok(e) => {
                            let value = matches!(e.operation, Operation::Put).then_some(e.value.as_ref());
                            fleet.record(&e.key, value, e.created);
                            if e.delta == 0 {
                                fleet.devices_caught_up.send_replace(true);
                            }
                            fleet.bump();
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "agent-status watch error; restarting it");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch agent-status; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
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
