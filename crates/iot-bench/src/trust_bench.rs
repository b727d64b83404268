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
//!   second; the relay latency they see in quiet windows and in windows while one
//!   device floods 250 KB statuses (at a given rate, or as fast as its connection
//!   takes them), taking turns. Once against the relay before issue 20 (one permit
//!   pool shared by all devices), once against the fair relay, each in a process of
//!   its own.
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
use iot_nats::follow::{FollowConfig, ReadPath};
use iot_nats::{DesiredView, NatsConnection, follow_desired_state};
use iot_testkit::{LoggedProcess, NatsServer};
use tokio::sync::watch;

use crate::follow_bench::cpu_ticks;
use crate::util::{median, rss_kib};

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
    let conn = iot_nats::connect(&[url], &iot_nats::Anonymous, "operator-service", ca.as_deref()).await?;
    let counts = iot_operator::device_services::no_counts();
    match service {
        // As the operator runs it: from its index of the bucket once caught up.
        "read" => {
            let js = async_nats::jetstream::new(conn.client.clone());
            let store = js
                .get_key_value(harmony_reconciler_contracts::DESIRED_STATE_BUCKET)
                .await?;
            let index = Arc::new(iot_operator::desired_index::DesiredIndex::default());
            let follower = index.clone();
            tokio::spawn(async move { follower.run(store, None).await });
            let source: Arc<dyn iot_operator::device_services::desired_read::DesiredSource> = index;
            iot_operator::device_services::desired_read::serve_desired_reads(
                conn.client,
                Duration::from_secs(30),
                Some(source),
                counts,
            )
            .await?
        }
        // Every read a batched direct get of the stream.
        "read-stream" => {
            iot_operator::device_services::desired_read::serve_desired_reads(
                conn.client,
                Duration::from_secs(30),
                None,
                counts,
            )
            .await?
        }
        "relay" => {
            iot_operator::device_services::status_relay::serve_status_writes(
                conn.client,
                Duration::from_secs(30),
                counts,
            )
            .await?
        }
        "relay-shared-pool" => shared_pool_relay(conn.client).await?,
        other => anyhow::bail!("no service {other}"),
    }
    Ok(())
}

/// The relay as it was before this change, for the comparison: one pool of 256
/// permits shared by every device, taken inside the receive loop (so a device
/// that floods holds permits, and the loop itself waits for them).
async fn shared_pool_relay(client: async_nats::Client) -> anyhow::Result<()> {
    use harmony_reconciler_contracts::read::{
        STATUS_WRITE_PREFIX, STATUS_WRITE_QUEUE, StatusWriteAnswer, device_of_status_subject, is_device_inbox,
    };
    let mut sub = client
        .queue_subscribe(format!("{STATUS_WRITE_PREFIX}.*"), STATUS_WRITE_QUEUE.to_owned())
        .await?;
    let js = async_nats::jetstream::new(client.clone());
    let limit = Arc::new(tokio::sync::Semaphore::new(256));
    while let Some(msg) = sub.next().await {
        let Some(reply) = msg.reply.clone() else { continue };
        let Some(device) = device_of_status_subject(&msg.subject) else {
            continue;
        };
        if !is_device_inbox(&device, &reply) {
            continue;
        }
        let permit = limit.clone().acquire_owned().await?;
        let (client, js) = (client.clone(), js.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let subject = format!(
                "$KV.{}.{}",
                harmony_reconciler_contracts::AGENT_STATUS_BUCKET,
                harmony_reconciler_contracts::agent_status_key(&device)
            );
            let answer = match js.publish(subject, msg.payload).await {
                Ok(ack) => match ack.await {
                    Ok(a) => StatusWriteAnswer {
                        sequence: a.sequence,
                        error: None,
                    },
                    Err(e) => StatusWriteAnswer {
                        sequence: 0,
                        error: Some(e.to_string()),
                    },
                },
                Err(e) => StatusWriteAnswer {
                    sequence: 0,
                    error: Some(e.to_string()),
                },
            };
            let _ = client
                .publish(reply, serde_json::to_vec(&answer).unwrap_or_default().into())
                .await;
        });
    }
    Ok(())
}

/// `iot-bench flood`: as device `flooder`, sends 250 KB statuses without waiting
/// for answers, at `mbps` megabits a second (0: as fast as the connection takes
/// them), until killed.
pub async fn flood(mbps: f64) -> anyhow::Result<()> {
    let url = std::env::var("NATS_URL")?;
    let ca = std::env::var_os("NATS_CA_FILE").map(std::path::PathBuf::from);
    let id = Id::new("flooder")?;
    let opts = iot_nats::ClientOptions::new("flooder")
        .tls(iot_nats::NatsTls {
            ca_file: ca,
            required: true,
        })
        .inbox_prefix(device_inbox_prefix(&id));
    let client = iot_nats::connect_with(&[url], &iot_nats::Anonymous, &opts)
        .await?
        .client;
    let subject = harmony_reconciler_contracts::read::status_write_subject(&id);
    let body = Bytes::from(vec![b'f'; 250 * 1024]);
    let inbox = client.new_inbox();
    let interval = (mbps > 0.0).then(|| Duration::from_secs_f64(body.len() as f64 * 8.0 / (mbps * 1e6)));
    let start = Instant::now();
    let mut sent: u64 = 0;
    loop {
        client
            .publish_with_reply(subject.clone(), inbox.clone(), body.clone())
            .await?;
        sent += 1;
        if let Some(every) = interval {
            let due = start + every * u32::try_from(sent).unwrap_or(u32::MAX);
            tokio::time::sleep_until(due.into()).await;
        }
        if sent.is_multiple_of(100) {
            eprintln!("flooder: {sent} sent in {:.1} s", start.elapsed().as_secs_f64());
        }
    }
}

fn value(round: usize) -> Bytes {
    let score = serde_json::json!({"format": 1, "deployment": "default/web",
        "score": {"PodmanV0": {"services": [{"name": "web", "image": format!("img:{round}")}]}}});
    Bytes::from(score.to_string())
}

/// One change per device, as the operator's fan-out writes it (pipelined, acked).
async fn put_round(js: &async_nats::jetstream::Context, devices: usize, v: &Bytes) -> anyhow::Result<()> {
    let ops: Vec<iot_nats::KvOp> = (0..devices)
        .map(|i| iot_nats::KvOp::Put {
            key: format!("dev{i}.default_web"),
            value: v.clone(),
        })
        .collect();
    let (n, err) = iot_nats::write_batch(js, DESIRED_STATE_BUCKET, &ops, 512).await;
    anyhow::ensure!(err.is_none() && n == devices, "put failed: {err:?}");
    Ok(())
}

pub async fn signal_follow(devices: usize, rounds: usize, responder: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let nats = NatsServer::start().await?;
    let admin = iot_nats::connect(&[nats.url()], &iot_nats::Anonymous, "admin", nats.ca_file()).await?;
    let js = async_nats::jetstream::new(admin.client.clone());
    iot_nats::buckets::ensure_buckets(&js).await?;
    put_round(&js, devices, &value(0)).await?;
    let service = match responder {
        "index" => "read",
        "stream" => "read-stream",
        other => anyhow::bail!("--responder {other}: index or stream"),
    };
    let responder_kind = responder;
    let responder = spawn_service(&nats, service, dir.path())?;
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
    println!(
        "| {devices} devices, one change each ({rounds} rounds, median; responder reads from the {responder_kind}) | |"
    );
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
                    match iot_nats::status_relay::write_via_relay(&client, &id, status.clone(), Duration::from_secs(10))
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

/// Per-window latency percentiles of one relay, quiet and flooded windows taking
/// turns so that drift on a noisy machine falls on both alike.
struct FloodRun {
    quiet: Vec<(Duration, Duration)>,
    flooded: Vec<(Duration, Duration)>,
    /// Writes (quiet, flooded), and how many of them failed or took 10 s.
    writes: (usize, usize),
    failed: (usize, usize),
    flood_msgs: f64,
    relay_cpu_pct: f64,
}

fn p50_p99(v: &[Duration]) -> (Duration, Duration) {
    (pct(v, 0.5), pct(v, 0.99))
}

#[allow(clippy::too_many_arguments)]
async fn flood_run(
    nats: &NatsServer,
    relay: &str,
    conns: &[NatsConnection],
    ids: &[Id],
    window: Duration,
    rounds: usize,
    mbps: f64,
    dir: &std::path::Path,
) -> anyhow::Result<FloodRun> {
    let relay = spawn_service(nats, relay, dir)?;
    let relay_pid = relay.pid().ok_or_else(|| anyhow::anyhow!("no relay pid"))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    heartbeats(conns, ids, Duration::from_secs(3)).await;
    let failed = |v: &[Duration]| v.iter().filter(|d| **d >= Duration::from_secs(10)).count();
    let mut run = FloodRun {
        quiet: Vec::new(),
        flooded: Vec::new(),
        writes: (0, 0),
        failed: (0, 0),
        flood_msgs: 0.0,
        relay_cpu_pct: 0.0,
    };
    let (mut sent, mut flood_secs, mut cpu) = (0.0, 0.0, 0u64);
    for _ in 0..rounds {
        let quiet = heartbeats(conns, ids, window).await;
        run.failed.0 += failed(&quiet);
        run.writes.0 += quiet.len();
        run.quiet.push(p50_p99(&quiet));
        // The flooder is a process of its own, as a device is.
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.arg("flood")
            .arg("--mbps")
            .arg(mbps.to_string())
            .env("RUST_LOG", "warn");
        nats.configure_client(&mut cmd);
        let flooder = LoggedProcess::spawn("flooder", cmd, dir.join("flooder.log"))?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let cpu0 = cpu_ticks(relay_pid)?;
        let t = Instant::now();
        let flooded = heartbeats(conns, ids, window).await;
        cpu += cpu_ticks(relay_pid)? - cpu0;
        flood_secs += t.elapsed().as_secs_f64();
        let log = flooder.log_text();
        sent += log
            .lines()
            .filter_map(|l| l.strip_prefix("flooder: ")?.split(' ').next()?.parse::<f64>().ok())
            .next_back()
            .unwrap_or(0.0);
        drop(flooder);
        run.failed.1 += failed(&flooded);
        run.writes.1 += flooded.len();
        run.flooded.push(p50_p99(&flooded));
        // Let the last of the flood drain before the next quiet window.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    drop(relay);
    run.flood_msgs = sent / (flood_secs + rounds as f64);
    run.relay_cpu_pct = cpu as f64 / 100.0 / flood_secs * 100.0;
    Ok(run)
}

fn median_ms(v: &[(Duration, Duration)], pick: fn(&(Duration, Duration)) -> Duration) -> f64 {
    let mut xs: Vec<Duration> = v.iter().map(pick).collect();
    median(&mut xs).as_secs_f64() * 1000.0
}

pub async fn relay_flood(devices: usize, window_secs: u64, rounds: usize, mbps: f64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let nats = NatsServer::start().await?;
    let admin = iot_nats::connect(&[nats.url()], &iot_nats::Anonymous, "admin", nats.ca_file()).await?;
    let js = async_nats::jetstream::new(admin.client.clone());
    iot_nats::buckets::ensure_buckets(&js).await?;
    let ids: Vec<Id> = (0..devices)
        .map(|i| Id::new(format!("dev{i}")))
        .collect::<Result<_, _>>()?;
    let conns = connect_all(&nats, &ids).await?;
    let window = Duration::from_secs(window_secs);
    let rate = if mbps > 0.0 {
        format!("{mbps} Mbit/s")
    } else {
        "as fast as its connection takes them".to_owned()
    };
    println!(
        "| {devices} devices writing status once a second; one device floods 250 KB statuses ({rate}); {rounds} rounds of {window_secs} s quiet then {window_secs} s flooded, median over rounds | p50 | p99 | failed or over 10 s |"
    );
    println!("| --- | --- | --- | --- |");
    for (relay, name) in [
        ("relay-shared-pool", "before: one permit pool for all"),
        ("relay", "now: fair per device"),
    ] {
        let run = flood_run(&nats, relay, &conns, &ids, window, rounds, mbps, dir.path()).await?;
        let rows = [
            ("no flood", &run.quiet, run.failed.0, run.writes.0),
            ("flooded", &run.flooded, run.failed.1, run.writes.1),
        ];
        for (phase, v, failed, total) in rows {
            println!(
                "| {name}, {phase} | {:.1} ms | {:.1} ms | {failed} of {total} |",
                median_ms(v, |x| x.0),
                median_ms(v, |x| x.1),
            );
        }
        println!(
            "| {name}: flooded / no flood | {:.2}x | {:.2}x | (flood {:.0} msgs/s, relay CPU {:.0} %) |",
            median_ms(&run.flooded, |x| x.0) / median_ms(&run.quiet, |x| x.0).max(1e-6),
            median_ms(&run.flooded, |x| x.1) / median_ms(&run.quiet, |x| x.1).max(1e-6),
            run.flood_msgs,
            run.relay_cpu_pct
        );
    }
    Ok(())
}
