//! The platform past one machine's single server: N simulated devices, each with
//! its own connection (TLS, verified against the stack's CA) and its own client
//! name and inbox, each running the agent's real parts (the desired-state follower,
//! the reconciler with the in-memory runtime standing in for podman, and the status
//! reporter publishing to `agent-status`), on one nats-server or on an N-member
//! JetStream cluster with replicated buckets.
//!
//! The devices live in child processes (`iot-bench scale-agents`, this binary run
//! again), at most `--per-process` connections each: a process may hold 20,000 file
//! descriptors here. The parent starts the servers, writes the desired state (as the
//! operator's fan-out does: one acked put per device, pipelined), listens to
//! `agent-status` on a core subscription, and times, per device, from the first put
//! to the first report of the new spec hash Running. It samples every server's
//! `/varz` (mem, cpu) and `/proc` CPU ticks, the children's RSS and the machine's
//! free memory, and stops everything when the machine runs low on memory.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::{ConnectOptions, jetstream};
use bytes::Bytes;
use futures::StreamExt;
use harmony_reconciler_contracts::*;
use iot_agent::agent::reconcile_loop;
use iot_agent::memory_runtime::MemoryRuntime;
use iot_agent::metrics::AgentMetrics;
use iot_agent::reconciler::{Reconciler, ReconcilerConfig, Report};
use iot_agent::report::StatusReporter;
use iot_nats::connect::CredentialSource;
use iot_nats::follow::FollowConfig;
use iot_nats::{ClientOptions, DesiredView, NatsConnection, NatsTls, connect_with, follow_desired_state};
use iot_testkit::{Ca, ClusterOptions, NatsCluster, NatsServer, TlsMode};
use serde_json::json;
use tokio::sync::watch;

use crate::util::cpu_ticks;

/// Images each device's in-memory runtime has: one per apply.
const IMAGES: usize = 8;

fn image(n: usize) -> String {
    format!("img:{n}")
}

/// The payload of apply `n` (revision `n`, image `img:n`) and the spec hash the agent
/// reports for it.
pub fn payload(n: usize) -> anyhow::Result<(Bytes, String)> {
    let score: IotScore =
        serde_json::from_value(json!({"PodmanV0": {"services": [{"name": "web", "image": image(n)}]}}))?;
    let dep = DeploymentRef::new("default", "web")?;
    let bytes = DesiredState::new(dep, score).with_revision(n as u64).to_bytes();
    let hash = DecodedDesiredState::from_slice(&bytes)?.spec_hash.as_str().to_owned();
    Ok((Bytes::from(bytes), hash))
}

/// Writes `value` to every device's key (`dev0` .. `dev{n-1}`) as the operator's
/// fan-out does: pipelined, every put acknowledged, `window` in flight.
pub async fn put_all(js: &jetstream::Context, n: usize, value: &Bytes, window: usize) -> anyhow::Result<Duration> {
    let ops: Vec<iot_nats::KvOp> = (0..n)
        .map(|i| iot_nats::KvOp::Put {
            key: format!("dev{i}.default_web"),
            value: value.clone(),
        })
        .collect();
    let t = Instant::now();
    // The operator's own pipelined writer (what its fan-out uses).
    let (_, failed) = iot_nats::write_batch(js, DESIRED_STATE_BUCKET, &ops, window).await;
    if let Some(e) = failed {
        anyhow::bail!("writing {n} keys: {e}");
    }
    Ok(t.elapsed())
}

/// Anonymous credentials with client options the default leaves out: a bench
/// process holding 15,000 clients cannot afford async-nats' 64 KiB read buffer
/// each, and the parent's status subscription must not drop messages.
#[derive(Debug)]
struct Tuned {
    read_buffer: Option<u16>,
    subscription_capacity: Option<usize>,
}

impl CredentialSource for Tuned {
    fn describe(&self) -> String {
        "anonymous (bench)".into()
    }

    fn connect_options(&self) -> futures::future::BoxFuture<'_, Result<ConnectOptions, iot_nats::NatsError>> {
        Box::pin(async move {
            let mut o = ConnectOptions::new();
            if let Some(b) = self.read_buffer {
                o = o.read_buffer_capacity(b);
            }
            if let Some(c) = self.subscription_capacity {
                o = o.subscription_capacity(c);
            }
            Ok(o)
        })
    }
}

/// The servers of one run: one nats-server, or a cluster.
pub enum Servers {
    Single { server: NatsServer, monitor: u16 },
    Cluster(NatsCluster),
}

impl Servers {
    /// One server (`size` 1) or a `size`-member cluster, TLS from `ca`, monitoring on.
    pub async fn start(size: usize, sync_always: bool, ca: &Ca, parent: &std::path::Path) -> anyhow::Result<Self> {
        if size == 1 {
            let monitor = iot_testkit::free_port()?;
            let sync = if sync_always { "sync_interval: always" } else { "" };
            let config = format!("http: \"127.0.0.1:{monitor}\"\njetstream {{ {sync} }}\n");
            let server = NatsServer::start_custom("127.0.0.1", parent, Some(&config), &[], TlsMode::Ca(ca)).await?;
            return Ok(Self::Single { server, monitor });
        }
        let options = ClusterOptions {
            size,
            host: "127.0.0.1",
            parent,
            shared_config: None,
            sync_interval: sync_always.then(|| "always".to_owned()),
        };
        Ok(Self::Cluster(NatsCluster::start(&options, ca).await?))
    }

    pub fn urls(&self) -> Vec<String> {
        match self {
            Self::Single { server, .. } => vec![server.url()],
            Self::Cluster(c) => c.urls(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Single { .. } => 1,
            Self::Cluster(c) => c.len(),
        }
    }

    pub fn pid(&self, i: usize) -> Option<u32> {
        match self {
            Self::Single { server, .. } => server.pid(),
            Self::Cluster(c) => c.member(i).pid(),
        }
    }

    pub fn monitor(&self, i: usize) -> u16 {
        match self {
            Self::Single { monitor, .. } => *monitor,
            Self::Cluster(c) => c.monitor_port(i),
        }
    }

    pub fn pids(&self) -> Vec<u32> {
        (0..self.len()).filter_map(|i| self.pid(i)).collect()
    }
}

/// One server's `/varz`: (mem in bytes, cpu %, connections).
pub async fn varz(port: u16) -> Option<(u64, f64, u64)> {
    let body = iot_testkit::http::get_text("127.0.0.1", port, "/varz").await.ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some((v["mem"].as_u64()?, v["cpu"].as_f64()?, v["connections"].as_u64()?))
}

/// `MemAvailable` of the machine, in MiB.
pub fn mem_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / 1024.0 / 1024.0)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub struct Args {
    pub devices: usize,
    pub servers: usize,
    pub replicas: usize,
    pub runs: usize,
    pub per_process: usize,
    pub connect_parallel: usize,
    pub heartbeat_secs: u64,
    pub resync_secs: u64,
    pub settle_ms: u64,
    pub steady_secs: u64,
    pub sync_always: bool,
    pub read_buffer: u16,
    pub min_free_mib: u64,
    pub ping_secs: u64,
}

/// A child process of simulated devices, killed on drop.
struct Agents {
    child: Child,
    range: (usize, usize),
    lines: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
}

impl Drop for Agents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agents {
    fn spawn(urls: &[String], ca: &std::path::Path, from: usize, to: usize, a: &Args) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args([
                "scale-agents",
                "--urls",
                &urls.join(","),
                "--ca",
                &ca.display().to_string(),
                "--from",
                &from.to_string(),
                "--to",
                &to.to_string(),
                "--parallel",
                &a.connect_parallel.to_string(),
                "--heartbeat-secs",
                &a.heartbeat_secs.to_string(),
                "--resync-secs",
                &a.resync_secs.to_string(),
                "--settle-ms",
                &a.settle_ms.to_string(),
                "--read-buffer",
                &a.read_buffer.to_string(),
                "--ping-secs",
                &a.ping_secs.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout of the agents process"))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        Ok(Self {
            child,
            range: (from, to),
            lines: rx,
        })
    }

    /// The next message of kind `kind` from the child, or an error if it died.
    async fn next(&mut self, kind: &str, stop: &AtomicBool, timeout: Duration) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            anyhow::ensure!(!stop.load(Ordering::SeqCst), "stopped: the machine ran low on memory");
            if let Ok(Some(status)) = self.child.try_wait() {
                anyhow::bail!("agents {:?} exited: {status}", self.range);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "agents {:?}: no {kind} within {timeout:?}",
                self.range
            );
            match tokio::time::timeout(Duration::from_millis(200), self.lines.recv()).await {
                Ok(Some(v)) if v.get(kind).is_some() => return Ok(v[kind].clone()),
                Ok(Some(_)) => {}
                Ok(None) => anyhow::bail!("agents {:?} closed their output", self.range),
                Err(_) => {}
            }
        }
    }

    fn rss_kib(&self) -> u64 {
        crate::util::rss_kib(self.child.id()).unwrap_or(0)
    }
}

/// Per-server resources at one moment.
struct ServerSample {
    mem: Vec<u64>,
    cpu_varz: Vec<f64>,
    conns: Vec<u64>,
}

async fn sample_servers(s: &Servers) -> ServerSample {
    let mut out = ServerSample {
        mem: Vec::new(),
        cpu_varz: Vec::new(),
        conns: Vec::new(),
    };
    for i in 0..s.len() {
        let (m, c, n) = varz(s.monitor(i)).await.unwrap_or((0, 0.0, 0));
        out.mem.push(m);
        out.cpu_varz.push(c);
        out.conns.push(n);
    }
    out
}

fn cpu_of(s: &Servers) -> Vec<u64> {
    (0..s.len())
        .map(|i| s.pid(i).and_then(|p| cpu_ticks(p).ok()).unwrap_or(0))
        .collect()
}

fn cpu_pct(before: &[u64], after: &[u64], over: Duration) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| a.saturating_sub(*b) as f64 / over.as_secs_f64())
        .collect()
}

fn join_f(v: &[f64]) -> String {
    v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" / ")
}

fn join_mib(v: &[u64]) -> String {
    v.iter()
        .map(|x| format!("{:.0}", *x as f64 / 1024.0 / 1024.0))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Which devices have reported the watched spec hash Running, and when.
struct Watch {
    hash: std::sync::Mutex<Option<(String, Instant)>>,
    seen: std::sync::Mutex<Vec<Option<Duration>>>,
    count: AtomicUsize,
}

/// `scale-e2e`: the parent.
pub async fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.runs < IMAGES, "at most {} runs", IMAGES - 1);
    let version = Command::new(iot_testkit::paths::find_binary("nats-server", "IOT_NATS_SERVER")?)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let free_at_start = mem_available_mib();
    eprintln!("{version}; free memory {free_at_start} MiB");
    let dir = tempfile::tempdir()?;
    let ca = Ca::create(&dir.path().join("ca"))?;
    let t = Instant::now();
    let servers = Servers::start(a.servers, a.sync_always, &ca, dir.path()).await?;
    eprintln!(
        "{} server(s) healthy after {:.1} s",
        servers.len(),
        t.elapsed().as_secs_f64()
    );
    let urls = servers.urls();
    let admin_opts = ClientOptions::new("bench-admin").tls(NatsTls {
        ca_file: Some(ca.cert_file()),
        required: true,
    });
    let admin = connect_with(
        &urls,
        &Tuned {
            read_buffer: None,
            subscription_capacity: Some(4 << 20),
        },
        &admin_opts,
    )
    .await?;
    let js = jetstream::new(admin.client.clone());
    iot_nats::buckets::ensure_buckets_replicated(&js, a.replicas).await?;
    let (v0, hash0) = payload(0)?;
    put_all(&js, a.devices, &v0, 256).await?;
    let idle = sample_servers(&servers).await;

    // Stop everything when the machine runs low on memory.
    let stop = Arc::new(AtomicBool::new(false));
    let low_mark = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    {
        let (stop, low_mark, min_free) = (stop.clone(), low_mark.clone(), a.min_free_mib);
        tokio::spawn(async move {
            loop {
                let free = mem_available_mib();
                low_mark.fetch_min(free, Ordering::SeqCst);
                if free < min_free && !stop.swap(true, Ordering::SeqCst) {
                    eprintln!("MemAvailable {free} MiB < {min_free} MiB: stopping");
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }

    // Every status report, on one core subscription: first report of the watched
    // hash Running per device.
    let watch = Arc::new(Watch {
        hash: std::sync::Mutex::new(Some((hash0.clone(), Instant::now()))),
        seen: std::sync::Mutex::new(vec![None; a.devices]),
        count: AtomicUsize::new(0),
    });
    let reports = Arc::new(AtomicUsize::new(0));
    {
        let mut sub = admin
            .client
            .subscribe(format!("$KV.{AGENT_STATUS_BUCKET}.status.>"))
            .await?;
        let (watch, reports) = (watch.clone(), reports.clone());
        let dep = DeploymentRef::new("default", "web")?;
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                reports.fetch_add(1, Ordering::Relaxed);
                let Some(i) = msg
                    .subject
                    .as_str()
                    .rsplit_once(".dev")
                    .and_then(|(_, n)| n.parse::<usize>().ok())
                else {
                    continue;
                };
                let Some((hash, t0)) = watch.hash.lock().ok().and_then(|h| h.clone()) else {
                    continue;
                };
                let already = watch
                    .seen
                    .lock()
                    .ok()
                    .and_then(|s| s.get(i).copied())
                    .flatten()
                    .is_some();
                if already || !contains(&msg.payload, hash.as_bytes()) {
                    continue;
                }
                let Ok(status) = serde_json::from_slice::<AgentStatus>(&msg.payload) else {
                    continue;
                };
                let running = status.deployments.get(&dep).is_some_and(|p| {
                    p.phase == Phase::Running && p.spec_hash.as_ref().map(|h| h.as_str()) == Some(&hash)
                });
                if running
                    && let Ok(mut seen) = watch.seen.lock()
                    && let Some(slot) = seen.get_mut(i)
                    && slot.is_none()
                {
                    *slot = Some(t0.elapsed());
                    watch.count.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
    }
    admin.client.flush().await?;

    // The connect storm: every child connects its devices.
    let procs = a.devices.div_ceil(a.per_process);
    let storm = Instant::now();
    let cpu0 = cpu_of(&servers);
    let mut children = Vec::new();
    for p in 0..procs {
        let from = p * a.devices / procs;
        let to = (p + 1) * a.devices / procs;
        children.push(Agents::spawn(&urls, &ca.cert_file(), from, to, &a)?);
    }
    let mut peak_during_storm = sample_servers(&servers).await.mem;
    let mut latencies = Vec::with_capacity(a.devices);
    let mut failed = 0u64;
    let mut result: anyhow::Result<()> = Ok(());
    for c in &mut children {
        let v = loop {
            tokio::select! {
                v = c.next("connected", &stop, Duration::from_secs(1800)) => break v,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {
                    let s = sample_servers(&servers).await;
                    for (p, m) in peak_during_storm.iter_mut().zip(s.mem) { *p = (*p).max(m); }
                    eprintln!("storm: {:.0} s, connections per server {:?}, free {} MiB",
                        storm.elapsed().as_secs_f64(), s.conns, mem_available_mib());
                }
            }
        };
        match v {
            Ok(v) => {
                failed += v["failed"].as_u64().unwrap_or(0);
                if let Some(l) = v["lat_ms"].as_array() {
                    latencies.extend(
                        l.iter()
                            .filter_map(|x| x.as_f64())
                            .map(|ms| Duration::from_secs_f64(ms / 1000.0)),
                    );
                }
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let storm_time = storm.elapsed();
    let storm_cpu = cpu_pct(&cpu0, &cpu_of(&servers), storm_time);
    latencies.sort();
    let after_storm = sample_servers(&servers).await;
    println!(
        "## scale-e2e: {} devices, {} server(s), R{}, sync_interval {}, {procs} agent processes ({version})",
        a.devices,
        servers.len(),
        a.replicas,
        if a.sync_always { "always" } else { "default" }
    );
    println!("| | |\n| --- | --- |");
    println!("| free memory at the start (MemAvailable) | {free_at_start} MiB |");
    println!(
        "| per-server RSS (/varz mem), buckets only | {} MiB |",
        join_mib(&idle.mem)
    );
    println!(
        "| connect storm: devices connected / failed | {} / {failed} |",
        latencies.len()
    );
    println!(
        "| connect storm: all connected after | {} ({:.0} connects/s) |",
        secs(storm_time),
        latencies.len() as f64 / storm_time.as_secs_f64()
    );
    println!(
        "| connect latency p50 / p99 / max | {} / {} / {} |",
        secs(pct(&latencies, 0.5)),
        secs(pct(&latencies, 0.99)),
        secs(pct(&latencies, 1.0))
    );
    println!("| connections per server after the storm | {:?} |", after_storm.conns);
    println!(
        "| per-server RSS after the storm, MiB | {} |",
        join_mib(&after_storm.mem)
    );
    println!(
        "| per-server CPU during the storm, % of a core | {} |",
        join_f(&storm_cpu)
    );
    if let Err(e) = result {
        println!(
            "| **stopped** | {e:#}; lowest MemAvailable {} MiB |",
            low_mark.load(Ordering::SeqCst)
        );
        return finish(children, servers);
    }

    // Every device follows and runs revision 0.
    let t = Instant::now();
    for c in &mut children {
        if let Err(e) = c.next("ready", &stop, Duration::from_secs(1800)).await {
            println!("| **stopped before every device ran revision 0** | {e:#} |");
            return finish(children, servers);
        }
    }
    println!(
        "| every follower synced, every stand-in container running (after the storm) | {} |",
        secs(t.elapsed())
    );

    // Steady state.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let steady = Duration::from_secs(a.steady_secs);
    let c0 = cpu_of(&servers);
    let r0 = reports.load(Ordering::Relaxed);
    tokio::time::sleep(steady).await;
    let steady_cpu = cpu_pct(&c0, &cpu_of(&servers), steady);
    let steady_s = sample_servers(&servers).await;
    let reports_rate = (reports.load(Ordering::Relaxed) - r0) as f64 / steady.as_secs_f64();
    let child_rss: u64 = children.iter().map(Agents::rss_kib).sum();
    println!(
        "| steady state ({} s): per-server RSS (/varz mem), MiB | {} |",
        a.steady_secs,
        join_mib(&steady_s.mem)
    );
    println!(
        "| steady state: per-server CPU (/proc), % of a core | {} |",
        join_f(&steady_cpu)
    );
    println!(
        "| steady state: per-server CPU (/varz cpu), % | {} |",
        join_f(&steady_s.cpu_varz)
    );
    println!(
        "| steady state: nats-server RSS, all servers | {} |",
        mib(steady_s.mem.iter().sum())
    );
    println!(
        "| steady state: status reports per second (heartbeat {} s) | {reports_rate:.0} |",
        a.heartbeat_secs
    );
    println!(
        "| bench agent processes RSS, together ({:.1} KiB per device) | {} |",
        child_rss as f64 / a.devices as f64,
        mib(child_rss * 1024)
    );
    println!(
        "| free memory (MemAvailable) now / lowest | {} / {} MiB |",
        mem_available_mib(),
        low_mark.load(Ordering::SeqCst)
    );

    // Applies.
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let mut maxes = Vec::new();
    let mut puts = Vec::new();
    let mut peak_apply_mem = vec![0u64; servers.len()];
    for run in 1..=a.runs {
        let (value, hash) = payload(run)?;
        if let Ok(mut s) = watch.seen.lock() {
            s.iter_mut().for_each(|x| *x = None);
        }
        watch.count.store(0, Ordering::SeqCst);
        let t0 = Instant::now();
        if let Ok(mut h) = watch.hash.lock() {
            *h = Some((hash, t0));
        }
        let c0 = cpu_of(&servers);
        let put = put_all(&js, a.devices, &value, 256).await?;
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut last_print = Instant::now();
        while watch.count.load(Ordering::SeqCst) < a.devices {
            if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                println!(
                    "| **apply {run} stopped** | {} of {} reported after {}; lowest MemAvailable {} MiB |",
                    watch.count.load(Ordering::SeqCst),
                    a.devices,
                    secs(t0.elapsed()),
                    low_mark.load(Ordering::SeqCst)
                );
                return finish(children, servers);
            }
            if last_print.elapsed() > Duration::from_secs(5) {
                let s = sample_servers(&servers).await;
                for (p, m) in peak_apply_mem.iter_mut().zip(&s.mem) {
                    *p = (*p).max(*m);
                }
                eprintln!(
                    "apply {run}: {} reported after {:.0} s",
                    watch.count.load(Ordering::SeqCst),
                    t0.elapsed().as_secs_f64()
                );
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let all = t0.elapsed();
        let apply_cpu = cpu_pct(&c0, &cpu_of(&servers), all);
        let s = sample_servers(&servers).await;
        for (p, m) in peak_apply_mem.iter_mut().zip(&s.mem) {
            *p = (*p).max(*m);
        }
        let mut lat: Vec<Duration> = watch
            .seen
            .lock()
            .map(|s| s.iter().flatten().copied().collect())
            .unwrap_or_default();
        lat.sort();
        let (p50, p99, max) = (pct(&lat, 0.5), pct(&lat, 0.99), pct(&lat, 1.0));
        println!(
            "| apply {run}: puts acked / p50 / p99 / max (every device reported it Running) | {} / {} / {} / **{}** ; server CPU % {} |",
            secs(put),
            secs(p50),
            secs(p99),
            secs(max),
            join_f(&apply_cpu)
        );
        p50s.push(p50);
        p99s.push(p99);
        maxes.push(max);
        puts.push(put);
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let m = crate::util::median;
    println!(
        "| **apply -> every device reported it Running, median of {} runs: puts / p50 / p99 / max** | {} / {} / {} / **{}** |",
        a.runs,
        secs(m(&mut puts)),
        secs(m(&mut p50s)),
        secs(m(&mut p99s)),
        secs(m(&mut maxes))
    );
    println!(
        "| per-server RSS, peak during the applies, MiB | {} |",
        join_mib(&peak_apply_mem)
    );
    println!(
        "| lowest free memory (MemAvailable) of the run | {} MiB |",
        low_mark.load(Ordering::SeqCst)
    );
    println!(
        "{}",
        json!({"devices": a.devices, "servers": servers.len(), "replicas": a.replicas, "sync_always": a.sync_always,
            "storm_s": storm_time.as_secs_f64(), "p50_s": p50s.iter().map(|d| d.as_secs_f64()).collect::<Vec<_>>(),
            "p99_s": p99s.iter().map(|d| d.as_secs_f64()).collect::<Vec<_>>(),
            "max_s": maxes.iter().map(|d| d.as_secs_f64()).collect::<Vec<_>>(),
            "puts_s": puts.iter().map(|d| d.as_secs_f64()).collect::<Vec<_>>(),
            "steady_mem_mib": steady_s.mem.iter().map(|m| m / 1024 / 1024).collect::<Vec<_>>(),
            "steady_cpu_pct": steady_cpu})
    );
    finish(children, servers)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Stops the children, then the servers, and checks that no server is left.
fn finish(children: Vec<Agents>, servers: Servers) -> anyhow::Result<()> {
    let pids = servers.pids();
    drop(children);
    drop(servers);
    std::thread::sleep(Duration::from_millis(300));
    let left: Vec<u32> = pids
        .into_iter()
        .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
        .collect();
    anyhow::ensure!(left.is_empty(), "nats-server processes left: {left:?}");
    Ok(())
}

pub struct AgentArgs {
    pub urls: Vec<String>,
    pub ca: PathBuf,
    pub from: usize,
    pub to: usize,
    pub parallel: usize,
    pub heartbeat_secs: u64,
    pub resync_secs: u64,
    pub settle_ms: u64,
    pub read_buffer: u16,
    pub ping_secs: u64,
}

fn emit(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// `scale-agents`: devices `from..to`, each on its own connection, running the
/// follower, reconciler and reporter, until stdin closes.
pub async fn agents(a: AgentArgs) -> anyhow::Result<()> {
    let creds = Arc::new(Tuned {
        read_buffer: Some(a.read_buffer),
        subscription_capacity: None,
    });
    let images: Vec<String> = (0..IMAGES).map(image).collect();
    let metrics = Arc::new(AgentMetrics::default());
    let cfg = FollowConfig {
        resync: Duration::from_secs(a.resync_secs),
        ..Default::default()
    };
    let (heartbeat, resync, settle) = (
        Duration::from_secs(a.heartbeat_secs),
        Duration::from_secs(a.resync_secs),
        Duration::from_millis(a.settle_ms),
    );
    // Each device starts its agent as soon as it is connected, as a real agent
    // does (so the first reads and reports spread over the storm).
    let start_agent =
        |i: usize, conn: &NatsConnection| -> anyhow::Result<(watch::Receiver<DesiredView>, MemoryRuntime)> {
            let id = Id::new(format!("dev{i}"))?;
            let (tx, rx) = watch::channel(DesiredView::default());
            tokio::spawn(follow_desired_state(conn.clone(), id.clone(), cfg.clone(), tx));
            let (report_tx, report_rx) = watch::channel(Report::default());
            let (published_tx, published_rx) = watch::channel(0u64);
            let reporter = StatusReporter {
                js: jetstream::new(conn.client.clone()),
                via_relay: false,
                device: id.clone(),
                heartbeat,
                inventory_refresh: Duration::from_secs(300),
                publish_timeout: Duration::from_secs(5),
                min_gap: Duration::from_millis(500),
                published: published_tx,
                metrics: metrics.clone(),
            };
            tokio::spawn(reporter.run(report_rx));
            // One runtime per device, as every device has its own podman: a shared one
            // would list every device's containers on every pass (quadratic).
            let image_refs: Vec<&str> = images.iter().map(String::as_str).collect();
            let runtime = MemoryRuntime::with_images(&image_refs);
            let rec = Reconciler::new(
                runtime.clone(),
                ReconcilerConfig {
                    device: id,
                    event_capacity: harmony_reconciler_contracts::status::DEFAULT_EVENT_RING_CAPACITY,
                    settle,
                    runtime_name: "memory".into(),
                },
                report_tx,
            )
            .with_published(published_rx)
            .with_metrics(metrics.clone());
            let (_, events) = tokio::sync::mpsc::channel(1);
            tokio::spawn(reconcile_loop(rec, rx.clone(), events, resync, None));
            Ok((rx, runtime))
        };
    let start_agent = &start_agent;
    let ping = Duration::from_secs(a.ping_secs);
    let storm = Instant::now();
    type Started = (NatsConnection, watch::Receiver<DesiredView>, MemoryRuntime);
    let results: Vec<(usize, Duration, anyhow::Result<Started>)> = futures::stream::iter(a.from..a.to)
        .map(|i| {
            let (urls, ca, creds) = (a.urls.clone(), a.ca.clone(), creds.clone());
            async move {
                let t = Instant::now();
                let dev = format!("dev{i}");
                let mut last = anyhow::anyhow!("not tried");
                for _ in 0..20 {
                    let mut opts = ClientOptions::new(format!("iot-agent-{dev}"))
                        .ping_interval(ping)
                        .tls(NatsTls {
                            ca_file: Some(ca.clone()),
                            required: true,
                        });
                    if let Ok(id) = Id::new(dev.as_str()) {
                        opts = opts.inbox_prefix(harmony_reconciler_contracts::read::device_inbox_prefix(&id));
                    }
                    match connect_with(&urls, creds.as_ref(), &opts).await {
                        Ok(c) => {
                            let took = t.elapsed();
                            let started = start_agent(i, &c).map(|(v, r)| (c, v, r));
                            return (i, took, started);
                        }
                        Err(e) => last = e.into(),
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                (i, t.elapsed(), Err(last))
            }
        })
        .buffer_unordered(a.parallel)
        .collect()
        .await;
    let mut lat = Vec::new();
    let mut conns = Vec::new();
    let mut views = Vec::new();
    let mut runtimes = Vec::new();
    let mut failed = 0;
    for (i, d, r) in results {
        match r {
            Ok((c, v, rt)) => {
                lat.push((d.as_secs_f64() * 1000.0 * 10.0).round() / 10.0);
                conns.push(c);
                views.push(v);
                runtimes.push(rt);
            }
            Err(e) => {
                if failed < 3 {
                    eprintln!("dev{i}: {e:#}");
                }
                failed += 1;
            }
        }
    }
    emit(
        json!({"connected": {"secs": storm.elapsed().as_secs_f64(), "failed": failed, "lat_ms": lat, "at_ms": unix_ms()}}),
    );

    let t = Instant::now();
    loop {
        let synced = views
            .iter()
            .filter(|v| v.borrow().synced && v.borrow().entries.len() == 1)
            .count();
        let running = runtimes.iter().filter(|r| r.containers().len() == 1).count();
        if synced == views.len() && running == views.len() {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            eprintln!(
                "agents {}..{}: {synced} synced, {running} running after 600 s",
                a.from, a.to
            );
            break;
        }
        if t.elapsed().as_secs().is_multiple_of(30) && t.elapsed().subsec_millis() < 200 {
            eprintln!("agents {}..{}: {synced} synced, {running} running", a.from, a.to);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    emit(json!({"ready": t.elapsed().as_secs_f64()}));
    // Until the parent closes our stdin.
    tokio::task::spawn_blocking(|| {
        let mut buf = String::new();
        while std::io::stdin().read_line(&mut buf).map(|n| n > 0).unwrap_or(false) {
            buf.clear();
        }
    })
    .await?;
    drop(conns);
    Ok(())
}
