//! Aggregator at scale: synthetic devices publish real `AgentStatus` values to the
//! real nats-server, spread over 20 Deployments on the real API server, with the
//! release operator binary aggregating them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use harmony_reconciler_contracts::*;
use iot_api::Deployment;
use iot_nats::{KvOp, write_batch};
use iot_operator::device_index::DeviceIndex;
use kube::Api;
use kube::api::ListParams;
use kube::runtime::{WatchStreamExt, watcher};

use crate::util::{consumer_count, control_plane, rss_kib, spread_deployments};

const DEPLOYMENTS: usize = 20;
const REASONS: [&str; 3] = [
    "image localhost/app:v9 is not present on the device and pulling it failed",
    "service web: created but failed to start: address already in use",
    "invalid score: services[0].image: must not be empty",
];

#[derive(Clone, Copy, PartialEq)]
enum State {
    Running,
    Failed,
}

/// `since`: when the device entered `state`; event and phase times stay fixed at it,
/// as a real agent's do, while `heartbeat_at` moves on every report.
fn encode(device: &Id, dep: &DeploymentRef, hash: &SpecHash, state: State, since: chrono::DateTime<Utc>) -> Bytes {
    let i: usize = device.as_str().trim_start_matches("dev").parse().unwrap_or(0);
    let (phase, last_error) = match state {
        State::Running => (Phase::Running, None),
        State::Failed => (Phase::Failed, Some(REASONS[i % REASONS.len()].to_owned())),
    };
    let now = Utc::now();
    let status = AgentStatus {
        format: 1,
        device_id: device.clone(),
        agent_version: "bench".into(),
        heartbeat_at: now,
        deployments: BTreeMap::from([(
            dep.clone(),
            DeploymentPhase::new(phase, Some(hash.clone()), last_error.clone(), since),
        )]),
        recent_events: vec![EventEntry {
            at: since,
            severity: if state == State::Failed {
                Severity::Error
            } else {
                Severity::Info
            },
            deployment: Some(dep.clone()),
            message: last_error.unwrap_or_else(|| format!("running spec {hash}")),
        }],
        last_reconcile_at: Some(now),
        runtime: RuntimeStatus {
            state: RuntimeState::Available,
            message: None,
        },
        inventory: Some(InventorySnapshot {
            cpu_cores: 4,
            arch: "aarch64".into(),
            ..Default::default()
        }),
    };
    Bytes::from(serde_json::to_vec(&status).unwrap_or_default())
}

struct Fleet {
    devices: Vec<(Id, DeploymentRef, SpecHash)>,
    state: RwLock<(State, chrono::DateTime<Utc>)>,
}

impl Fleet {
    fn ops(&self, range: std::ops::Range<usize>) -> Vec<KvOp> {
        let (state, since) = *self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.devices[range]
            .iter()
            .map(|(d, dep, h)| KvOp::Put {
                key: agent_status_key(d),
                value: encode(d, dep, h, state, since),
            })
            .collect()
    }
}

/// Lists the deployments and checks every one against `pred`.
async fn all_match(api: &Api<Deployment>, per_dep: u32, pred: impl Fn(&iot_api::AggregateStatus, u32) -> bool) -> bool {
    match api.list(&ListParams::default()).await {
        Ok(list) => {
            list.items.len() == DEPLOYMENTS
                && list.items.iter().all(|d| {
                    d.status
                        .as_ref()
                        .and_then(|s| s.aggregate.as_ref())
                        .is_some_and(|a| pred(a, per_dep))
                })
        }
        Err(_) => false,
    }
}

async fn wait_all(
    api: &Api<Deployment>,
    per_dep: u32,
    what: &str,
    pred: impl Fn(&iot_api::AggregateStatus, u32) -> bool,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    while !all_match(api, per_dep, &pred).await {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(300), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(t.elapsed())
}

pub async fn run(devices: usize, steady_secs: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        devices.is_multiple_of(DEPLOYMENTS),
        "--devices must be a multiple of {DEPLOYMENTS}"
    );
    let per_dep = (devices / DEPLOYMENTS) as u32;
    let cp = control_plane().await?;
    let (js, operator_pid) = (cp.js.clone(), cp.operator_pid);
    let api: Api<Deployment> = Api::namespaced(cp.kube.clone(), "default");
    let mut fleet = spread_deployments(&api, devices, DEPLOYMENTS).await?;
    fleet.sort_by_key(|(d, _, _)| d.as_str().trim_start_matches("dev").parse::<usize>().unwrap_or(0));
    let fleet = Arc::new(Fleet {
        devices: fleet,
        state: RwLock::new((State::Running, Utc::now())),
    });

    // Everyone reports Running.
    let t = Instant::now();
    let (n, err) = write_batch(&js, AGENT_STATUS_BUCKET, &fleet.ops(0..devices), 512).await;
    anyhow::ensure!(err.is_none() && n == devices, "publish failed: {err:?}");
    wait_all(&api, per_dep, "all succeeded", |a, n| a.succeeded == n).await?;
    let initial_total = t.elapsed();

    // Steady state: every device heartbeats every 10 s (1/100 of the fleet per 100 ms).
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let heartbeats = {
        let (js, fleet, stop, published) = (js.clone(), fleet.clone(), stop.clone(), published.clone());
        tokio::spawn(async move {
            let slice = devices.div_ceil(100);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let start = (k * slice) % devices;
                let ops = fleet.ops(start..(start + slice).min(devices));
                let (n, _) = write_batch(&js, AGENT_STATUS_BUCKET, &ops, 512).await;
                published.fetch_add(n as u64, Ordering::Relaxed);
                k += 1;
            }
        })
    };
    let writes = Arc::new(AtomicU64::new(0));
    let watch_task = {
        let (api, writes) = (api.clone(), writes.clone());
        tokio::spawn(async move {
            let mut events = watcher(api, watcher::Config::default()).applied_objects().boxed();
            while let Some(e) = events.next().await {
                if e.is_ok() {
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (w0, p0, t0) = (
        writes.load(Ordering::Relaxed),
        published.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(steady_secs)).await;
    let span = t0.elapsed().as_secs_f64();
    let steady_writes = (writes.load(Ordering::Relaxed) - w0) as f64 / span;
    let steady_reports = (published.load(Ordering::Relaxed) - p0) as f64 / span;
    let rss_steady = rss_kib(operator_pid)?;

    // Consumers the operator holds (counted before this process adds its own probe).
    let consumers_status = consumer_count(&js, AGENT_STATUS_BUCKET).await?;
    let consumers_desired = consumer_count(&js, DESIRED_STATE_BUCKET).await?;

    // A second aggregator index in this process, on its own watch, to time ingestion
    // through the real watch without the status writer's 1 s coalescing.
    let probe = Arc::new(DeviceIndex::default());
    let probe_task = {
        let (probe, store) = (probe.clone(), js.get_key_value(AGENT_STATUS_BUCKET).await?);
        tokio::spawn(async move { probe.follow(store, None).await })
    };
    while probe.len() < devices {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Burst: every device changes phase at once.
    let probe_before = probe.reports_processed();
    *fleet.state.write().unwrap_or_else(std::sync::PoisonError::into_inner) = (State::Failed, Utc::now());
    let (w1, t1) = (writes.load(Ordering::Relaxed), Instant::now());
    let (n, err) = write_batch(&js, AGENT_STATUS_BUCKET, &fleet.ops(0..devices), 512).await;
    anyhow::ensure!(err.is_none() && n == devices, "burst publish failed: {err:?}");
    let burst_publish = t1.elapsed();
    // Heartbeats keep flowing, so count until at least one report per device arrived.
    while probe.reports_processed() - probe_before < devices as u64 {
        anyhow::ensure!(
            t1.elapsed() < Duration::from_secs(120),
            "probe index did not ingest the burst"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ingest = t1.elapsed();
    probe_task.abort();
    let burst = wait_all(&api, per_dep, "all failed with 3 grouped errors", |a, n| {
        a.failed == n && a.top_errors.len() == REASONS.len().min(n as usize)
    })
    .await?;
    let burst_total = t1.elapsed();
    let burst_writes = writes.load(Ordering::Relaxed) - w1;
    let rss_burst = rss_kib(operator_pid)?;
    stop.store(true, Ordering::Relaxed);
    heartbeats.await?;
    watch_task.abort();

    // Raw processing rate of the aggregator's decode+index step, in this process.
    let index = DeviceIndex::default();
    let samples: Vec<(String, Bytes)> = fleet
        .ops(0..devices)
        .into_iter()
        .map(|op| match op {
            KvOp::Put { key, value } => (key, value),
            KvOp::Purge { key } => (key, Bytes::new()),
        })
        .collect();
    let t = Instant::now();
    for (k, v) in &samples {
        index.record(k, Some(v), Utc::now());
    }
    let decode_rate = devices as f64 / t.elapsed().as_secs_f64();

    println!("| devices / deployments | {devices} / {DEPLOYMENTS} |");
    println!(
        "| initial: all Running published -> every resource correct | {:.2} s |",
        initial_total.as_secs_f64()
    );
    println!("| steady state: status reports published per second | {steady_reports:.0} /s |");
    println!("| steady state: status writes to the API server | {steady_writes:.2} /s ({DEPLOYMENTS} resources) |");
    println!(
        "| burst: {devices} phase changes published in | {:.2} s |",
        burst_publish.as_secs_f64()
    );
    println!(
        "| burst: first publish -> every resource's status correct | {:.2} s |",
        burst_total.as_secs_f64()
    );
    println!(
        "| burst: ingestion through the watch (publish + deliver + decode + index) | {:.2} s = {:.0} reports/s |",
        ingest.as_secs_f64(),
        devices as f64 / ingest.as_secs_f64()
    );
    println!(
        "| burst: end-to-end rate incl. 1 s status coalescing | {:.0} reports/s |",
        devices as f64 / burst_total.as_secs_f64()
    );
    println!(
        "| burst: status writes it caused | {burst_writes} (wait after publish {:.2} s) |",
        burst.as_secs_f64()
    );
    println!("| aggregator decode+index rate (in-process, one core) | {decode_rate:.0} reports/s |");
    println!(
        "| operator RSS steady / after burst | {:.1} MiB / {:.1} MiB |",
        rss_steady as f64 / 1024.0,
        rss_burst as f64 / 1024.0
    );
    println!("| JetStream consumers on agent-status / desired-state | {consumers_status} / {consumers_desired} |");
    drop(cp);
    Ok(())
}
