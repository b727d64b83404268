//! Progressive rollouts (issue 23) against the real API server, nats-server and the
//! release operator, with N simulated devices in this process.
//!
//! The simulated devices behave as agents do towards the operator: ONE KV watcher on
//! the desired-state bucket (for all of them, no consumer per device) sees a
//! device's key change; `--report-delay-ms` later that device reports the payload's
//! spec hash and revision Running (or Failed, when told to fail that revision) into
//! `agent-status`, and every device re-reports what it runs every `--heartbeat-secs`
//! (the agent's default is 10 s), so each one is online when its batch starts.
//!
//! - `rollout`: one Deployment over N devices (`targetDevices`), first revision 1
//!   everywhere; then, in turn, a new score without `spec.rollout` (the floor: apply
//!   -> every device reported it Running and `.status.aggregate` says so) and a new
//!   score with 10 batches (`limit: 10%, 20% ... 100%`, no bake time): apply ->
//!   `.status.rollout.phase: Complete`. Dispatch order and the time per batch step
//!   are read from the desired-state entries (the server's stored times); the
//!   operator's CPU and RSS are sampled from /proc every 0.5 s.
//! - `rollout-abort`: the same fleet; a 10-batch rollout with `onFailure: Rollback`
//!   in which the devices of batch k report the new revision Failed. From the first
//!   failure report stored in `agent-status` (its KV time) to (i) the last new
//!   revision dispatched and (ii) the last rollback written (the stable revision's
//!   payload back in the key of every device that had the new one), all on the
//!   server's clock, read from the buckets.
//!
//! `IOT_BENCH_KEEP_OPERATOR_LOG=<path>` keeps a copy of the operator's log.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::kv::Operation;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use harmony_reconciler_contracts::*;
use iot_api::{Deployment, DeploymentRevision, DeploymentSpec, RolloutPhase, RolloutSpec};
use iot_nats::{KvOp, write_batch};
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;

use crate::util::{Operator, Servers, TICKS_PER_SEC, cpu_ticks, median, metric_sum, rss_kib};

const NS: &str = "default";
const NAME: &str = "roll";
/// The error a failing simulated device reports.
const FAILURE: &str = "service web: container exited with code 1 right after start";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn device_name(i: usize) -> String {
    format!("dev{i}")
}

fn device_index(id: &Id) -> Option<usize> {
    id.as_str().strip_prefix("dev")?.parse().ok()
}

/// A KV entry's stored time (the server's clock).
fn kv_time(entry: &async_nats::jetstream::kv::Entry) -> DateTime<Utc> {
    entry.created.with_timezone(&Utc)
}

fn secs(d: chrono::Duration) -> f64 {
    d.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

// ---------------------------------------------------------------------------------
// The simulated devices

/// What a device runs (as it reports it).
#[derive(Clone)]
struct Runs {
    hash: SpecHash,
    revision: Option<u64>,
    failed: bool,
    since: DateTime<Utc>,
}

/// One desired-state put the watcher saw, at the server's stored time.
#[derive(Clone, Copy)]
struct Put {
    device: usize,
    revision: Option<u64>,
    at: DateTime<Utc>,
}

/// Devices whose report of (revision, failed) was acknowledged, and when the last was.
type Acked = HashMap<(u64, bool), (HashSet<usize>, Instant)>;

struct Sim {
    n: usize,
    dep: DeploymentRef,
    delay: Duration,
    heartbeat: Duration,
    states: Mutex<Vec<Option<Runs>>>,
    /// Reports to make, in the order the changes were seen (the delay is constant).
    due: Mutex<VecDeque<(Instant, usize, Runs)>>,
    /// (revision, devices): these devices report that revision Failed.
    fail: Mutex<Option<(u64, HashSet<usize>)>>,
    /// Every desired-state put of the deployment seen since the start.
    puts: Mutex<Vec<Put>>,
    /// (revision, failed) -> devices whose report of it was acknowledged, and when the
    /// last one was (this process's clock).
    acked: Mutex<Acked>,
    /// Revision -> first `agent-status` entry reporting it Failed (KV time).
    first_failure: Mutex<HashMap<u64, DateTime<Utc>>>,
    stop: AtomicBool,
}

impl Sim {
    fn report(&self, i: usize, runs: Option<&Runs>) -> anyhow::Result<Bytes> {
        let now = Utc::now();
        let mut deployments = BTreeMap::new();
        let mut recent_events = Vec::new();
        if let Some(r) = runs {
            let (phase, error) = if r.failed {
                (Phase::Failed, Some(FAILURE.to_owned()))
            } else {
                (Phase::Running, None)
            };
            let mut p = DeploymentPhase::new(phase, Some(r.hash.clone()), error.clone(), r.since);
            p.revision = r.revision;
            deployments.insert(self.dep.clone(), p);
            recent_events.push(EventEntry {
                at: r.since,
                severity: if r.failed { Severity::Error } else { Severity::Info },
                deployment: Some(self.dep.clone()),
                message: error.unwrap_or_else(|| format!("running spec {}", r.hash)),
            });
        }
        let status = AgentStatus {
            format: harmony_reconciler_contracts::status::AGENT_STATUS_FORMAT,
            device_id: Id::new(device_name(i))?,
            agent_version: "bench".into(),
            heartbeat_at: now,
            deployments,
            recent_events,
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
        Ok(Bytes::from(serde_json::to_vec(&status)?))
    }

    fn op(&self, i: usize, runs: Option<&Runs>) -> anyhow::Result<KvOp> {
        Ok(KvOp::Put {
            key: agent_status_key(&Id::new(device_name(i))?),
            value: self.report(i, runs)?,
        })
    }

    /// Every device reports once (nothing deployed yet).
    async fn report_all(&self, js: &jetstream::Context) -> anyhow::Result<()> {
        let ops: Vec<KvOp> = (0..self.n).map(|i| self.op(i, None)).collect::<anyhow::Result<_>>()?;
        let (n, err) = write_batch(js, AGENT_STATUS_BUCKET, &ops, 512).await;
        anyhow::ensure!(err.is_none() && n == self.n, "first reports failed: {err:?}");
        Ok(())
    }

    /// The one watcher of the desired-state bucket, for every simulated device.
    async fn follow(self: Arc<Self>, js: jetstream::Context) -> anyhow::Result<()> {
        let kv = js.get_key_value(DESIRED_STATE_BUCKET).await?;
        let mut watch = kv.watch_all().await?;
        while let Some(entry) = watch.next().await {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("desired-state watch: {e}");
                    continue;
                }
            };
            if entry.operation != Operation::Put {
                continue;
            }
            let Ok((device, dep)) = parse_desired_state_key(&entry.key) else {
                continue;
            };
            let (Some(i), true) = (device_index(&device), dep == self.dep) else {
                continue;
            };
            let Ok(decoded) = DecodedDesiredState::from_slice(&entry.value) else {
                continue;
            };
            let revision = decoded.state.revision;
            lock(&self.puts).push(Put {
                device: i,
                revision,
                at: kv_time(&entry),
            });
            let failed = lock(&self.fail)
                .as_ref()
                .is_some_and(|(r, set)| Some(*r) == revision && set.contains(&i));
            let runs = Runs {
                hash: decoded.spec_hash,
                revision,
                failed,
                since: Utc::now(),
            };
            lock(&self.due).push_back((Instant::now() + self.delay, i, runs));
        }
        Ok(())
    }

    /// Reports what became due, and a slice of heartbeats, every 20 ms.
    async fn report_loop(self: Arc<Self>, js: jetstream::Context) {
        const TICK: Duration = Duration::from_millis(20);
        let slice = ((self.n as f64) * TICK.as_secs_f64() / self.heartbeat.as_secs_f64()).ceil() as usize;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut cursor = 0usize;
        while !self.stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let now = Instant::now();
            let mut changed = Vec::new();
            {
                let mut due = lock(&self.due);
                while due.front().is_some_and(|(at, _, _)| *at <= now) {
                    if let Some((_, i, runs)) = due.pop_front() {
                        changed.push((i, runs));
                    }
                }
            }
            let mut ops = Vec::with_capacity(changed.len() + slice);
            {
                let mut states = lock(&self.states);
                for (i, runs) in &changed {
                    states[*i] = Some(runs.clone());
                }
                for (i, _) in &changed {
                    if let Ok(op) = self.op(*i, states[*i].as_ref()) {
                        ops.push(op);
                    }
                }
                for k in cursor..cursor + slice {
                    let i = k % self.n;
                    if let Ok(op) = self.op(i, states[i].as_ref()) {
                        ops.push(op);
                    }
                }
            }
            cursor = (cursor + slice) % self.n;
            let (_, err) = write_batch(&js, AGENT_STATUS_BUCKET, &ops, 512).await;
            if let Some(e) = err {
                eprintln!("report publish failed: {e}");
                continue;
            }
            let acked_at = Instant::now();
            let mut acked = lock(&self.acked);
            for (i, runs) in changed {
                if let Some(rev) = runs.revision {
                    let e = acked
                        .entry((rev, runs.failed))
                        .or_insert_with(|| (HashSet::new(), acked_at));
                    e.0.insert(i);
                    e.1 = acked_at;
                }
            }
        }
    }

    /// Watches `agent-status` for the first stored report of a failing revision.
    async fn watch_failures(self: Arc<Self>, js: jetstream::Context) -> anyhow::Result<()> {
        let kv = js.get_key_value(AGENT_STATUS_BUCKET).await?;
        let mut watch = kv.watch_all().await?;
        while let Some(entry) = watch.next().await {
            let Ok(entry) = entry else { continue };
            let Some(rev) = lock(&self.fail).as_ref().and_then(|(rev, set)| {
                let i = parse_agent_status_key(&entry.key).ok().and_then(|d| device_index(&d))?;
                set.contains(&i).then_some(*rev)
            }) else {
                continue;
            };
            let Ok(status) = serde_json::from_slice::<AgentStatus>(&entry.value) else {
                continue;
            };
            let failed = status
                .deployments
                .get(&self.dep)
                .is_some_and(|p| p.phase == Phase::Failed && p.revision == Some(rev));
            if failed {
                let at = kv_time(&entry);
                let mut first = lock(&self.first_failure);
                let e = first.entry(rev).or_insert(at);
                *e = (*e).min(at);
            }
        }
        Ok(())
    }

    /// Waits until every device's report of `revision` (Running) was acknowledged;
    /// returns when the last one was.
    async fn wait_running(&self, revision: u64, timeout: Duration) -> anyhow::Result<Instant> {
        let start = Instant::now();
        loop {
            if let Some((set, at)) = lock(&self.acked).get(&(revision, false))
                && set.len() >= self.n
            {
                return Ok(*at);
            }
            anyhow::ensure!(
                start.elapsed() < timeout,
                "not every device reported revision {revision} Running within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

// ---------------------------------------------------------------------------------
// The Deployment, as the bench sees it

/// The latest Deployment object this process received.
type Latest = tokio::sync::watch::Receiver<Option<Arc<Deployment>>>;

fn watch_deployment(kube: kube::Client) -> (Latest, tokio::task::JoinHandle<()>) {
    let (tx, rx) = tokio::sync::watch::channel(None);
    let task = tokio::spawn(async move {
        let api: Api<Deployment> = Api::namespaced(kube, NS);
        let cfg = watcher::Config::default().fields(&format!("metadata.name={NAME}"));
        let mut events = watcher(api, cfg).boxed();
        while let Some(e) = events.next().await {
            match e {
                Ok(watcher::Event::Apply(d) | watcher::Event::InitApply(d)) => {
                    let _ = tx.send(Some(Arc::new(d)));
                }
                Ok(_) => {}
                Err(e) => eprintln!("deployment watch: {e}"),
            }
        }
    });
    (rx, task)
}

/// Waits until `pred` holds for the latest Deployment; returns when it first did.
async fn wait_for(
    latest: &mut Latest,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Deployment) -> bool,
) -> anyhow::Result<(Instant, Arc<Deployment>)> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(d) = latest.borrow_and_update().clone()
            && pred(&d)
        {
            return Ok((Instant::now(), d));
        }
        match tokio::time::timeout_at(deadline, latest.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => anyhow::bail!("the deployment watch ended"),
            Err(_) => {
                let rollout = latest
                    .borrow()
                    .as_ref()
                    .and_then(|d| d.status.as_ref().and_then(|s| s.rollout.clone()));
                anyhow::bail!(
                    "timed out after {timeout:?} waiting for {what}; .status.rollout: {}",
                    serde_json::to_string(&rollout).unwrap_or_default()
                )
            }
        }
    }
}

fn score(version: u64) -> anyhow::Result<IotScore> {
    Ok(serde_json::from_value(serde_json::json!(
        {"PodmanV0": {"services": [{"name": "web", "image": format!("localhost/iot-web:v{version}")}]}}
    ))?)
}

/// 10 cumulative batches (10 %, 20 % ... 100 %), no bake time.
fn ten_batches(on_failure: &str, max_unavailable: Option<&str>) -> anyhow::Result<RolloutSpec> {
    let batches: Vec<serde_json::Value> = (1..=10)
        .map(|k| serde_json::json!({"limit": format!("{}%", k * 10)}))
        .collect();
    let mut spec = serde_json::json!({"batches": batches, "onFailure": on_failure});
    if let Some(m) = max_unavailable {
        spec["maxUnavailable"] = serde_json::json!(m);
    }
    Ok(serde_json::from_value(spec)?)
}

async fn apply(
    api: &Api<Deployment>,
    targets: &[String],
    version: u64,
    rollout: Option<RolloutSpec>,
) -> anyhow::Result<SpecHash> {
    let wire = score(version)?;
    let mut spec = DeploymentSpec::for_devices(targets.to_vec(), iot_api::IotScore::from_wire(&wire));
    spec.rollout = rollout;
    let hash = spec.score.spec_hash();
    let mut dep = Deployment::new(NAME, spec);
    dep.metadata.namespace = Some(NS.into());
    api.patch(NAME, &PatchParams::apply("bench").force(), &Patch::Apply(&dep))
        .await?;
    Ok(hash)
}

fn aggregate_shows(d: &Deployment, hash: &SpecHash, n: usize) -> bool {
    d.status
        .as_ref()
        .and_then(|s| s.aggregate.as_ref())
        .is_some_and(|a| a.spec_hash == hash.to_string() && a.succeeded as usize == n)
}

fn last_good(d: &Deployment) -> Option<u64> {
    d.status
        .as_ref()
        .and_then(|s| s.aggregate.as_ref())
        .and_then(|a| a.last_good_revision)
}

fn rollout_of(d: &Deployment) -> Option<&iot_api::RolloutStatus> {
    d.status.as_ref().and_then(|s| s.rollout.as_ref())
}

/// The revision number the operator gave the current score (from status).
fn current_revision(d: &Deployment) -> Option<u64> {
    d.status
        .as_ref()
        .and_then(|s| s.aggregate.as_ref())
        .and_then(|a| a.revision)
}

/// The batches the operator recorded for `revision`.
async fn recorded_plan(kube: &kube::Client, revision: u64) -> anyhow::Result<Vec<Vec<usize>>> {
    let api: Api<DeploymentRevision> = Api::namespaced(kube.clone(), NS);
    let start = Instant::now();
    loop {
        if let Some(r) = api.get_opt(&iot_api::revision_name(NAME, revision)).await? {
            let plan = r
                .spec
                .rollout_plan
                .ok_or_else(|| anyhow::anyhow!("revision {revision} has no rollout plan"))?;
            return Ok(plan
                .batches
                .iter()
                .map(|b| {
                    b.iter()
                        .filter_map(|d| Id::new(d.as_str()).ok().and_then(|id| device_index(&id)))
                        .collect()
                })
                .collect());
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "no revision {revision}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The plan the operator makes for a rollout over `targets` (no Device labels).
fn expected_plan(dep: &DeploymentRef, spec: &RolloutSpec, n: usize) -> anyhow::Result<Vec<Vec<usize>>> {
    let targets: BTreeSet<Id> = (0..n).map(|i| Id::new(device_name(i))).collect::<Result<_, _>>()?;
    let plan = iot_operator::rollout_plan::plan_batches(dep, spec, &targets, &BTreeMap::new());
    Ok(plan
        .iter()
        .map(|b| b.iter().filter_map(device_index).collect())
        .collect())
}

// ---------------------------------------------------------------------------------
// The operator's CPU and RSS

struct Sample {
    at: Instant,
    cpu_percent: f64,
    rss_kib: u64,
}

fn sample_process(pid: u32, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<Sample>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut last: Option<(Instant, u64)> = None;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let (Ok(ticks), Ok(rss)) = (cpu_ticks(pid), rss_kib(pid)) else {
                break;
            };
            let now = Instant::now();
            if let Some((t0, c0)) = last {
                let cpu_percent = (ticks - c0) as f64 / TICKS_PER_SEC / now.duration_since(t0).as_secs_f64() * 100.0;
                out.push(Sample {
                    at: now,
                    cpu_percent,
                    rss_kib: rss,
                });
            }
            last = Some((now, ticks));
        }
        out
    })
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

// ---------------------------------------------------------------------------------
// Common setup

#[derive(Clone, Debug)]
pub struct Args {
    pub devices: usize,
    pub runs: usize,
    pub report_delay_ms: u64,
    pub heartbeat_secs: u64,
    pub rollout_tick: String,
    /// `rollout-abort` only: the batch (1-based) whose devices fail.
    pub fail_batch: usize,
    /// `rollout-abort` only: `spec.rollout.maxUnavailable`.
    pub max_unavailable: Option<String>,
}

struct Bench {
    _servers: Servers,
    operator: Operator,
    kube: kube::Client,
    api: Api<Deployment>,
    sim: Arc<Sim>,
    latest: Latest,
    targets: Vec<String>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    version: u64,
}

impl Bench {
    async fn start(args: &Args) -> anyhow::Result<Self> {
        let servers = Servers::start().await?;
        let js = servers.js.clone();
        let dep = DeploymentRef::new(NS, NAME)?;
        let sim = Arc::new(Sim {
            n: args.devices,
            dep,
            delay: Duration::from_millis(args.report_delay_ms),
            heartbeat: Duration::from_secs(args.heartbeat_secs.max(1)),
            states: Mutex::new(vec![None; args.devices]),
            due: Mutex::new(VecDeque::new()),
            fail: Mutex::new(None),
            puts: Mutex::new(Vec::new()),
            acked: Mutex::new(HashMap::new()),
            first_failure: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
        });
        let mut tasks = Vec::new();
        {
            let (sim, js) = (sim.clone(), js.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = sim.follow(js).await {
                    eprintln!("simulated devices stopped following: {e}");
                }
            }));
        }
        sim.report_all(&js).await?;
        {
            let (sim, js) = (sim.clone(), js.clone());
            tasks.push(tokio::spawn(sim.report_loop(js)));
        }
        {
            let (sim, js) = (sim.clone(), js.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = sim.watch_failures(js).await {
                    eprintln!("failure watch stopped: {e}");
                }
            }));
        }
        let operator = servers.operator(&[
            ("IOT_STALE_AFTER", "30s".into()),
            ("IOT_ROLLOUT_TICK", args.rollout_tick.clone()),
        ])?;
        operator.wait_ready(Duration::from_secs(120)).await?;
        let kube = servers.kube.clone();
        let api: Api<Deployment> = Api::namespaced(kube.clone(), NS);
        let (latest, watch_task) = watch_deployment(kube.clone());
        tasks.push(watch_task);
        let targets = (0..args.devices).map(device_name).collect();
        Ok(Self {
            _servers: servers,
            operator,
            kube,
            api,
            sim,
            latest,
            targets,
            tasks,
            version: 0,
        })
    }

    /// Applies the next score (no rollout) and waits until every device runs it and
    /// the status says so, and it is the last good revision. Returns its revision.
    async fn settle_on_next(&mut self) -> anyhow::Result<u64> {
        self.version += 1;
        let hash = apply(&self.api, &self.targets, self.version, None).await?;
        let (_, d) = wait_for(
            &mut self.latest,
            "every device Running",
            Duration::from_secs(300),
            |d| aggregate_shows(d, &hash, self.sim.n),
        )
        .await?;
        let rev = current_revision(&d).ok_or_else(|| anyhow::anyhow!("no revision in status"))?;
        wait_for(
            &mut self.latest,
            "the last good revision",
            Duration::from_secs(60),
            |d| last_good(d) == Some(rev),
        )
        .await?;
        Ok(rev)
    }

    async fn kv_writes(&self) -> f64 {
        let m = self.operator.metrics().await.unwrap_or_default();
        metric_sum(&m, "iot_operator_kv_writes_total", &[])
    }

    fn stop(self) {
        // For a closer look at what the operator did (run with
        // IOT_BENCH_OPERATOR_LOG=info,kube_client=debug for its API calls).
        if let Some(to) = std::env::var_os("IOT_BENCH_KEEP_OPERATOR_LOG") {
            let from = self._servers.api.dir().join("operator.log");
            if let Err(e) = std::fs::copy(&from, &to) {
                eprintln!("copying {} failed: {e}", from.display());
            }
        }
        self.sim.stop.store(true, Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------
// rollout: floor vs 10 batches

struct RolloutRun {
    floor_reported: Duration,
    floor_status: Duration,
    rollout_reported: Duration,
    rollout_complete: Duration,
    /// Server-time gaps between the first dispatch of consecutive batches.
    steps: Vec<f64>,
    in_order: bool,
    puts: usize,
    double_puts: usize,
    kv_writes: f64,
    cpu: Vec<f64>,
    rss_max_kib: u64,
}

pub async fn rollout(args: Args) -> anyhow::Result<()> {
    let load_before = load();
    eprintln!("load before: {load_before}");
    let mut b = Bench::start(&args).await?;
    let n = args.devices;
    let t = Instant::now();
    let first = b.settle_on_next().await?;
    eprintln!(
        "revision {first} on {n} devices in {:.2} s (first apply: finalizer, first revision)",
        t.elapsed().as_secs_f64()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_process(b.operator.pid, stop.clone());
    let dep = b.sim.dep.clone();
    let spec = ten_batches("Pause", None)?;
    let expected = expected_plan(&dep, &spec, n)?;
    let mut runs = Vec::new();
    let mut windows = Vec::new();
    for run in 0..args.runs {
        tokio::time::sleep(Duration::from_secs(2)).await;
        // (a) the floor: no rollout.
        b.version += 1;
        let t0 = Instant::now();
        let hash = apply(&b.api, &b.targets, b.version, None).await?;
        let (t_status, d) = wait_for(&mut b.latest, "floor: status", Duration::from_secs(300), |d| {
            aggregate_shows(d, &hash, n)
        })
        .await?;
        let rev_a = current_revision(&d).ok_or_else(|| anyhow::anyhow!("no revision"))?;
        let t_reported = b.sim.wait_running(rev_a, Duration::from_secs(60)).await?;
        let floor_status = t_status.duration_since(t0);
        let floor_reported = t_reported.duration_since(t0);
        wait_for(&mut b.latest, "last good", Duration::from_secs(60), |d| {
            last_good(d) == Some(rev_a)
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;

        // (b) 10 batches, no bake time.
        b.version += 1;
        let writes_before = b.kv_writes().await;
        let puts_before = lock(&b.sim.puts).len();
        let t0 = Instant::now();
        apply(&b.api, &b.targets, b.version, Some(spec.clone())).await?;
        let rev_b = rev_a + 1;
        let (t_complete, d) = wait_for(&mut b.latest, "rollout Complete", Duration::from_secs(600), |d| {
            rollout_of(d).is_some_and(|r| r.revision == rev_b && r.phase == RolloutPhase::Complete)
        })
        .await?;
        let rollout_complete = t_complete.duration_since(t0);
        let t_reported = b.sim.wait_running(rev_b, Duration::from_secs(60)).await?;
        let rollout_reported = t_reported.duration_since(t0);
        windows.push((t0, t_complete));
        tokio::time::sleep(Duration::from_secs(3)).await;
        let kv_writes = b.kv_writes().await - writes_before;
        let plan = recorded_plan(&b.kube, rev_b).await?;
        if plan != expected {
            eprintln!("run {run}: the recorded plan differs from rollout_plan::plan_batches over the targets");
        }
        // Dispatch order and step times, on the server's clock.
        let puts: Vec<Put> = lock(&b.sim.puts)[puts_before..]
            .iter()
            .filter(|p| p.revision == Some(rev_b))
            .copied()
            .collect();
        let mut per_device: HashMap<usize, usize> = HashMap::new();
        for p in &puts {
            *per_device.entry(p.device).or_default() += 1;
        }
        let double_puts = per_device.values().filter(|c| **c > 1).count();
        let batch_of: HashMap<usize, usize> = plan
            .iter()
            .enumerate()
            .flat_map(|(k, b)| b.iter().map(move |d| (*d, k)))
            .collect();
        let mut first_at: Vec<Option<DateTime<Utc>>> = vec![None; plan.len()];
        let mut last_at: Vec<Option<DateTime<Utc>>> = vec![None; plan.len()];
        for p in &puts {
            let k = batch_of[&p.device];
            first_at[k] = Some(first_at[k].map_or(p.at, |t| t.min(p.at)));
            last_at[k] = Some(last_at[k].map_or(p.at, |t| t.max(p.at)));
        }
        let in_order = (1..plan.len()).all(|k| match (last_at[k - 1], first_at[k]) {
            (Some(prev_last), Some(first)) => first >= prev_last,
            _ => false,
        });
        let steps: Vec<f64> = (1..plan.len())
            .filter_map(|k| Some(secs(first_at[k]? - first_at[k - 1]?)))
            .collect();
        let status = rollout_of(&d).cloned();
        eprintln!(
            "run {run}: floor {:.3} s (status {:.3} s), rollout {:.3} s (every report {:.3} s), batch steps {:?}, in order {in_order}, {} puts, {double_puts} devices put twice, summary {:?}",
            floor_reported.as_secs_f64(),
            floor_status.as_secs_f64(),
            rollout_complete.as_secs_f64(),
            rollout_reported.as_secs_f64(),
            steps.iter().map(|s| format!("{s:.2}")).collect::<Vec<_>>(),
            puts.len(),
            status.map(|s| s.summary)
        );
        runs.push(RolloutRun {
            floor_reported,
            floor_status,
            rollout_reported,
            rollout_complete,
            steps,
            in_order,
            puts: puts.len(),
            double_puts,
            kv_writes,
            cpu: Vec::new(),
            rss_max_kib: 0,
        });
    }
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await?;
    for (run, (from, to)) in runs.iter_mut().zip(&windows) {
        for s in samples.iter().filter(|s| s.at > *from && s.at <= *to) {
            run.cpu.push(s.cpu_percent);
            run.rss_max_kib = run.rss_max_kib.max(s.rss_kib);
        }
    }
    let idle: Vec<f64> = samples
        .iter()
        .filter(|s| {
            !windows
                .iter()
                .any(|(f, t)| s.at > *f && s.at <= *t + Duration::from_secs(1))
        })
        .map(|s| s.cpu_percent)
        .collect();
    let load_after = load();
    b.stop();

    let mut floor: Vec<Duration> = runs.iter().map(|r| r.floor_status.max(r.floor_reported)).collect();
    let mut floor_rep: Vec<Duration> = runs.iter().map(|r| r.floor_reported).collect();
    let mut roll: Vec<Duration> = runs.iter().map(|r| r.rollout_complete).collect();
    let mut roll_rep: Vec<Duration> = runs.iter().map(|r| r.rollout_reported).collect();
    let mut steps: Vec<f64> = runs.iter().flat_map(|r| r.steps.iter().copied()).collect();
    let mut cpu: Vec<f64> = runs.iter().flat_map(|r| r.cpu.iter().copied()).collect();
    let mut idle_cpu = idle.clone();
    let ratios: Vec<f64> = runs
        .iter()
        .map(|r| r.rollout_complete.as_secs_f64() / r.floor_status.max(r.floor_reported).as_secs_f64())
        .collect();
    let (floor_m, roll_m) = (median(&mut floor), median(&mut roll));
    let rss_max = runs.iter().map(|r| r.rss_max_kib).max().unwrap_or(0);
    println!(
        "| devices / runs / report delay / rollout tick | {n} / {} / {} ms / {} |",
        args.runs, args.report_delay_ms, args.rollout_tick
    );
    println!(
        "| (a) no rollout: apply -> every device reported it Running | {:.3} s |",
        median(&mut floor_rep).as_secs_f64()
    );
    println!(
        "| (a) no rollout: apply -> ... and `.status.aggregate` shows it (the floor) | {:.3} s (runs: {}) |",
        floor_m.as_secs_f64(),
        runs.iter()
            .map(|r| format!("{:.2}", r.floor_status.max(r.floor_reported).as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| (b) 10 batches: apply -> every device reported it Running | {:.3} s |",
        median(&mut roll_rep).as_secs_f64()
    );
    println!(
        "| (b) 10 batches: apply -> `.status.rollout.phase: Complete` | {:.3} s (runs: {}) |",
        roll_m.as_secs_f64(),
        runs.iter()
            .map(|r| format!("{:.2}", r.rollout_complete.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| ratio (b)/(a), of the medians / median of per-run ratios | {:.2}x / {:.2}x |",
        roll_m.as_secs_f64() / floor_m.as_secs_f64(),
        pct(&mut ratios.clone(), 0.5)
    );
    println!(
        "| batch step (first dispatch of batch k -> of batch k+1, KV time): median / min / max | {:.3} / {:.3} / {:.3} s ({} steps) |",
        pct(&mut steps, 0.5),
        pct(&mut steps, 0.0),
        pct(&mut steps, 1.0),
        steps.len()
    );
    println!(
        "| batches dispatched in order, every run | {} |",
        if runs.iter().all(|r| r.in_order) { "yes" } else { "NO" }
    );
    println!(
        "| new-revision puts per rollout / devices put twice / operator KV writes | {} / {} / {} |",
        runs.iter().map(|r| r.puts.to_string()).collect::<Vec<_>>().join(", "),
        runs.iter()
            .map(|r| r.double_puts.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        runs.iter()
            .map(|r| format!("{:.0}", r.kv_writes))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| operator CPU during the rollouts (0.5 s samples, % of one core): median / max | {:.1} % / {:.1} % ({} samples) |",
        pct(&mut cpu, 0.5),
        pct(&mut cpu, 1.0),
        cpu.len()
    );
    println!(
        "| operator CPU outside the rollouts (floor runs, heartbeats): median / max | {:.1} % / {:.1} % |",
        pct(&mut idle_cpu, 0.5),
        pct(&mut idle_cpu, 1.0)
    );
    println!(
        "| operator RSS, max during the rollouts | {:.1} MiB |",
        rss_max as f64 / 1024.0
    );
    println!("| load average (1, 5, 15 min) before / after | {load_before} / {load_after} |");
    let json = serde_json::json!({
        "bench": "rollout",
        "devices": n,
        "runs": args.runs,
        "report_delay_ms": args.report_delay_ms,
        "rollout_tick": args.rollout_tick,
        "floor_s": runs.iter().map(|r| r.floor_status.max(r.floor_reported).as_secs_f64()).collect::<Vec<_>>(),
        "rollout_complete_s": runs.iter().map(|r| r.rollout_complete.as_secs_f64()).collect::<Vec<_>>(),
        "floor_median_s": floor_m.as_secs_f64(),
        "rollout_median_s": roll_m.as_secs_f64(),
        "ratio": roll_m.as_secs_f64() / floor_m.as_secs_f64(),
        "batch_step_median_s": pct(&mut steps, 0.5),
        "in_order": runs.iter().all(|r| r.in_order),
        "operator_cpu_median_percent": pct(&mut cpu, 0.5),
        "operator_cpu_max_percent": pct(&mut cpu, 1.0),
        "operator_rss_max_mib": rss_max as f64 / 1024.0,
    });
    println!("{json}");
    Ok(())
}

// ---------------------------------------------------------------------------------
// rollout-abort

pub async fn abort(args: Args) -> anyhow::Result<()> {
    eprintln!("load before: {}", load());
    anyhow::ensure!(
        (2..=10).contains(&args.fail_batch),
        "--fail-batch must be 2..10 (batch 1 is dispatched in the apply's own reconcile)"
    );
    let mut b = Bench::start(&args).await?;
    let n = args.devices;
    let stable = b.settle_on_next().await?;
    eprintln!("revision {stable} running on {n} devices; it is the last good one");
    let dep = b.sim.dep.clone();
    let spec = ten_batches("Rollback", args.max_unavailable.as_deref())?;
    let expected = expected_plan(&dep, &spec, n)?;
    let k = args.fail_batch - 1;
    let failing: HashSet<usize> = expected[k].iter().copied().collect();
    let should_get: HashSet<usize> = expected[..=k].iter().flatten().copied().collect();
    let mut stop_lat = Vec::new();
    let mut rollback_lat = Vec::new();
    let mut rows = Vec::new();
    let mut rev = stable;
    for run in 0..args.runs {
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The revision this run rolls out: the newest so far plus one.
        let d = b.latest.borrow().clone();
        rev = rev.max(d.as_ref().and_then(|d| current_revision(d)).unwrap_or(0)) + 1;
        *lock(&b.sim.fail) = Some((rev, failing.clone()));
        b.version += 1;
        let puts_before = lock(&b.sim.puts).len();
        let t0 = Instant::now();
        apply(&b.api, &b.targets, b.version, Some(spec.clone())).await?;
        let (t_done, d) = wait_for(&mut b.latest, "RolledBack", Duration::from_secs(300), |d| {
            rollout_of(d).is_some_and(|r| r.revision == rev && r.phase == RolloutPhase::RolledBack)
        })
        .await?;
        let rolled_back_after = t_done.duration_since(t0);
        // Quiet period: nothing more may be dispatched.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let plan = recorded_plan(&b.kube, rev).await?;
        let plan_matches = plan == expected;
        let first_failure = lock(&b.sim.first_failure).get(&rev).copied();
        let Some(first_failure) = first_failure else {
            anyhow::bail!("run {run}: no failure report of revision {rev} was seen");
        };
        let puts: Vec<Put> = lock(&b.sim.puts)[puts_before..].to_vec();
        let new: Vec<&Put> = puts.iter().filter(|p| p.revision == Some(rev)).collect();
        let got: HashSet<usize> = new.iter().map(|p| p.device).collect();
        let last_dispatch = new.iter().map(|p| p.at).max();
        let dispatched_after_failure = new.iter().filter(|p| p.at > first_failure).count();
        // The rollback: for each device that had the new revision, the first put of
        // the stable revision after its new-revision put.
        let mut rolled: BTreeMap<usize, DateTime<Utc>> = BTreeMap::new();
        for d in &got {
            let had_new = new.iter().filter(|p| p.device == *d).map(|p| p.at).max();
            let back = puts
                .iter()
                .filter(|p| p.device == *d && p.revision == Some(stable) && had_new.is_some_and(|h| p.at > h))
                .map(|p| p.at)
                .min();
            if let Some(t) = back {
                rolled.insert(*d, t);
            }
        }
        let others_written = puts.iter().filter(|p| !got.contains(&p.device)).count();
        let all_rolled = rolled.len() == got.len();
        let last_rollback = rolled.values().max().copied();
        // (i): dispatch stopped when the failure was stored, or at the last dispatch after it.
        let stop = last_dispatch.map_or(0.0, |t| secs(t - first_failure).max(0.0));
        let back = last_rollback.map(|t| secs(t - first_failure));
        let status = rollout_of(&d).cloned();
        eprintln!(
            "run {run}: revision {rev}: dispatched {} devices (expected batches 1..={}: {}, same set: {}), plan as expected: {plan_matches}; \
             last dispatch {:+.3} s from the first failure ({} after it); rollback written to {}/{} (last {:?} s after the first failure); \
             other devices written: {others_written}; RolledBack seen {:.3} s after apply; reason {:?}, message {:?}",
            got.len(),
            k + 1,
            should_get.len(),
            got == should_get,
            last_dispatch.map_or(f64::NAN, |t| secs(t - first_failure)),
            dispatched_after_failure,
            rolled.len(),
            got.len(),
            back,
            rolled_back_after.as_secs_f64(),
            status.as_ref().and_then(|s| s.reason.clone()),
            status.as_ref().map(|s| s.message.clone()),
        );
        anyhow::ensure!(
            all_rolled,
            "run {run}: not every device that had revision {rev} was rolled back"
        );
        stop_lat.push(stop);
        if let Some(bk) = back {
            rollback_lat.push(bk);
        }
        rows.push(serde_json::json!({
            "run": run,
            "revision": rev,
            "dispatched": got.len(),
            "expected_dispatched": should_get.len(),
            "same_devices": got == should_get,
            "dispatched_after_first_failure": dispatched_after_failure,
            "last_dispatch_minus_first_failure_s": last_dispatch.map(|t| secs(t - first_failure)),
            "rollback_written_s": back,
            "others_written": others_written,
            "rolled_back_seen_after_apply_s": rolled_back_after.as_secs_f64(),
            "reason": status.as_ref().and_then(|s| s.reason.clone()),
        }));
        // Every device runs the stable revision again before the next run.
        wait_for(&mut b.latest, "stable again", Duration::from_secs(60), |d| {
            last_good(d) == Some(stable)
        })
        .await?;
    }
    b.stop();
    println!(
        "| devices / runs / failing batch / report delay / rollout tick / maxUnavailable | {n} / {} / {} of 10 ({} devices) / {} ms / {} / {} |",
        args.runs,
        args.fail_batch,
        failing.len(),
        args.report_delay_ms,
        args.rollout_tick,
        args.max_unavailable.as_deref().unwrap_or("none")
    );
    println!(
        "| first failure stored -> no further dispatch: median / max | {:.3} / {:.3} s |",
        pct(&mut stop_lat.clone(), 0.5),
        pct(&mut stop_lat.clone(), 1.0)
    );
    println!(
        "| first failure stored -> rollback written to every device that had it: median / max | {:.3} / {:.3} s (runs: {}) |",
        pct(&mut rollback_lat.clone(), 0.5),
        pct(&mut rollback_lat.clone(), 1.0),
        rollback_lat
            .iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "rollout-abort",
            "devices": n,
            "fail_batch": args.fail_batch,
            "stop_median_s": pct(&mut stop_lat.clone(), 0.5),
            "stop_max_s": pct(&mut stop_lat.clone(), 1.0),
            "rollback_median_s": pct(&mut rollback_lat.clone(), 0.5),
            "rollback_max_s": pct(&mut rollback_lat.clone(), 1.0),
            "runs": rows,
        })
    );
    eprintln!("load after: {}", load());
    Ok(())
}
