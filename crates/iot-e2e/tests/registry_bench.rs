//! Registry pulls at fleet scale (issue 26), measured on the real stack (ignored:
//! run it by hand, see BENCHMARKS.md):
//!
//! ```text
//! cargo test -p iot-e2e --test registry_bench -- --ignored --nocapture
//! ```
//!
//! One secured stack with the private registry, `IOT_BENCH_DEVICES` devices (10)
//! with empty stores on one bridge, everything the host sends onto the bridge
//! shaped to `IOT_BENCH_RATE` (200mbit: ten 100 MiB pulls take about 42 s of raw
//! transfer, so a setting is about a minute and the bridge, not this 2-core
//! machine's TLS, is the bottleneck). Then:
//!
//! 1. **Agent RSS.** One device pulls a fresh `IOT_BENCH_MIB` (100) MiB image while
//!    its agent's VmRSS is sampled every 100 ms; peak minus idle must stay under
//!    20 MiB (the agent does not buffer layers).
//! 2. **Pacing.** For each of `IOT_BENCH_RUNS` (3) rounds: the raw transfer of the
//!    same bytes (one plain HTTP GET of the layer blob from inside each device's
//!    namespace, all at once, through the same throttle), then for
//!    `maxConcurrentPulls` 2, 5 and unlimited a fresh image (bits no device has)
//!    and one Deployment to every device: time from create to every device serving
//!    it, and the registry's bandwidth from its own log (each blob GET's bytes
//!    spread over its [start, end] into 1 s bins: the peak bin and the mean).
//!    Medians over rounds are printed as a table.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use iot_api::RolloutSpec;
use iot_e2e::registry::{DeviceStore, RegistryStack, build_image, deployment_to, remove_local_image, web_score};
use kube::api::PostParams;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NS: &str = "default";

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `200mbit` and the like in bits per second.
fn rate_bits(rate: &str) -> Option<f64> {
    let r = rate.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = r.strip_suffix("gbit") {
        (n, 1e9)
    } else if let Some(n) = r.strip_suffix("mbit") {
        (n, 1e6)
    } else if let Some(n) = r.strip_suffix("kbit") {
        (n, 1e3)
    } else {
        (r.strip_suffix("bit").unwrap_or(&r), 1.0)
    };
    num.parse::<f64>().ok().map(|n| n * mult)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A fresh image pushed as `iot/bench:<tag>`: (registry reference, digest, page).
fn fresh_image(rs: &RegistryStack, mib: usize) -> anyhow::Result<(String, String, String)> {
    let tag = iot_testkit::unique_id("b");
    let page = format!("bench {tag}");
    let local = build_image(&tag, &page, mib)?;
    let pushed = rs.push(&local, &format!("iot/bench:{tag}"));
    remove_local_image(&local);
    Ok((rs.image(&format!("iot/bench:{tag}")), pushed?, page))
}

/// Waits until every device in `idx` serves `page` on `port`; each one's time.
async fn wait_all_serving(
    rs: &RegistryStack,
    idx: &[usize],
    port: u16,
    page: &str,
    start: Instant,
    limit: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let mut done: Vec<Option<Duration>> = vec![None; idx.len()];
    while done.iter().any(Option::is_none) {
        anyhow::ensure!(
            start.elapsed() < limit,
            "{} of {} devices serve {page} after {limit:?}",
            done.iter().filter(|d| d.is_some()).count(),
            idx.len()
        );
        for (k, &i) in idx.iter().enumerate() {
            if done[k].is_none() && rs.device(i).http_body(port).await.is_some_and(|b| b.trim() == page) {
                done[k] = Some(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(done.into_iter().flatten().collect())
}

/// Deletes a Deployment, waits until no device serves on `port`, and removes the
/// image from the devices' stores (disk: ten copies per setting).
async fn remove_deployment(rs: &RegistryStack, name: &str, idx: &[usize], port: u16, image_ref: &str) {
    let _ = rs.stack.deployments(NS).delete(name, &Default::default()).await;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(90) {
        let mut any = false;
        for &i in idx {
            any |= rs.device(i).http_body(port).await.is_some();
        }
        if !any {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for &i in idx {
        let _ = rs.device(i).podman(&["rmi", "-f", image_ref]);
    }
}

/// The registry's bandwidth for blob GETs that finished after `since`, from
/// `ips`: (peak 1 s bin, mean over the first start to the last end) in bits/s,
/// the bytes, and the most devices fetching blobs at once.
fn registry_bandwidth(rs: &RegistryStack, since: SystemTime, ips: &[String]) -> (f64, f64, u64, usize) {
    let reqs: Vec<_> = rs
        .registry
        .completed_requests()
        .into_iter()
        .filter(|r| {
            r.is_blob_get()
                && r.finished >= since
                && ips
                    .iter()
                    .any(|ip| r.remote.rsplit_once(':').is_some_and(|(h, _)| h == ip))
        })
        .collect();
    if reqs.is_empty() {
        return (0.0, 0.0, 0, 0);
    }
    let t0 = reqs.iter().map(|r| r.started()).min().unwrap_or(since);
    let t1 = reqs.iter().map(|r| r.finished).max().unwrap_or(since);
    let secs = |t: SystemTime| t.duration_since(t0).unwrap_or_default().as_secs_f64();
    let mut bins = vec![0f64; secs(t1).ceil() as usize + 1];
    let mut total = 0u64;
    for r in &reqs {
        total += r.written;
        let (s, e) = (secs(r.started()), secs(r.finished));
        if e - s < 1e-6 {
            bins[s as usize] += r.written as f64;
            continue;
        }
        let per_sec = r.written as f64 / (e - s);
        let mut b = s.floor() as usize;
        while (b as f64) < e {
            let overlap = e.min(b as f64 + 1.0) - s.max(b as f64);
            if overlap > 0.0 {
                bins[b] += per_sec * overlap;
            }
            b += 1;
        }
    }
    let peak = bins.iter().copied().fold(0.0, f64::max) * 8.0;
    let mean = total as f64 * 8.0 / secs(t1).max(1e-3);
    // Devices fetching at once: each device's span from its first blob GET's
    // start to its last one's end.
    let mut spans: std::collections::BTreeMap<&str, (SystemTime, SystemTime)> = Default::default();
    for r in &reqs {
        let ip = r.remote.rsplit_once(':').map_or("", |(h, _)| h);
        let e = spans.entry(ip).or_insert((r.started(), r.finished));
        e.0 = e.0.min(r.started());
        e.1 = e.1.max(r.finished);
    }
    let at_once = spans
        .values()
        .map(|(s, _)| spans.values().filter(|(a, b)| a <= s && s < b).count())
        .max()
        .unwrap_or(0);
    (peak, mean, total, at_once)
}

/// The largest blob in the registry's storage (the last pushed layer's pad).
fn largest_blob(rs: &RegistryStack) -> anyhow::Result<std::path::PathBuf> {
    let mut best: Option<(u64, std::path::PathBuf)> = None;
    let mut stack = vec![rs.registry.storage_dir().join("docker/registry/v2/blobs")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let md = e.metadata()?;
            if md.is_dir() {
                stack.push(e.path());
            } else if md.len() > best.as_ref().map_or(0, |b| b.0) {
                best = Some((md.len(), e.path()));
            }
        }
    }
    best.map(|b| b.1)
        .ok_or_else(|| anyhow::anyhow!("no blobs in the registry"))
}

/// Raw transfer: a plain HTTP server on the bridge's address serving `blob`, and
/// one `curl` per device from inside its namespace, all at once. Wall time.
async fn raw_transfer(rs: &RegistryStack, idx: &[usize], blob: &std::path::Path) -> anyhow::Result<Duration> {
    let listener = tokio::net::TcpListener::bind((rs.bridge.ip.as_str(), 0)).await?;
    let port = listener.local_addr()?.port();
    let path = blob.to_owned();
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                break;
            };
            let path = path.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let Ok(mut f) = tokio::fs::File::open(&path).await else {
                    return;
                };
                let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
                let hdr = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
                if conn.write_all(hdr.as_bytes()).await.is_ok() {
                    let _ = tokio::io::copy(&mut f, &mut conn).await;
                    let _ = conn.shutdown().await;
                }
            });
        }
    });
    let url = format!("http://{}:{port}/blob", rs.bridge.ip);
    let t = Instant::now();
    let mut children = Vec::new();
    for &i in idx {
        let mut cmd: tokio::process::Command = rs.device(i).net.command("curl").into();
        cmd.args(["-sf", "-o", "/dev/null", &url]);
        children.push(cmd.spawn()?);
    }
    for mut c in children {
        let st = c.wait().await?;
        anyhow::ensure!(st.success(), "curl of the raw blob failed: {st}");
    }
    let took = t.elapsed();
    server.abort();
    Ok(took)
}

/// Samples the agent's VmRSS (KiB) every 100 ms until told to stop.
fn sample_rss(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<u64>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                && let Some(kb) = s
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            {
                out.push(kb);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        out
    })
}

/// Idle and peak RSS (KiB) of device `i`'s agent over a pull of a fresh image.
async fn agent_rss(rs: &RegistryStack, i: usize, mib: usize) -> anyhow::Result<(u64, u64, Duration)> {
    let (image, digest, page) = fresh_image(rs, mib)?;
    let d = rs.device(i);
    let pid = rs
        .stack
        .agent_pid(&d.id)
        .ok_or_else(|| anyhow::anyhow!("no agent pid"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let idle = sample_rss(pid, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let idle: Vec<u64> = idle.join().map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    let idle_kb = idle.iter().copied().max().unwrap_or(0);
    let stop = Arc::new(AtomicBool::new(false));
    let during = sample_rss(pid, stop.clone());
    let port = 9100;
    let t = Instant::now();
    rs.stack
        .deployments(NS)
        .create(
            &PostParams::default(),
            &deployment_to("rss", std::slice::from_ref(&d.id), web_score(&image, port, None), None),
        )
        .await?;
    let r = wait_all_serving(rs, &[i], port, &page, t, Duration::from_secs(300)).await;
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let during: Vec<u64> = during.join().map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    remove_deployment(
        rs,
        "rss",
        &[i],
        port,
        &format!("{}@{digest}", image.rsplit_once(':').map_or(image.as_str(), |(r, _)| r)),
    )
    .await;
    r?;
    let peak = during.iter().copied().max().unwrap_or(0);
    Ok((idle_kb, peak, took))
}

struct Row {
    secs: Vec<f64>,
    peak: Vec<f64>,
    mean: Vec<f64>,
    at_once: Vec<f64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a benchmark: minutes, 10 GB of pulls; run by hand"]
async fn registry_pulls_at_fleet_scale() -> anyhow::Result<()> {
    let mib: usize = env_or("IOT_BENCH_MIB", 100);
    let n: usize = env_or("IOT_BENCH_DEVICES", 10);
    let rate: String = env_or("IOT_BENCH_RATE", "200mbit".to_owned());
    let runs: usize = env_or("IOT_BENCH_RUNS", 3);
    eprintln!(
        "registry bench: {mib} MiB image, {n} devices, bridge {rate}, {runs} rounds; nproc {}, load at start {}",
        std::thread::available_parallelism().map_or(0, |p| p.get()),
        loadavg()
    );
    let started = Instant::now();
    let mut rs = RegistryStack::start().await?;
    let mut idx = Vec::new();
    for _ in 0..n {
        idx.push(rs.add_device(DeviceStore::default()).await?);
    }
    rs.bridge.throttle(&rate)?;
    let ids: Vec<String> = idx.iter().map(|&i| rs.device(i).id.clone()).collect();
    let ips: Vec<String> = idx.iter().map(|&i| rs.device(i).net.ns_ip.clone()).collect();
    eprintln!("bring-up with {n} devices: {:?}", started.elapsed());

    // 1. The agent's RSS over one large pull.
    let (idle_kb, peak_kb, rss_took) = agent_rss(&rs, idx[0], mib).await?;
    eprintln!(
        "agent RSS: idle {:.1} MiB, peak during the {mib} MiB pull {:.1} MiB (+{:.1} MiB); pull to serving {:.1} s",
        idle_kb as f64 / 1024.0,
        peak_kb as f64 / 1024.0,
        peak_kb.saturating_sub(idle_kb) as f64 / 1024.0,
        rss_took.as_secs_f64()
    );

    // 2. Pacing.
    let settings: [(&str, Option<u32>); 3] = [("2", Some(2)), ("5", Some(5)), ("unlimited", None)];
    let mut raw: Vec<f64> = Vec::new();
    let mut rows: Vec<Row> = (0..settings.len())
        .map(|_| Row {
            secs: vec![],
            peak: vec![],
            mean: vec![],
            at_once: vec![],
        })
        .collect();
    let mut port = 9200;
    for run in 0..runs {
        for (k, (label, limit)) in settings.iter().enumerate() {
            let (image, digest, page) = fresh_image(&rs, mib)?;
            if k == 0 {
                let blob = largest_blob(&rs)?;
                let took = raw_transfer(&rs, &idx, &blob).await?;
                let size = std::fs::metadata(&blob)?.len();
                eprintln!(
                    "round {run}: raw transfer of {n} x {:.1} MiB: {:.1} s",
                    size as f64 / 1048576.0,
                    took.as_secs_f64()
                );
                raw.push(took.as_secs_f64());
            }
            port += 1;
            let name = format!("bench-{run}-{label}");
            let rollout = limit.map(|l| RolloutSpec {
                max_concurrent_pulls: Some(l),
                ..Default::default()
            });
            let since = SystemTime::now();
            let t = Instant::now();
            rs.stack
                .deployments(NS)
                .create(
                    &PostParams::default(),
                    &deployment_to(&name, &ids, web_score(&image, port, None), rollout),
                )
                .await?;
            let r = wait_all_serving(&rs, &idx, port, &page, t, Duration::from_secs(900)).await;
            let took = t.elapsed();
            let (peak, mean, bytes, at_once) = registry_bandwidth(&rs, since, &ips);
            let repo = image.rsplit_once(':').map(|(r, _)| r.to_owned()).unwrap_or_default();
            remove_deployment(&rs, &name, &idx, port, &format!("{repo}@{digest}")).await;
            let times = r?;
            let first = times.iter().copied().min().unwrap_or_default();
            eprintln!(
                "round {run}: pacing {label}: {:.1} s to all serving (first {:.1} s); registry peak {:.0} Mbit/s, mean {:.0} Mbit/s, {:.0} MiB of blobs, at most {at_once} devices fetching at once",
                took.as_secs_f64(),
                first.as_secs_f64(),
                peak / 1e6,
                mean / 1e6,
                bytes as f64 / 1048576.0
            );
            rows[k].secs.push(took.as_secs_f64());
            rows[k].peak.push(peak / 1e6);
            rows[k].mean.push(mean / 1e6);
            rows[k].at_once.push(at_once as f64);
        }
    }

    let raw_m = median(&raw);
    let unl = median(&rows[2].secs);
    eprintln!(
        "\nmedians of {runs} round(s); {n} devices, {mib} MiB, bridge {rate} (raw transfer at line rate: {})",
        rate_bits(&rate).map_or("?".into(), |b| format!(
            "{:.1} s",
            (n * mib) as f64 * 1048576.0 * 8.0 / b
        ))
    );
    eprintln!(
        "| maxConcurrentPulls | time to all Running | vs unlimited | vs raw | registry peak (1 s) | registry mean | devices fetching at once |"
    );
    eprintln!("| --- | --- | --- | --- | --- | --- | --- |");
    eprintln!("| raw transfer ({n} parallel curl) | {raw_m:.1} s | | 1.00x | | | |");
    for (k, (label, _)) in settings.iter().enumerate() {
        let s = median(&rows[k].secs);
        eprintln!(
            "| {label} | {s:.1} s | {:+.0} % | {:.2}x | {:.0} Mbit/s | {:.0} Mbit/s | {:.0} |",
            (s / unl - 1.0) * 100.0,
            s / raw_m,
            median(&rows[k].peak),
            median(&rows[k].mean),
            median(&rows[k].at_once)
        );
    }
    eprintln!(
        "agent RSS: idle {:.1} MiB, peak {:.1} MiB during a {mib} MiB pull",
        idle_kb as f64 / 1024.0,
        peak_kb as f64 / 1024.0
    );
    eprintln!(
        "total {:.0} s; load at end {}",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    anyhow::ensure!(
        peak_kb.saturating_sub(idle_kb) < 20 * 1024,
        "the agent's RSS grew by {} KiB during a {mib} MiB pull: it buffers layers",
        peak_kb.saturating_sub(idle_kb)
    );
    Ok(())
}
