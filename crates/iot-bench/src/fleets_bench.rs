//! Fleets (issue 22) against the real API server, nats-server and release operator:
//!
//! - `device-status-writes`: N registered `Device`s whose synthetic agents heartbeat
//!   into `agent-status` (the same report every time, a new heartbeat time), and
//!   how many `Device.status` writes per second that costs: to fill every Device's
//!   first status, idle before any `lastSeenAt` is due, idle with the paced
//!   `lastSeenAt` refreshes, and with a share of the fleet flapping (silent past
//!   `IOT_STALE_AFTER`, back, again). Counted by the operator's
//!   `iot_operator_device_status_writes_total`, cross-checked with a watch of the
//!   Devices (MODIFIED events) and the API server's resourceVersion growth.
//! - `selector-targeting`: N labelled Devices and M selector Deployments; after
//!   every key is written, relabel one device, and move one Deployment's selector
//!   to another site: time until the keys are right, and the KV writes it took
//!   (`iot_operator_kv_writes_total` and a core subscription on the bucket),
//!   against raw pipelined writes of the same keys in the same run.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use harmony_reconciler_contracts::keys::{kv_stream_name, kv_subject};
use harmony_reconciler_contracts::*;
use iot_api::{Deployment, DeploymentSpec, Device, DeviceSelector, DeviceSpec};
use iot_nats::{KvOp, write_batch};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;

use crate::util::{Operator, Servers, TICKS_PER_SEC, cpu_ticks_of, median, metric_sum, ms, rss_kib};

/// Objects created at once while filling the API server.
const CREATE_CONCURRENCY: usize = 32;
/// Rings (a second label, unused by the selectors here).
const RINGS: usize = 4;

fn device_name(i: usize) -> String {
    format!("dev{i}")
}

fn device_id(i: usize) -> anyhow::Result<Id> {
    Ok(Id::new(device_name(i))?)
}

fn labels(site: usize, ring: usize) -> BTreeMap<String, String> {
    [
        ("site".to_owned(), format!("s{site}")),
        ("ring".to_owned(), format!("r{ring}")),
    ]
    .into()
}

/// Registers Devices `dev0..dev{n-1}` with `labels_of(i)`, `CREATE_CONCURRENCY` at a
/// time.
async fn create_devices(
    kube: &kube::Client,
    n: usize,
    labels_of: impl Fn(usize) -> BTreeMap<String, String>,
) -> anyhow::Result<Duration> {
    let api: Api<Device> = Api::all(kube.clone());
    let t = Instant::now();
    futures::stream::iter((0..n).map(|i| {
        let api = api.clone();
        let mut device = Device::new(&device_name(i), DeviceSpec::default());
        device.metadata.labels = Some(labels_of(i));
        async move { api.create(&PostParams::default(), &device).await.map(drop) }
    }))
    .buffer_unordered(CREATE_CONCURRENCY)
    .try_collect::<Vec<()>>()
    .await?;
    Ok(t.elapsed())
}

/// The API server's current resourceVersion (etcd's revision: it grows by one per write).
async fn resource_version(api: &Api<Device>) -> anyhow::Result<u64> {
    let list = api.list_metadata(&ListParams::default().limit(1)).await?;
    list.metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no resourceVersion on the list"))
}

/// Counts MODIFIED (and ADDED) events of Devices after the initial list.
fn count_device_events(kube: kube::Client) -> (Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let count = Arc::new(AtomicU64::new(0));
    let task = {
        let count = count.clone();
        tokio::spawn(async move {
            let api: Api<PartialObjectMeta<Device>> = Api::all(kube);
            let mut events = watcher(api, watcher::Config::default()).boxed();
            while let Some(e) = events.next().await {
                if let Ok(watcher::Event::Apply(_)) = e {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    (count, task)
}

// ---------------------------------------------------------------------------------
// device-status-writes

/// Which devices flap, and when they are silent.
struct Flap {
    /// Every `every`-th device flaps (0: none).
    every: usize,
    count: usize,
    silent_for: Duration,
    cycle: Duration,
    since: Mutex<Option<Instant>>,
}

impl Flap {
    /// Whether device `i` is silent now. Flapping devices are spread evenly over the
    /// cycle, so the fleet's flaps form a steady rate.
    fn silent(&self, i: usize, now: Instant) -> bool {
        if self.every == 0 || !i.is_multiple_of(self.every) {
            return false;
        }
        let Some(since) = *self.since.lock().unwrap_or_else(PoisonError::into_inner) else {
            return false;
        };
        let cycle = self.cycle.as_millis().max(1);
        let offset = cycle * (i / self.every) as u128 / self.count.max(1) as u128;
        (now.duration_since(since).as_millis() + offset) % cycle < self.silent_for.as_millis()
    }
}

/// A healthy device's report: the same every time but for the heartbeat.
fn report(i: usize) -> anyhow::Result<Bytes> {
    let now = Utc::now();
    let status = AgentStatus {
        format: harmony_reconciler_contracts::status::AGENT_STATUS_FORMAT,
        device_id: device_id(i)?,
        agent_version: "bench".into(),
        heartbeat_at: now,
        deployments: BTreeMap::new(),
        recent_events: Vec::new(),
        last_reconcile_at: Some(now),
        runtime: RuntimeStatus {
            state: RuntimeState::Available,
            message: None,
        },
        inventory: Some(InventorySnapshot {
            hostname: device_name(i),
            cpu_cores: 4,
            memory_bytes: 4 << 30,
            disk_total_bytes: 32 << 30,
            disk_free_bytes: 16 << 30,
            kernel: "6.1.0".into(),
            arch: "aarch64".into(),
            os: "Debian GNU/Linux 12".into(),
            agent_version: "bench".into(),
        }),
    };
    Ok(Bytes::from(serde_json::to_vec(&status)?))
}

/// Every device reports once per `heartbeat`, a slice of the fleet every 100 ms,
/// with pipelined raw KV puts; flapping devices skip their silent spells.
fn heartbeats(
    js: jetstream::Context,
    devices: usize,
    heartbeat: Duration,
    flap: Arc<Flap>,
    published: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        const TICK: Duration = Duration::from_millis(100);
        let slice = (devices as f64 * TICK.as_secs_f64() / heartbeat.as_secs_f64()).ceil() as usize;
        let mut tick = tokio::time::interval(TICK);
        let mut cursor = 0usize;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let now = Instant::now();
            let ops: Vec<KvOp> = (cursor..cursor + slice)
                .map(|k| k % devices)
                .filter(|i| !flap.silent(*i, now))
                .filter_map(|i| {
                    Some(KvOp::Put {
                        key: agent_status_key(&device_id(i).ok()?),
                        value: report(i).ok()?,
                    })
                })
                .collect();
            cursor = (cursor + slice) % devices;
            let (n, err) = write_batch(&js, AGENT_STATUS_BUCKET, &ops, 512).await;
            if let Some(e) = err {
                eprintln!("heartbeat publish failed: {e}");
            }
            published.fetch_add(n as u64, Ordering::Relaxed);
        }
    })
}

/// Counters at one instant.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    change: f64,
    refresh: f64,
    errors: f64,
    events: u64,
    rv: u64,
    operator_cpu: u64,
    api_cpu: u64,
    published: u64,
}

struct Probe<'a> {
    operator: &'a Operator,
    devices: Api<Device>,
    events: Arc<AtomicU64>,
    api_pids: Vec<u32>,
    published: Arc<AtomicU64>,
    /// lastSeenAt older than this is overdue.
    age_limit: Duration,
}

impl Probe<'_> {
    async fn sample(&self) -> anyhow::Result<Sample> {
        let text = self.operator.metrics().await?;
        let m = |kind: &str, result: &str| {
            metric_sum(
                &text,
                "iot_operator_device_status_writes_total",
                &[("kind", kind), ("result", result)],
            )
        };
        Ok(Sample {
            at: Instant::now(),
            change: m("change", "ok"),
            refresh: m("refresh", "ok"),
            errors: m("change", "error") + m("refresh", "error"),
            events: self.events.load(Ordering::Relaxed),
            rv: resource_version(&self.devices).await?,
            operator_cpu: cpu_ticks_of(&[self.operator.pid]),
            api_cpu: cpu_ticks_of(&self.api_pids),
            published: self.published.load(Ordering::Relaxed),
        })
    }

    /// How old every Device's `status.lastSeenAt` is now: median, maximum, and how
    /// many are older than `limit`.
    async fn ages(&self, limit: Duration) -> anyhow::Result<String> {
        let list = self.devices.list(&ListParams::default()).await?;
        let now = Utc::now();
        let mut ages: Vec<Duration> = list
            .items
            .iter()
            .map(|d| {
                d.status
                    .as_ref()
                    .and_then(|s| s.last_seen_at)
                    .and_then(|t| (now - t).to_std().ok())
                    .unwrap_or(Duration::MAX)
            })
            .collect();
        let older = ages.iter().filter(|a| **a > limit).count();
        let max = ages.iter().max().copied().unwrap_or_default();
        let fmt = |d: Duration| {
            if d == Duration::MAX {
                "none".to_owned()
            } else {
                format!("{:.0} s", d.as_secs_f64())
            }
        };
        Ok(format!("{} / {} / {older}", fmt(median(&mut ages)), fmt(max)))
    }

    /// One table row for the window from `a` to `b`.
    fn row(&self, what: &str, a: &Sample, b: &Sample, ages: &str) -> anyhow::Result<String> {
        let secs = b.at.duration_since(a.at).as_secs_f64();
        let per = |x: f64| x / secs;
        let change = per(b.change - a.change);
        let refresh = per(b.refresh - a.refresh);
        Ok(format!(
            "| {what} | {secs:.0} s | {:.0} /s | **{:.2} /s** ({change:.2} change + {refresh:.2} refresh) | {} | {:.2} /s | {:.2} /s | {:.1} % | {:.1} % | {:.1} MiB | {ages} |",
            per((b.published - a.published) as f64),
            change + refresh,
            (b.errors - a.errors).round() as u64,
            per((b.events - a.events) as f64),
            per((b.rv - a.rv) as f64),
            per((b.operator_cpu - a.operator_cpu) as f64) / TICKS_PER_SEC * 100.0,
            per((b.api_cpu - a.api_cpu) as f64) / TICKS_PER_SEC * 100.0,
            rss_kib(self.operator.pid)? as f64 / 1024.0,
        ))
    }

    async fn window(&self, what: &str, secs: Duration) -> anyhow::Result<String> {
        eprintln!("measuring: {what} for {secs:?}");
        let a = self.sample().await?;
        tokio::time::sleep(secs).await;
        let b = self.sample().await?;
        let ages = self.ages(self.age_limit).await?;
        self.row(what, &a, &b, &ages)
    }
}

pub struct StatusArgs {
    pub devices: usize,
    pub flap_percent: f64,
    pub secs: u64,
    pub last_seen_every_secs: u64,
    pub heartbeat_secs: u64,
    pub stale_after_secs: u64,
}

pub async fn device_status_writes(args: StatusArgs) -> anyhow::Result<()> {
    let StatusArgs {
        devices,
        flap_percent,
        secs,
        last_seen_every_secs,
        heartbeat_secs,
        stale_after_secs,
    } = args;
    anyhow::ensure!(
        devices > 0 && heartbeat_secs > 0,
        "--devices and --heartbeat-secs must be > 0"
    );
    let heartbeat = Duration::from_secs(heartbeat_secs);
    let stale_after = Duration::from_secs(stale_after_secs);
    let every = Duration::from_secs(last_seen_every_secs);
    let window = Duration::from_secs(secs);
    let servers = Servers::start().await?;
    let device_api: Api<Device> = Api::all(servers.kube.clone());
    let api_pids = servers.apiserver_pids();

    let create = create_devices(&servers.kube, devices, |i| labels(i % 40, (i / 40) % RINGS)).await?;
    eprintln!("{devices} Devices created in {:.1} s", create.as_secs_f64());

    // Flapping devices are silent a little longer than it takes to count as offline,
    // and then report as long again.
    let flap_every = if flap_percent > 0.0 {
        (100.0 / flap_percent).round().max(1.0) as usize
    } else {
        0
    };
    let spell = stale_after + heartbeat + Duration::from_secs(2);
    let flap = Arc::new(Flap {
        every: flap_every,
        count: if flap_every > 0 {
            devices.div_ceil(flap_every)
        } else {
            0
        },
        silent_for: spell,
        cycle: spell * 2,
        since: Mutex::new(None),
    });

    // Everyone has reported before the operator starts; then they heartbeat.
    let published = Arc::new(AtomicU64::new(0));
    let ops: Vec<KvOp> = (0..devices)
        .map(|i| {
            Ok(KvOp::Put {
                key: agent_status_key(&device_id(i)?),
                value: report(i)?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let (n, err) = write_batch(&servers.js, AGENT_STATUS_BUCKET, &ops, 512).await;
    anyhow::ensure!(err.is_none() && n == devices, "first reports: {err:?}");
    let stop = Arc::new(AtomicBool::new(false));
    let reporter = heartbeats(
        servers.js.clone(),
        devices,
        heartbeat,
        flap.clone(),
        published.clone(),
        stop.clone(),
    );
    let (events, watch_task) = count_device_events(servers.kube.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;

    let operator = servers.operator(&[
        ("IOT_STALE_AFTER", format!("{stale_after_secs}s")),
        ("IOT_DEVICE_LAST_SEEN_EVERY", format!("{last_seen_every_secs}s")),
    ])?;
    let probe = Probe {
        operator: &operator,
        devices: device_api.clone(),
        events: events.clone(),
        api_pids,
        published: published.clone(),
        age_limit: every + heartbeat + Duration::from_secs(10),
    };
    let start = Instant::now();
    let rv0 = resource_version(&device_api).await?;
    let (events0, cpu0, api_cpu0) = (
        events.load(Ordering::Relaxed),
        cpu_ticks_of(&[operator.pid]),
        cpu_ticks_of(&probe.api_pids),
    );
    operator.wait_ready(Duration::from_secs(120)).await?;
    let ready = start.elapsed();

    // Fill: every Device gets its first status.
    let mut first_write = None;
    let fill = loop {
        let text = operator.metrics().await.unwrap_or_default();
        let written = metric_sum(
            &text,
            "iot_operator_device_status_writes_total",
            &[("kind", "change"), ("result", "ok")],
        );
        if written > 0.0 && first_write.is_none() {
            first_write = Some(start.elapsed());
        }
        if written >= devices as f64 {
            break start.elapsed();
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(600),
            "only {written} of {devices} first statuses after 10 min"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let first_write = first_write.unwrap_or(fill);
    let fill_at = start + fill;
    // The watch (second source) sees them all too.
    let t = Instant::now();
    while events.load(Ordering::Relaxed) - events0 < devices as u64 {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "the watch saw only {} of {devices} first statuses",
            events.load(Ordering::Relaxed) - events0
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fill_rv = resource_version(&device_api).await? - rv0;
    let fill_events = events.load(Ordering::Relaxed) - events0;
    let fill_cpu = (cpu_ticks_of(&[operator.pid]) - cpu0) as f64 / TICKS_PER_SEC;
    let fill_api_cpu = (cpu_ticks_of(&probe.api_pids) - api_cpu0) as f64 / TICKS_PER_SEC;
    let fill_errors = metric_sum(
        &operator.metrics().await?,
        "iot_operator_device_status_writes_total",
        &[("result", "error")],
    )
    .round() as u64;
    let fill_rss = rss_kib(operator.pid)?;

    let mut rows = Vec::new();
    // Idle before any lastSeenAt is due: devices become due about `every` after
    // their first status (less a heartbeat: the report it carried was that old).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let first_due = (start + first_write + every).checked_sub(heartbeat + Duration::from_secs(5));
    let left = first_due.map(|d| d.saturating_duration_since(Instant::now()));
    match left {
        Some(left) if left >= Duration::from_secs(10) => {
            rows.push(probe.window("idle, no lastSeenAt due yet", window.min(left)).await?);
        }
        _ => eprintln!("no idle window before the first lastSeenAt is due"),
    }

    // Idle with refreshes: wait for the first, then measure.
    eprintln!(
        "waiting for the first lastSeenAt refresh (about {:.0} s after the first status)",
        every.as_secs_f64()
    );
    let t = Instant::now();
    loop {
        let text = operator.metrics().await.unwrap_or_default();
        if metric_sum(&text, "iot_operator_device_status_writes_total", &[("kind", "refresh")]) > 0.0 {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < every + Duration::from_secs(300),
            "no lastSeenAt refresh within {every:?} + 5 min"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let first_refresh = fill_at.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    rows.push(probe.window("idle, lastSeenAt refreshes paced", window).await?);

    // Flapping: measured over whole cycles, after one cycle to get going.
    let mut flap_note = String::new();
    if flap.count > 0 {
        *flap.since.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        eprintln!(
            "flapping {} devices (silent {:?} of every {:?}); warming up one cycle",
            flap.count, flap.silent_for, flap.cycle
        );
        tokio::time::sleep(flap.cycle).await;
        let cycles = (window.as_secs_f64() / flap.cycle.as_secs_f64()).ceil().max(1.0);
        rows.push(
            probe
                .window(
                    &format!("{flap_percent} % flapping ({} devices)", flap.count),
                    flap.cycle.mul_f64(cycles),
                )
                .await?,
        );
        flap_note = format!(
            "| flapping: silent {:.0} s, then reporting {:.0} s, each device in turn; 2 changes per device per cycle = {:.2} /s expected on top |",
            flap.silent_for.as_secs_f64(),
            (flap.cycle - flap.silent_for).as_secs_f64(),
            2.0 * flap.count as f64 / flap.cycle.as_secs_f64()
        );
    }
    stop.store(true, Ordering::Relaxed);
    reporter.await?;
    watch_task.abort();
    let age_limit = probe.age_limit;

    println!(
        "| devices / heartbeat / IOT_STALE_AFTER / IOT_DEVICE_LAST_SEEN_EVERY | {devices} / {heartbeat_secs} s / {stale_after_secs} s / {last_seen_every_secs} s |"
    );
    println!(
        "| paced refresh budget (devices / period) | {:.2} /s |",
        devices as f64 / every.as_secs_f64()
    );
    println!(
        "| Devices created ({CREATE_CONCURRENCY} at a time) | {:.1} s |",
        create.as_secs_f64()
    );
    println!(
        "| fill: operator start -> ready / first status / every Device's first status | {:.2} s / {:.2} s / {:.2} s ({:.0} writes/s after the first) |",
        ready.as_secs_f64(),
        first_write.as_secs_f64(),
        fill.as_secs_f64(),
        devices as f64 / (fill - first_write).as_secs_f64().max(0.001)
    );
    println!(
        "| fill: watch MODIFIED events / resourceVersion growth / write errors | {fill_events} / {fill_rv} / {fill_errors:.0} |"
    );
    println!(
        "| fill: operator CPU / API server + etcd CPU / operator RSS | {fill_cpu:.1} s / {fill_api_cpu:.1} s / {:.1} MiB |",
        fill_rss as f64 / 1024.0
    );
    println!(
        "| first lastSeenAt refresh after the fill | {:.0} s |",
        first_refresh.as_secs_f64()
    );
    if !flap_note.is_empty() {
        println!("{flap_note}");
    }
    println!();
    println!(
        "| window | length | reports published | Device status writes (operator metric) | write errors | watch MODIFIED | resourceVersion growth | operator CPU | API server + etcd CPU | operator RSS | lastSeenAt age at the end: median / max / older than {:.0} s |",
        age_limit.as_secs_f64()
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        println!("{r}");
    }
    drop(operator);
    drop(servers);
    Ok(())
}

// ---------------------------------------------------------------------------------
// selector-targeting

/// Bucket for the raw baseline writes: the operator's orphan collector would purge
/// keys of unknown deployments in `desired-state`.
const BASELINE_BUCKET: &str = "bench-baseline";

/// Watches desired-state (and the baseline bucket) with a core subscription and
/// records the last operation per subject since the last mark.
struct Tracker {
    since_mark: Mutex<HashMap<String, bool>>,
    /// When the first message after the mark arrived.
    first: Mutex<Option<Instant>>,
}

impl Tracker {
    async fn start(client: &async_nats::Client) -> anyhow::Result<(Arc<Self>, tokio::task::JoinHandle<()>)> {
        let me = Arc::new(Self {
            since_mark: Mutex::new(HashMap::new()),
            first: Mutex::new(None),
        });
        let subs = vec![
            client.subscribe(format!("$KV.{DESIRED_STATE_BUCKET}.>")).await?,
            client.subscribe(format!("$KV.{BASELINE_BUCKET}.>")).await?,
        ];
        client.flush().await?;
        let task = {
            let me = me.clone();
            tokio::spawn(async move {
                let mut all = futures::stream::select_all(subs);
                while let Some(msg) = all.next().await {
                    let op = msg
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("KV-Operation"))
                        .map(|v| v.as_str().to_owned());
                    let present = !matches!(op.as_deref(), Some("PURGE") | Some("DEL"));
                    me.lock().insert(msg.subject.to_string(), present);
                    me.first
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get_or_insert_with(Instant::now);
                }
            })
        };
        Ok((me, task))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, bool>> {
        self.since_mark.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn mark(&self) {
        self.lock().clear();
        *self.first.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// When the first write after the mark was seen.
    fn first(&self) -> Option<Instant> {
        *self.first.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether every subject was written since the mark, last as expected.
    fn satisfied(&self, expect: &[(String, bool)]) -> bool {
        let seen = self.lock();
        expect.iter().all(|(s, present)| seen.get(s) == Some(present))
    }

    /// Subjects written since the mark.
    fn touched(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    async fn wait(&self, expect: &[(String, bool)], timeout: Duration) -> anyhow::Result<()> {
        let t = Instant::now();
        while !self.satisfied(expect) {
            anyhow::ensure!(
                t.elapsed() < timeout,
                "keys not right after {timeout:?} ({} of {} seen)",
                {
                    let seen = self.lock();
                    expect.iter().filter(|(s, p)| seen.get(s) == Some(p)).count()
                },
                expect.len()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }
}

fn score(d: usize) -> anyhow::Result<iot_api::IotScore> {
    let wire: IotScore = serde_json::from_value(
        serde_json::json!({"PodmanV0": {"services": [{"name": "web", "image": format!("localhost/app:{d}")}]}}),
    )?;
    Ok(iot_api::IotScore::from_wire(&wire))
}

fn site_selector(site: usize) -> DeviceSelector {
    DeviceSelector {
        match_labels: [("site".to_owned(), format!("s{site}"))].into(),
        ..Default::default()
    }
}

/// Deployment `sel{d}` selecting `site`. `sel0` is the one whose selector moves; its
/// shrink guard is off (100 %), or moving it to another site would hold the
/// removals until confirmed.
fn selector_deployment(d: usize, site: usize) -> anyhow::Result<Deployment> {
    let mut spec = DeploymentSpec::for_selector(site_selector(site), score(d)?);
    if d == 0 {
        spec.max_shrink_percent = Some(100);
    }
    let mut obj = Deployment::new(&format!("sel{d}"), spec);
    obj.metadata.namespace = Some("default".into());
    Ok(obj)
}

fn dep_ref(d: usize) -> anyhow::Result<DeploymentRef> {
    Ok(DeploymentRef::new("default", format!("sel{d}"))?)
}

/// What KV writes the operator made, by kind, from its metrics.
struct OpCounts {
    kv: f64,
    reconciles: f64,
    status: f64,
}

async fn op_counts(operator: &Operator) -> anyhow::Result<OpCounts> {
    let text = operator.metrics().await?;
    Ok(OpCounts {
        kv: metric_sum(&text, "iot_operator_kv_writes_total", &[]),
        reconciles: metric_sum(&text, "iot_operator_reconciles_total", &[]),
        status: metric_sum(&text, "iot_operator_status_writes_total", &[("result", "ok")]),
    })
}

/// One measured change: its time, the operator's writes, and the baseline.
struct Round {
    /// Change -> the first of its keys written.
    first: Duration,
    time: Duration,
    kv_writes: f64,
    expected: usize,
    /// Keys written that the change does not concern.
    foreign: usize,
    reconciles: f64,
    status_writes: f64,
    baseline: Duration,
}

/// Raw pipelined writes of the same operations into the baseline bucket, until the
/// subscription has seen them all.
async fn baseline(js: &jetstream::Context, tracker: &Tracker, ops: &[KvOp]) -> anyhow::Result<Duration> {
    let expect: Vec<(String, bool)> = ops
        .iter()
        .map(|op| (kv_subject(BASELINE_BUCKET, op.key()), matches!(op, KvOp::Put { .. })))
        .collect();
    tracker.mark();
    let t = Instant::now();
    let (n, err) = write_batch(js, BASELINE_BUCKET, ops, iot_nats::write::DEFAULT_WINDOW).await;
    anyhow::ensure!(err.is_none() && n == ops.len(), "baseline writes: {err:?}");
    tracker.wait(&expect, Duration::from_secs(30)).await?;
    Ok(t.elapsed())
}

/// A bucket like desired-state for the baseline (per-message TTLs allowed, as the
/// purges carry one).
async fn baseline_bucket(js: &jetstream::Context) -> anyhow::Result<()> {
    js.create_key_value(jetstream::kv::Config {
        bucket: BASELINE_BUCKET.to_owned(),
        history: 1,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let mut stream = js.get_stream(kv_stream_name(BASELINE_BUCKET)).await?;
    let config = stream.info().await?.config.clone();
    js.update_stream(jetstream::stream::Config {
        allow_message_ttl: true,
        ..config
    })
    .await?;
    Ok(())
}

pub struct SelectorArgs {
    pub devices: usize,
    pub deployments: usize,
    pub sites: usize,
    pub rounds: usize,
    /// Apply the Deployments one by one to a running operator, at most
    /// `WRITERS_AHEAD` not yet written (default: all exist before it starts).
    pub paced: bool,
}

pub async fn selector_targeting(args: SelectorArgs) -> anyhow::Result<()> {
    let SelectorArgs {
        devices,
        deployments,
        sites,
        rounds,
        paced,
    } = args;
    const WRITERS_AHEAD: usize = 8;
    const STALL: Duration = Duration::from_secs(60);
    anyhow::ensure!(
        sites >= 2 && deployments >= 1 && devices >= sites,
        "need at least 2 sites, 1 deployment and a device per site"
    );
    const SETTLE: Duration = Duration::from_secs(3);
    let servers = Servers::start().await?;
    let api_pids = servers.apiserver_pids();
    let mut site_of: Vec<usize> = (0..devices).map(|i| i % sites).collect();
    let create_devices_took =
        create_devices(&servers.kube, devices, |i| labels(i % sites, (i / sites) % RINGS)).await?;
    eprintln!(
        "{devices} Devices created in {:.1} s",
        create_devices_took.as_secs_f64()
    );
    let dep_api: Api<Deployment> = Api::namespaced(servers.kube.clone(), "default");
    let members =
        |site_of: &[usize], site: usize| -> Vec<usize> { (0..devices).filter(|i| site_of[*i] == site).collect() };
    let keys_of: Vec<usize> = (0..deployments).map(|d| members(&site_of, d % sites).len()).collect();
    let expected_keys: usize = keys_of.iter().sum();
    let apply = |d: usize| {
        let api = dep_api.clone();
        async move {
            let obj = selector_deployment(d, d % sites)?;
            api.patch(
                &format!("sel{d}"),
                &PatchParams::apply("bench").force(),
                &Patch::Apply(&obj),
            )
            .await?;
            anyhow::Ok(())
        }
    };
    let puts_of = |text: &str| metric_sum(text, "iot_operator_kv_writes_total", &[("op", "put"), ("result", "ok")]);

    let (operator, start, fill_mode, create_deployments_took, cpu0, api_cpu0);
    if !paced {
        // Everything exists before the operator starts: it reconciles every
        // Deployment at once.
        let t = Instant::now();
        futures::stream::iter((0..deployments).map(apply))
            .buffer_unordered(CREATE_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        create_deployments_took = t.elapsed();
        operator = servers.operator(&[("IOT_STALE_AFTER", "30s".into())])?;
        (cpu0, api_cpu0) = (cpu_ticks_of(&[operator.pid]), cpu_ticks_of(&api_pids));
        start = Instant::now();
        fill_mode = "cold start (every Deployment exists when the operator starts)";
    } else {
        // The operator runs; Deployments are applied one after another with at most
        // `WRITERS_AHEAD` of them not yet written (before e9ac8c2, many Deployments
        // writing at once wedged the operator: see BENCHMARKS.md).
        operator = servers.operator(&[("IOT_STALE_AFTER", "30s".into())])?;
        operator.wait_ready(Duration::from_secs(120)).await?;
        (cpu0, api_cpu0) = (cpu_ticks_of(&[operator.pid]), cpu_ticks_of(&api_pids));
        start = Instant::now();
        let mut written_prefix = 0usize;
        for d in 0..deployments {
            let must_be_written: usize = keys_of[..d.saturating_sub(WRITERS_AHEAD)].iter().sum();
            while written_prefix < must_be_written {
                let puts = puts_of(&operator.metrics().await.unwrap_or_default());
                written_prefix = puts as usize;
                if written_prefix < must_be_written {
                    anyhow::ensure!(
                        start.elapsed() < Duration::from_secs(900),
                        "only {puts} keys written after 15 min (deployment {d} of {deployments} waiting)"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            apply(d).await?;
        }
        create_deployments_took = start.elapsed();
        fill_mode = "paced (Deployments applied one by one, at most 8 not yet written)";
    }
    eprintln!(
        "{deployments} Deployments applied in {:.1} s ({fill_mode})",
        create_deployments_took.as_secs_f64()
    );
    operator.wait_ready(Duration::from_secs(120)).await?;
    let ready = start.elapsed();
    let mut first_key = None;
    let mut last_progress = (0.0, Instant::now());
    let all_keys = loop {
        let text = operator.metrics().await.unwrap_or_default();
        let puts = puts_of(&text);
        if puts > 0.0 && first_key.is_none() {
            first_key = Some(start.elapsed());
        }
        if puts >= expected_keys as f64 {
            break start.elapsed();
        }
        if puts > last_progress.0 {
            last_progress = (puts, Instant::now());
        }
        if last_progress.1.elapsed() > STALL {
            let errors = metric_sum(&text, "iot_operator_reconciles_total", &[])
                - metric_sum(&text, "iot_operator_reconciles_total", &[("result", "ok")]);
            let readyz = iot_testkit::http::get_status("127.0.0.1", operator.http, "/readyz")
                .await
                .map_or_else(|e| e.to_string(), |c| c.to_string());
            println!(
                "| {fill_mode}: WEDGED | {puts:.0} of {expected_keys} keys after {:.0} s, none for {:.0} s; reconciles ok {:.0}, failed {errors:.0}; operator CPU {:.1} s; /readyz {readyz} |",
                start.elapsed().as_secs_f64(),
                STALL.as_secs_f64(),
                metric_sum(&text, "iot_operator_reconciles_total", &[("result", "ok")]),
                (cpu_ticks_of(&[operator.pid]) - cpu0) as f64 / TICKS_PER_SEC,
            );
            anyhow::bail!("the operator stopped writing: {puts} of {expected_keys} keys");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let first_key = first_key.unwrap_or(all_keys);
    let fill_cpu = (cpu_ticks_of(&[operator.pid]) - cpu0) as f64 / TICKS_PER_SEC;
    let fill_api_cpu = (cpu_ticks_of(&api_pids) - api_cpu0) as f64 / TICKS_PER_SEC;
    // Every deployment's status counts its devices.
    let t = Instant::now();
    loop {
        let list = dep_api.list(&ListParams::default()).await?;
        let right = list
            .items
            .iter()
            .filter(|dep| {
                let d: usize = dep
                    .metadata
                    .name
                    .as_deref()
                    .and_then(|n| n.strip_prefix("sel")?.parse().ok())
                    .unwrap_or(usize::MAX);
                d < deployments
                    && dep.status.as_ref().and_then(|s| s.matched_devices)
                        == Some(members(&site_of, d % sites).len() as u32)
            })
            .count();
        if right == deployments {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(300),
            "only {right} of {deployments} statuses show their matched devices"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let statuses_right = start.elapsed();
    let mut stream = servers.js.get_stream(kv_stream_name(DESIRED_STATE_BUCKET)).await?;
    let in_bucket = stream.info().await?.state.messages;
    let fill_rss = rss_kib(operator.pid)?;
    let fill_counts = op_counts(&operator).await?;
    anyhow::ensure!(
        in_bucket == expected_keys as u64,
        "desired-state holds {in_bucket} keys, expected {expected_keys}"
    );

    baseline_bucket(&servers.js).await?;
    let (tracker, tracker_task) = Tracker::start(&servers.client).await?;
    tokio::time::sleep(SETTLE).await;
    // Nothing moves while nothing changes.
    let quiet0 = op_counts(&operator).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let quiet1 = op_counts(&operator).await?;
    let quiet_writes = quiet1.kv - quiet0.kv;

    let subject = |i: usize, d: usize| -> anyhow::Result<String> {
        Ok(kv_subject(
            DESIRED_STATE_BUCKET,
            &desired_state_key(&device_id(i)?, &dep_ref(d)?),
        ))
    };
    let payloads: Vec<Bytes> = (0..deployments)
        .map(|d| {
            let obj = selector_deployment(d, d % sites)?;
            Ok(iot_operator::kv_plan::payload(&dep_ref(d)?, &obj.spec, Some(1)))
        })
        .collect::<anyhow::Result<_>>()?;
    let deps_of_site = |site: usize| -> Vec<usize> { (0..deployments).filter(|d| d % sites == site).collect() };
    let device_api: Api<Device> = Api::all(servers.kube.clone());

    // (a) Relabel one device from one site to another.
    let mut relabels = Vec::new();
    for r in 0..rounds {
        let i = (r * 2503 + 17) % devices;
        let from = site_of[i];
        let to = (from + 1 + r % (sites - 1)) % sites;
        let mut expect = Vec::new();
        let mut ops = Vec::new();
        for d in deps_of_site(from) {
            expect.push((subject(i, d)?, false));
            ops.push(KvOp::Purge {
                key: desired_state_key(&device_id(i)?, &dep_ref(d)?),
            });
        }
        for d in deps_of_site(to) {
            expect.push((subject(i, d)?, true));
            ops.push(KvOp::Put {
                key: desired_state_key(&device_id(i)?, &dep_ref(d)?),
                value: payloads[d].clone(),
            });
        }
        let before = op_counts(&operator).await?;
        tracker.mark();
        let t = Instant::now();
        let patch = serde_json::json!({"metadata": {"labels": {"site": format!("s{to}")}}});
        device_api
            .patch(&device_name(i), &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        tracker.wait(&expect, Duration::from_secs(60)).await?;
        let time = t.elapsed();
        let first = tracker.first().map_or(time, |f| f.duration_since(t));
        tokio::time::sleep(SETTLE).await;
        let after = op_counts(&operator).await?;
        let own = format!("$KV.{DESIRED_STATE_BUCKET}.{}.", device_name(i));
        let foreign = tracker.touched().iter().filter(|s| !s.starts_with(&own)).count();
        site_of[i] = to;
        let baseline = baseline(&servers.js, &tracker, &ops).await?;
        eprintln!(
            "relabel {i} s{from}->s{to}: {} ({} KV writes, {foreign} foreign), baseline {}",
            ms(time),
            after.kv - before.kv,
            ms(baseline)
        );
        relabels.push(Round {
            first,
            time,
            kv_writes: after.kv - before.kv,
            expected: ops.len(),
            foreign,
            reconciles: after.reconciles - before.reconciles,
            status_writes: after.status - before.status,
            baseline,
        });
    }

    // (b) Move one Deployment's selector to another site.
    let mut moves = Vec::new();
    let mut current = 0usize;
    for r in 0..rounds {
        let next = (current + 1 + r % (sites - 1)) % sites;
        let mut expect = Vec::new();
        let mut ops = Vec::new();
        for i in members(&site_of, current) {
            expect.push((subject(i, 0)?, false));
            ops.push(KvOp::Purge {
                key: desired_state_key(&device_id(i)?, &dep_ref(0)?),
            });
        }
        for i in members(&site_of, next) {
            expect.push((subject(i, 0)?, true));
            ops.push(KvOp::Put {
                key: desired_state_key(&device_id(i)?, &dep_ref(0)?),
                value: payloads[0].clone(),
            });
        }
        let before = op_counts(&operator).await?;
        tracker.mark();
        let t = Instant::now();
        dep_api
            .patch(
                "sel0",
                &PatchParams::apply("bench").force(),
                &Patch::Apply(&selector_deployment(0, next)?),
            )
            .await?;
        tracker.wait(&expect, Duration::from_secs(60)).await?;
        let time = t.elapsed();
        let first = tracker.first().map_or(time, |f| f.duration_since(t));
        tokio::time::sleep(SETTLE).await;
        let after = op_counts(&operator).await?;
        let own = format!(".{}", dep_ref(0)?.to_token());
        let foreign = tracker.touched().iter().filter(|s| !s.ends_with(&own)).count();
        let baseline = baseline(&servers.js, &tracker, &ops).await?;
        eprintln!(
            "move sel0 s{current}->s{next}: {} ({} KV writes, {foreign} foreign), baseline {}",
            ms(time),
            after.kv - before.kv,
            ms(baseline)
        );
        current = next;
        moves.push(Round {
            first,
            time,
            kv_writes: after.kv - before.kv,
            expected: ops.len(),
            foreign,
            reconciles: after.reconciles - before.reconciles,
            status_writes: after.status - before.status,
            baseline,
        });
    }
    let end_rss = rss_kib(operator.pid)?;
    tracker_task.abort();

    // What one reconcile's selection costs: the operator matches a selector against
    // the whole inventory (its Device reflector) on every reconcile.
    let inventory = device_api.list(&ListParams::default()).await?.items;
    let select_runs = 20u32;
    let t = Instant::now();
    let mut matched = 0;
    for k in 0..select_runs {
        matched += iot_operator::targeting::select(inventory.iter(), &site_selector(k as usize % sites)).len();
    }
    let select_each = t.elapsed() / select_runs;
    anyhow::ensure!(matched > 0, "the in-process selection matched nothing");

    // Raw baseline for the fill: the same number of keys, pipelined in one batch.
    let fill_ops: Vec<KvOp> = (0..expected_keys)
        .map(|k| KvOp::Put {
            key: format!("dev{}.default_fill{}", k % devices, k / devices),
            value: payloads[0].clone(),
        })
        .collect();
    let t = Instant::now();
    let (n, err) = write_batch(&servers.js, BASELINE_BUCKET, &fill_ops, iot_nats::write::DEFAULT_WINDOW).await;
    anyhow::ensure!(err.is_none() && n == fill_ops.len(), "raw fill: {err:?}");
    let raw_fill = t.elapsed();

    println!(
        "| devices / sites / selector deployments / keys | {devices} / {sites} / {deployments} / {expected_keys} |"
    );
    println!(
        "| create: Devices ({CREATE_CONCURRENCY} at a time) / Deployments | {:.1} s / {:.1} s |",
        create_devices_took.as_secs_f64(),
        create_deployments_took.as_secs_f64()
    );
    if !paced {
        println!(
            "| {fill_mode}: operator start -> ready / first key / every key / every status right | {:.2} s / {:.2} s / {:.2} s / {:.2} s |",
            ready.as_secs_f64(),
            first_key.as_secs_f64(),
            all_keys.as_secs_f64(),
            statuses_right.as_secs_f64()
        );
    } else {
        println!(
            "| {fill_mode}: first apply -> every key / every status right | {:.2} s ({:.0} keys/s) / {:.2} s |",
            all_keys.as_secs_f64(),
            expected_keys as f64 / all_keys.as_secs_f64(),
            statuses_right.as_secs_f64()
        );
    }
    println!(
        "| fill: KV writes / reconciles / Deployment status writes | {:.0} / {:.0} / {:.0} |",
        fill_counts.kv, fill_counts.reconciles, fill_counts.status
    );
    println!(
        "| fill: operator CPU / API server + etcd CPU / operator RSS | {fill_cpu:.1} s / {fill_api_cpu:.1} s / {:.1} MiB |",
        fill_rss as f64 / 1024.0
    );
    println!(
        "| raw client: {expected_keys} pipelined puts, one batch (window 512) | {:.2} s ({:.0} keys/s) |",
        raw_fill.as_secs_f64(),
        expected_keys as f64 / raw_fill.as_secs_f64()
    );
    println!("| quiet 5 s afterwards: KV writes | {quiet_writes:.0} |");
    println!(
        "| in-process: one selector over the {} Devices (`targeting::select`, what each reconcile does) | {} |",
        inventory.len(),
        ms(select_each)
    );
    for (what, rounds) in [
        ("relabel one device (site A -> B)", &mut relabels),
        ("move sel0's selector (site A -> B)", &mut moves),
    ] {
        let list = |f: &dyn Fn(&Round) -> String| rounds.iter().map(f).collect::<Vec<_>>().join(", ");
        let writes = list(&|r| format!("{:.0}", r.kv_writes));
        let expected = list(&|r| r.expected.to_string());
        let foreign = list(&|r| r.foreign.to_string());
        let reconciles = list(&|r| format!("{:.0}", r.reconciles));
        let status = list(&|r| format!("{:.0}", r.status_writes));
        let mut times: Vec<Duration> = rounds.iter().map(|r| r.time).collect();
        let mut firsts: Vec<Duration> = rounds.iter().map(|r| r.first).collect();
        let mut base: Vec<Duration> = rounds.iter().map(|r| r.baseline).collect();
        let (t, f, b) = (median(&mut times), median(&mut firsts), median(&mut base));
        println!(
            "| {what}: change -> keys right (median of {}) | {} (raw pipelined, same keys: {}; {:.1}x) |",
            rounds.len(),
            ms(t),
            ms(b),
            t.as_secs_f64() / b.as_secs_f64()
        );
        println!(
            "| {what}: change -> first of its keys / every time | {} / {} |",
            ms(f),
            list(&|r| format!("{:.0}", r.time.as_secs_f64() * 1000.0))
        );
        println!("| {what}: KV writes (operator metric) / expected | {writes} / {expected} |");
        println!("| {what}: keys written that it does not concern | {foreign} |");
        println!("| {what}: reconciles / Deployment status writes | {reconciles} / {status} |");
    }
    println!(
        "| operator RSS after the fill / at the end | {:.1} MiB / {:.1} MiB |",
        fill_rss as f64 / 1024.0,
        end_rss as f64 / 1024.0
    );
    drop(operator);
    drop(servers);
    Ok(())
}
