//! What closing the trust holes costs, measured where it hurts (BENCHMARKS.md,
//! "Trust nothing on the wire"):
//!
//! - `signal-follow`: a change to every one of N devices, from the first put until
//!   every device holds the new value. Today's path before the change (a device
//!   applied the body of the message its core subscription delivered) against the
//!   signal-then-read path (the message is a signal; the device reads its keys
//!   through the read responder, and applies only what the stream returned), on the
//!   same connections, server and bucket, alternating rounds. The responder runs in
//!   a process of its own, so its CPU is its own.
//! - `relay-flood`: 1,000 devices write their status through the relay once a
//!   second; the relay latency they see, with no flood and then while one device
//!   floods 250 KB statuses as fast as its connection takes them.
//!
//! Every connection is TLS, verified against the server's CA, as in production.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::{ConnectOptions, Event};
use bytes::Bytes;
use futures::StreamExt;
use harmony_reconciler_contracts::read::device_inbox_prefix;
use harmony_reconciler_contracts::{DESIRED_STATE_BUCKET, DeploymentRef, Id};
use iot_kv::follow::{FollowConfig, ReadPath};
use iot_kv::{DesiredView, NatsConnection, follow_desired_state};
use iot_testkit::{LoggedProcess, NatsServer};
use tokio::sync::watch;

use crate::follow_bench::cpu_ticks;
use crate::util::rss_kib;

/// A device's connection (its own inbox prefix, as the responder checks), TLS.
async fn device_connection(nats: &NatsServer, device: &Id) -> anyhow::Result<NatsConnection> {
    let (tx, rx) = watch::channel(0u64);
    let tx = Arc::new(tx);
    let opts = ConnectOptions::new()
        .custom_inbox_prefix(device_inbox_prefix(device))
        .max_reconnects(None)
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                if matches!(e, Event::Connected) {
                    tx.send_modify(|n| *n += 1);
                }
            }
        });
    let client = nats.client_with(opts).await?;
    Ok(NatsConnection { client, connects: rx })
}

async fn connect_all(nats: &NatsServer, ids: &[Id]) -> anyhow::Result<Vec<NatsConnection>> {
    let conns: Vec<anyhow::Result<NatsConnection>> = futures::stream::iter(ids.iter())
        .map(|id| device_connection(nats, id))
        .buffered(64)
        .collect()
        .await;
    conns.into_iter().collect()
}

/// Runs one of the operator's services in a process of its own (`iot-bench
/// serve ...`), against `nats`.
fn spawn_service(nats: &NatsServer, service: &str, dir: &std::path::Path) -> anyhow::Result<LoggedProcess> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("serve").arg(service).env("RUST_LOG", "warn");
    nats.configure_client(&mut cmd);
    LoggedProcess::spawn(service, cmd, dir.join(format!("{service}.log")))
}

/// `iot-bench serve read|relay`: one operator service, until killed.
pub async fn serve(service: &str) -> anyhow::Result<()> {
    let url = std::env::var("NATS_URL")?;
    let ca = std::env::var_os("NATS_CA_FILE").map(std::path::PathBuf::from);
    let conn = iot_kv::connect(&[url], &iot_kv::Anonymous, "operator-service", ca.as_deref()).await?;
    let counts = iot_kv::device_service::no_counts();
    match service {
        "read" => iot_kv::desired_read::serve_desired_reads(conn.client, Duration::from_secs(30), counts).await?,
        "relay" => iot_kv::status_relay::serve_status_writes(conn.client, Duration::from_secs(30), counts).await?,
        other => anyhow::bail!("no service {other}"),
    }
    Ok(())
}

fn value(round: usize) -> Bytes {
    let score = serde_json::json!({"format": 1, "deployment": "default/web",
        "score": {"PodmanV0": {"services": [{"name": "web", "image": format!("img:{round}")}]}}});
    Bytes::from(score.to_string())
}

/// One change per device, as the operator's fan-out writes it (pipelined, acked).
async fn put_round(js: &async_nats::jetstream::Context, devices: usize, v: &Bytes) -> anyhow::Result<()> {
    let ops: Vec<iot_kv::KvOp> = (0..devices)
        .map(|i| iot_kv::KvOp::Put {
            key: format!("dev{i}.default_web"),
            value: v.clone(),
        })
        .collect();
    let (n, err) = iot_kv::write_batch(js, DESIRED_STATE_BUCKET, &ops, 512).await;
    anyhow::ensure!(err.is_none() && n == devices, "put failed: {err:?}");
    Ok(())
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

pub async fn signal_follow(devices: usize, rounds: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let nats = NatsServer::start().await?;
    let admin = iot_kv::connect(&[nats.url()], &iot_kv::Anonymous, "admin", nats.ca_file()).await?;
    let js = async_nats::jetstream::new(admin.client.clone());
    iot_kv::buckets::ensure_buckets(&js).await?;
    put_round(&js, devices, &value(0)).await?;
    let responder = spawn_service(&nats, "read", dir.path())?;
    let responder_pid = responder.pid().ok_or_else(|| anyhow::anyhow!("no responder pid"))?;
    let ids: Vec<Id> = (0..devices)
        .map(|i| Id::new(format!("dev{i}")))
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    let conns = connect_all(&nats, &ids).await?;
    eprintln!("{devices} TLS connections in {:.1} s", t.elapsed().as_secs_f64());

    // Today's path before the change: the body of the delivered message is the value.
    let received = Arc::new(AtomicU64::new(0));
    let expected = Arc::new(std::sync::Mutex::new(Bytes::new()));
    for (c, id) in conns.iter().zip(&ids) {
        let mut sub = c.client.subscribe(format!("$KV.{DESIRED_STATE_BUCKET}.{id}.>")).await?;
        let (received, expected) = (received.clone(), expected.clone());
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let want = expected
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                if m.payload == want {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    // The signal-then-read path: the real follower, reading through the responder.
    let cfg = FollowConfig {
        resync: Duration::from_secs(3600),
        read_timeout: Duration::from_secs(30),
        read_path: ReadPath::Responder,
        ..Default::default()
    };
    let dep = DeploymentRef::new("default", "web")?;
    let mut views = Vec::with_capacity(devices);
    for (c, id) in conns.iter().zip(&ids) {
        let (tx, rx) = watch::channel(DesiredView::default());
        tokio::spawn(follow_desired_state(c.clone(), id.clone(), cfg.clone(), tx));
        views.push(rx);
    }
    let t = Instant::now();
    wait_views(&views, &dep, &value(0), Duration::from_secs(600)).await?;
    eprintln!(
        "first reads of {devices} devices through the responder: {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let mut raw = Vec::new();
    let mut signal = Vec::new();
    let mut responder_cpu = Vec::new();
    for round in 1..=rounds {
        let v = value(round);
        // Both paths see every round; each is timed from the same first put.
        *expected.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = v.clone();
        received.store(0, Ordering::Relaxed);
        let cpu0 = cpu_ticks(responder_pid)?;
        let t = Instant::now();
        put_round(&js, devices, &v).await?;
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut raw_done = None;
        let mut signal_done = None;
        while raw_done.is_none() || signal_done.is_none() {
            anyhow::ensure!(Instant::now() < deadline, "round {round} did not finish");
            if raw_done.is_none() && received.load(Ordering::Relaxed) as usize >= devices {
                raw_done = Some(t.elapsed());
            }
            if signal_done.is_none() && all_have(&views, &dep, &v) {
                signal_done = Some(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let secs = (cpu_ticks(responder_pid)? - cpu0) as f64 / 100.0;
        let (r, s) = (raw_done.unwrap_or_default(), signal_done.unwrap_or_default());
        eprintln!(
            "round {round}: message bodies {:.2} s, signal-then-read {:.2} s, responder {secs:.2} CPU s",
            r.as_secs_f64(),
            s.as_secs_f64()
        );
        raw.push(r);
        signal.push(s);
        responder_cpu.push(secs);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    responder_cpu.sort_by(f64::total_cmp);
    let (r, s) = (median(&mut raw), median(&mut signal));
    println!("| {devices} devices, one change each ({rounds} rounds, median) | |");
    println!("| --- | --- |");
    println!(
        "| today's path before the change: message body applied | {:.2} s |",
        r.as_secs_f64()
    );
    println!(
        "| signal, then a read through the responder | {:.2} s |",
        s.as_secs_f64()
    );
    println!("| ratio | {:.2}x |", s.as_secs_f64() / r.as_secs_f64().max(0.001));
    println!(
        "| responder CPU per round (its own process) | {:.2} s ({:.0} us per device) |",
        responder_cpu[responder_cpu.len() / 2],
        responder_cpu[responder_cpu.len() / 2] * 1e6 / devices as f64
    );
    println!("| responder RSS | {:.1} MiB |", rss_kib(responder_pid)? as f64 / 1024.0);
    drop(responder);
    Ok(())
}

fn all_have(views: &[watch::Receiver<DesiredView>], dep: &DeploymentRef, v: &Bytes) -> bool {
    views.iter().all(|rx| rx.borrow().entries.get(dep) == Some(v))
}

async fn wait_views(
    views: &[watch::Receiver<DesiredView>],
    dep: &DeploymentRef,
    v: &Bytes,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !all_have(views, dep, v) {
        anyhow::ensure!(Instant::now() < deadline, "followers did not get there in {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Relay latencies of `devices` devices writing once a second for `window`.
async fn heartbeats(conns: &[NatsConnection], ids: &[Id], window: Duration) -> Vec<Duration> {
    let status = Bytes::from(vec![b'x'; 2048]);
    let tasks: Vec<_> = conns
        .iter()
        .zip(ids)
        .enumerate()
        .map(|(i, (c, id))| {
            let (client, id, status) = (c.client.clone(), id.clone(), status.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                // Spread over the second, as a fleet's heartbeats are.
                tokio::time::sleep(Duration::from_millis((i as u64 * 997) % 1000)).await;
                let end = Instant::now() + window;
                while Instant::now() < end {
                    let t = Instant::now();
                    match iot_kv::status_relay::write_via_relay(&client, &id, status.clone(), Duration::from_secs(10))
                        .await
                    {
                        Ok(_) => out.push(t.elapsed()),
                        Err(_) => out.push(Duration::from_secs(10)),
                    }
                    tokio::time::sleep(Duration::from_secs(1).saturating_sub(t.elapsed())).await;
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all.sort();
    all
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub async fn relay_flood(devices: usize, window_secs: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let nats = NatsServer::start().await?;
    let admin = iot_kv::connect(&[nats.url()], &iot_kv::Anonymous, "admin", nats.ca_file()).await?;
    let js = async_nats::jetstream::new(admin.client.clone());
    iot_kv::buckets::ensure_buckets(&js).await?;
    let relay = spawn_service(&nats, "relay", dir.path())?;
    let relay_pid = relay.pid().ok_or_else(|| anyhow::anyhow!("no relay pid"))?;
    let ids: Vec<Id> = (0..devices)
        .map(|i| Id::new(format!("dev{i}")))
        .collect::<Result<_, _>>()?;
    let conns = connect_all(&nats, &ids).await?;
    let window = Duration::from_secs(window_secs);
    // Warm up (first writes create the keys).
    heartbeats(&conns, &ids, Duration::from_secs(3)).await;

    let quiet = heartbeats(&conns, &ids, window).await;

    let flooder_id = Id::new("flooder")?;
    let flooder = device_connection(&nats, &flooder_id).await?;
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let (client, sent, stop) = (flooder.client.clone(), sent.clone(), stop.clone());
        let subject = harmony_reconciler_contracts::read::status_write_subject(&flooder_id);
        let body = Bytes::from(vec![b'f'; 250 * 1024]);
        tokio::spawn(async move {
            // Fire and forget: a misbehaving device does not wait for answers.
            let inbox = client.new_inbox();
            while !stop.load(Ordering::Relaxed) {
                if client
                    .publish_with_reply(subject.clone(), inbox.clone(), body.clone())
                    .await
                    .is_err()
                {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let cpu0 = cpu_ticks(relay_pid)?;
    let flooded = heartbeats(&conns, &ids, window).await;
    let relay_cpu = (cpu_ticks(relay_pid)? - cpu0) as f64 / 100.0 / window.as_secs_f64() * 100.0;
    stop.store(true, Ordering::Relaxed);
    let _ = flood.await;
    let flood_rate = sent.load(Ordering::Relaxed) as f64 / window.as_secs_f64();

    let failed = |v: &[Duration]| v.iter().filter(|d| **d >= Duration::from_secs(10)).count();
    println!(
        "| {devices} devices writing status once a second ({window_secs} s each) | no flood | one device floods | ratio |"
    );
    println!("| --- | --- | --- | --- |");
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let (a, b) = (pct(&quiet, p), pct(&flooded, p));
        println!(
            "| relay latency {name} | {:.1} ms | {:.1} ms | {:.2}x |",
            a.as_secs_f64() * 1000.0,
            b.as_secs_f64() * 1000.0,
            b.as_secs_f64() / a.as_secs_f64().max(1e-6)
        );
    }
    println!(
        "| writes (failed or over 10 s) | {} ({}) | {} ({}) | |",
        quiet.len(),
        failed(&quiet),
        flooded.len(),
        failed(&flooded)
    );
    println!(
        "| flood: 250 KB statuses sent per second | | {flood_rate:.0} ({:.0} MB/s) | |",
        flood_rate * 0.25
    );
    println!("| relay CPU while flooded | | {relay_cpu:.0} % of a core | |");
    drop(relay);
    Ok(())
}
