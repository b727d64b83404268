//! The dashboard at fleet scale: N synthetic devices (10 % failing) over 20
//! Deployments, aggregated by the release operator, served by the release
//! `iot-dashboard`. Measures each page's server time and size against a static
//! asset from the same server (the HTTP floor), and the SSE notice rate and
//! latency while the whole fleet heartbeats.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use harmony_reconciler_contracts::*;
use iot_api::Deployment;
use iot_nats::{KvOp, write_batch};
use kube::Api;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::util::{control_plane, median, ms, rss_kib, sibling_binary, spread_deployments};

const DEPLOYMENTS: usize = 20;

fn status(device: &Id, dep: &DeploymentRef, hash: &SpecHash, failed: bool) -> Bytes {
    let now = Utc::now();
    let (phase, err) = if failed {
        (
            Phase::Failed,
            Some("image localhost/app:v9 is not present on the device and pulling it failed".to_owned()),
        )
    } else {
        (Phase::Running, None)
    };
    let s = AgentStatus {
        format: 1,
        device_id: device.clone(),
        agent_version: "bench".into(),
        heartbeat_at: now,
        deployments: BTreeMap::from([(
            dep.clone(),
            DeploymentPhase::new(phase, Some(hash.clone()), err.clone(), now),
        )]),
        recent_events: vec![EventEntry {
            at: now,
            severity: if failed { Severity::Error } else { Severity::Info },
            deployment: Some(dep.clone()),
            message: err.unwrap_or_else(|| format!("running spec {hash}")),
        }],
        last_reconcile_at: Some(now),
        runtime: RuntimeStatus {
            state: RuntimeState::Available,
            message: None,
        },
        inventory: Some(InventorySnapshot {
            cpu_cores: 4,
            arch: "aarch64".into(),
            os: "Debian 12".into(),
            ..Default::default()
        }),
    };
    Bytes::from(serde_json::to_vec(&s).unwrap_or_default())
}

async fn timed_get(port: u16, path: &str, runs: usize) -> anyhow::Result<(Duration, usize)> {
    let mut samples = Vec::with_capacity(runs);
    let mut size = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let (code, body) = iot_testkit::http::get("127.0.0.1", port, path).await?;
        samples.push(t.elapsed());
        anyhow::ensure!(code == 200, "GET {path}: {code}");
        size = body.len();
    }
    Ok((median(&mut samples), size))
}

/// The browser's side: headless Chromium loads each page 10 times; medians of
/// the navigation timings (response end, DOM ready) and of first contentful paint,
/// against a one-device page from the same server (the render floor).
async fn browser_render(port: u16, dir: &std::path::Path) -> anyhow::Result<()> {
    let b = iot_testkit::browser::browser_with(dir, &[]).await?;
    let mut floor = None;
    for path in [
        "/devices/dev42",
        "/",
        "/deployments/default/app0?phase=failed",
        "/devices",
    ] {
        let (mut response, mut ready, mut paint) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..10 {
            b.client.goto(&format!("http://127.0.0.1:{port}{path}")).await?;
            let v = b
                .client
                .execute(
                    "const n = performance.getEntriesByType('navigation')[0];
                     const p = performance.getEntriesByName('first-contentful-paint')[0];
                     return [n.responseEnd, n.domContentLoadedEventEnd, p ? p.startTime : -1];",
                    vec![],
                )
                .await?;
            let at = |i: usize| Duration::from_secs_f64(v[i].as_f64().unwrap_or(-1.0).max(0.0) / 1000.0);
            response.push(at(0));
            ready.push(at(1));
            if v[2].as_f64().is_some_and(|p| p >= 0.0) {
                paint.push(at(2));
            }
        }
        let ready = median(&mut ready);
        let floor = *floor.get_or_insert(ready);
        println!(
            "  browser {:<36} response {:>9}   DOM ready {:>9} ({:.1}x floor)   first paint {:>9} ({} of 10)",
            path,
            ms(median(&mut response)),
            ms(ready),
            ready.as_secs_f64() / floor.as_secs_f64().max(1e-9),
            if paint.is_empty() {
                "-".to_owned()
            } else {
                ms(median(&mut paint))
            },
            paint.len()
        );
    }
    Ok(())
}

pub async fn run(devices: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        devices.is_multiple_of(DEPLOYMENTS),
        "--devices must be a multiple of {DEPLOYMENTS}"
    );
    let cp = control_plane().await?;
    let api: Api<Deployment> = Api::namespaced(cp.kube.clone(), "default");
    let fleet = spread_deployments(&api, devices, DEPLOYMENTS).await?;
    let ops = |i: usize| -> Vec<KvOp> {
        fleet
            .iter()
            .enumerate()
            .map(|(k, (d, dep, h))| KvOp::Put {
                key: agent_status_key(d),
                value: status(d, dep, h, (k + i).is_multiple_of(10)),
            })
            .collect()
    };
    let (n, err) = write_batch(&cp.js, AGENT_STATUS_BUCKET, &ops(0), 512).await;
    anyhow::ensure!(err.is_none() && n == devices, "publish failed: {err:?}");

    let port = iot_testkit::free_port()?;
    let dir = tempfile::tempdir()?;
    let mut cmd = std::process::Command::new(sibling_binary("iot-dashboard")?);
    cp.configure_client(&mut cmd);
    cmd.env("KUBECONFIG", cp.kubeconfig())
        .env("IOT_DASHBOARD_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn");
    let started = Instant::now();
    let dashboard = iot_testkit::LoggedProcess::spawn("iot-dashboard", cmd, dir.path().join("dashboard.log"))?;
    iot_testkit::wait_until(Duration::from_secs(120), "dashboard ready", || async {
        (iot_testkit::http::get_status("127.0.0.1", port, "/readyz").await.ok()? == 200).then_some(())
    })
    .await?;
    let ready_after = started.elapsed();
    // Let the operator's aggregates land, so the overview has its top errors.
    tokio::time::sleep(Duration::from_secs(5)).await;

    println!(
        "dashboard at {devices} devices over {DEPLOYMENTS} deployments (10 % failing); ready {} after start",
        ms(ready_after)
    );
    let (floor, _) = timed_get(port, "/assets/style.css", 30).await?;
    println!(
        "  {:<44} median {:>9}   (HTTP floor)",
        "GET /assets/style.css",
        ms(floor)
    );
    for path in [
        "/",
        "/deployments",
        "/deployments/default/app0",
        "/deployments/default/app0?phase=failed",
        "/devices",
        "/devices?state=online&page=100",
        "/devices/dev42",
    ] {
        let (t, size) = timed_get(port, path, 30).await?;
        println!(
            "  {:<44} median {:>9}   {:>6.1}x floor   {:>4} KiB",
            format!("GET {path}"),
            ms(t),
            t.as_secs_f64() / floor.as_secs_f64().max(1e-9),
            size / 1024
        );
    }

    browser_render(port, dir.path()).await?;

    // SSE while every device heartbeats once (a whole-fleet wave), then one change.
    let mut sse = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    sse.write_all(b"GET /events HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n")
        .await?;
    let mut lines = BufReader::new(sse).lines();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.starts_with("event: change") && tx.send(Instant::now()).is_err() {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    while rx.try_recv().is_ok() {}
    let t = Instant::now();
    let (n, _) = write_batch(&cp.js, AGENT_STATUS_BUCKET, &ops(1), 512).await;
    let wave = t.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut notices = 0;
    while rx.try_recv().is_ok() {
        notices += 1;
    }
    let window = t.elapsed().as_secs_f64();
    println!(
        "  whole-fleet wave: {n} reports in {}; {notices} SSE notices in {window:.1} s ({:.1}/s, capped at 4/s)",
        ms(wave),
        f64::from(notices) / window
    );
    let mut latencies = Vec::new();
    for (k, (d, dep, h)) in fleet.iter().take(10).enumerate() {
        tokio::time::sleep(Duration::from_millis(600)).await;
        while rx.try_recv().is_ok() {}
        let t = Instant::now();
        cp.js
            .publish(
                format!("$KV.{AGENT_STATUS_BUCKET}.{}", agent_status_key(d)),
                status(d, dep, h, k % 2 == 0),
            )
            .await?
            .await?;
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await?;
        if let Some(at) = got {
            latencies.push(at.duration_since(t));
        }
    }
    println!(
        "  one report -> SSE notice: median {} over {} changes",
        ms(median(&mut latencies)),
        latencies.len()
    );
    if let Some(pid) = dashboard.pid() {
        println!("  dashboard RSS {:.1} MiB", rss_kib(pid)? as f64 / 1024.0);
    }
    Ok(())
}
