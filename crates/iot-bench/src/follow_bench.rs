//! N simulated devices following their desired state with the real follow and
//! reconcile code (podman replaced by the in-memory runtime), on one real
//! nats-server. Reports server RSS, JetStream consumers, and how long one change
//! per device takes to reach every follower.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use harmony_reconciler_contracts::*;
use iot_agent::agent::reconcile_loop;
use iot_agent::memory_runtime::MemoryRuntime;
use iot_agent::plan::service_hash;
use iot_agent::reconciler::{Reconciler, ReconcilerConfig, Report};
use iot_nats::follow::FollowConfig;
use iot_nats::{Anonymous, DesiredView, connect, follow_desired_state};
use iot_testkit::NatsServer;
use tokio::sync::watch;

use crate::util::{consumer_count, rss_kib, self_rss_kib};

fn payload(image: &str) -> (Bytes, String) {
    let score: IotScore =
        serde_json::from_value(serde_json::json!({"PodmanV0": {"services": [{"name": "web", "image": image}]}}))
            .unwrap_or_else(|e| panic!("score: {e}"));
    let IotScore::PodmanV0(p) = &score;
    let hash = service_hash(&p.services[0]).to_string();
    let dep = DeploymentRef::new("default", "web").unwrap_or_else(|e| panic!("{e}"));
    (Bytes::from(DesiredState::new(dep, score).to_bytes()), hash)
}

async fn put_all(js: &jetstream::Context, n: usize, value: &Bytes) -> anyhow::Result<Duration> {
    // async-nats bounds in-flight acks per context, so await them in windows.
    let t = Instant::now();
    let mut acks = Vec::with_capacity(256);
    for i in 0..n {
        let subject = format!("$KV.{DESIRED_STATE_BUCKET}.dev{i}.default_web");
        acks.push(js.publish(subject, value.clone()).await?);
        if acks.len() == 256 {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks {
        ack.await?;
    }
    Ok(t.elapsed())
}

pub async fn run(devices: usize, connections: usize, resync_secs: u64, spread_secs: f64) -> anyhow::Result<()> {
    let monitor_port = iot_testkit::free_port()?;
    let monitor_arg = monitor_port.to_string();
    let mut nats = NatsServer::start_with_args(&["-m", &monitor_arg]).await?;
    let nats_pid = nats.pid().ok_or_else(|| anyhow::anyhow!("no nats pid"))?;
    let admin = connect(&[nats.url()], &Anonymous, "admin", nats.ca_file()).await?;
    let js = jetstream::new(admin.client.clone());
    iot_nats::buckets::ensure_buckets(&js).await?;
    let (v1, _) = payload("img:1");
    let (v2, hash2) = payload("img:2");
    put_all(&js, devices, &v1).await?;
    let rss_before = rss_kib(nats_pid)?;

    let mut conns = Vec::new();
    for c in 0..connections {
        conns.push(connect(&[nats.url()], &Anonymous, &format!("sim{c}"), nats.ca_file()).await?);
    }
    let runtime = MemoryRuntime::with_images(&["img:1", "img:2"]);
    let mut views = Vec::with_capacity(devices);
    let setup = Instant::now();
    let cfg = FollowConfig {
        resync: Duration::from_secs(resync_secs),
        read_timeout: Duration::from_secs(30),
        reconnect_read_spread: Duration::from_secs_f64(spread_secs),
        ..Default::default()
    };
    for i in 0..devices {
        let id = Id::new(format!("dev{i}"))?;
        let (tx, rx) = watch::channel(DesiredView::default());
        tokio::spawn(follow_desired_state(
            conns[i % connections].clone(),
            id.clone(),
            cfg.clone(),
            tx,
        ));
        let (report_tx, _report_rx) = watch::channel(Report::default());
        let config = ReconcilerConfig {
            device: id,
            event_capacity: 8,
            settle: Duration::ZERO,
            runtime_name: "memory".into(),
        };
        let rec = Reconciler::new(runtime.clone(), config, report_tx);
        // No runtime events in the memory runtime: the sender is dropped at once.
        let (_, events) = tokio::sync::mpsc::channel(1);
        tokio::spawn(reconcile_loop(
            rec,
            rx.clone(),
            events,
            Duration::from_secs(resync_secs),
            None,
        ));
        views.push(rx);
    }
    wait_all(&views, |v| v.synced && v.entries.len() == 1, Duration::from_secs(300)).await?;
    let setup_time = setup.elapsed();
    wait_containers(&runtime, devices, None, Duration::from_secs(300)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(nats_pid)?;
    let consumers = consumer_count(&js, DESIRED_STATE_BUCKET).await?;

    // One change per device, as a fan-out from the operator would write.
    let t = Instant::now();
    let publish = put_all(&js, devices, &v2).await?;
    wait_all(
        &views,
        |v| v.entries.values().all(|b| *b == v2),
        Duration::from_secs(300),
    )
    .await?;
    let reached = t.elapsed();
    wait_containers(&runtime, devices, Some(&hash2), Duration::from_secs(300)).await?;
    let reconciled = t.elapsed();

    // Steady state: the periodic full re-reads are the only load left.
    let cpu0 = cpu_ticks(nats_pid)?;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let cpu_pct = (cpu_ticks(nats_pid)? - cpu0) as f64 / 100.0 / 30.0 * 100.0;

    println!("| devices | {devices} (on {connections} client connections, resync every {resync_secs} s) |");
    println!(
        "| follower setup (subscribe + first full read, all devices) | {:.2} s |",
        setup_time.as_secs_f64()
    );
    println!(
        "| nats-server RSS with the bucket, before followers | {:.1} MiB |",
        rss_before as f64 / 1024.0
    );
    println!(
        "| nats-server RSS with all followers | {:.1} MiB |",
        rss_after as f64 / 1024.0
    );
    println!("| JetStream consumers on desired-state | {consumers} |");
    println!(
        "| publish {devices} changes (one per device, acked) | {:.2} s |",
        publish.as_secs_f64()
    );
    println!(
        "| change reached every follower (from first publish) | {:.2} s |",
        reached.as_secs_f64()
    );
    println!(
        "| every stand-in container upgraded (from first publish) | {:.2} s |",
        reconciled.as_secs_f64()
    );
    println!(
        "| bench process RSS (all simulated agents) | {:.1} MiB |",
        self_rss_kib()? as f64 / 1024.0
    );
    println!("| nats-server CPU in steady state (periodic re-reads only) | {cpu_pct:.1} % of one core |");

    // The reconnect herd: the server restarts and every follower re-reads.
    let steady = sample_rates(monitor_port, Duration::from_secs(10)).await?;
    nats.restart().await?;
    let after = sample_rates(monitor_port, Duration::from_secs(20)).await?;
    let total_after: u64 = after.iter().sum();
    println!(
        "| messages into nats-server per second, steady state: peak (median) | {} ({}) |",
        steady.iter().max().copied().unwrap_or(0),
        median(&steady)
    );
    println!(
        "| same, in the 20 s after a server restart (read spread {spread_secs} s): peak | {} |",
        after.iter().max().copied().unwrap_or(0)
    );
    println!("| messages in the 20 s after the restart (re-reads + resyncs) | {total_after} |");
    Ok(())
}

/// Messages the server received in each whole second of `window`, read from its
/// monitoring endpoint (`/varz` `in_msgs`). Here every message is a follower's
/// direct-get request, bar a handful.
async fn sample_rates(monitor_port: u16, window: Duration) -> anyhow::Result<Vec<u64>> {
    async fn in_msgs(port: u16) -> Option<u64> {
        let body = iot_testkit::http::get_text("127.0.0.1", port, "/varz").await.ok()?;
        serde_json::from_str::<serde_json::Value>(&body).ok()?["in_msgs"].as_u64()
    }
    let start = Instant::now();
    let mut last: Option<u64> = None;
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while start.elapsed() < window {
        tick.tick().await;
        // While the server restarts, /varz does not answer; the counter starts at 0.
        let Some(now) = in_msgs(monitor_port).await else {
            last = None;
            continue;
        };
        if let Some(prev) = last {
            out.push(now.saturating_sub(prev));
        } else if start.elapsed() > Duration::from_millis(1500) {
            out.push(now);
        }
        last = Some(now);
    }
    Ok(out)
}

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

async fn wait_all(
    views: &[watch::Receiver<DesiredView>],
    pred: impl Fn(&DesiredView) -> bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let pending = views.iter().filter(|v| !pred(&v.borrow())).count();
        if pending == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{pending} followers did not get there in {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_containers(
    rt: &MemoryRuntime,
    devices: usize,
    hash: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let c = rt.containers();
        let ok = c.iter().filter(|c| hash.is_none_or(|h| c.service_hash == h)).count();
        if ok == devices && c.len() == devices {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "only {ok}/{devices} containers converged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// utime + stime of a process, in clock ticks (100 per second on Linux).
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Ok(get(11) + get(12))
}
