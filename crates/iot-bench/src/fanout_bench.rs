//! Operator fan-out: one Deployment targeting N devices, from apply to every key in
//! KV, against a raw client putting the same number of keys in the same run.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use harmony_reconciler_contracts::*;
use iot_api::{Deployment, DeploymentSpec};
use iot_nats::{KvOp, write_batch};
use kube::Api;
use kube::api::{Patch, PatchParams};

use crate::util::{control_plane, control_plane_with, rss_kib};

/// Counts distinct keys seen on a subject filter until `n`, or times out. Returns
/// when the first key was seen.
async fn wait_keys(sub: &mut async_nats::Subscriber, n: usize, timeout: Duration) -> anyhow::Result<Instant> {
    let mut seen = HashSet::with_capacity(n);
    let mut first = None;
    let deadline = Instant::now() + timeout;
    while seen.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, sub.next())
            .await
            .map_err(|_| anyhow::anyhow!("only {} of {n} keys after {timeout:?}", seen.len()))?
            .ok_or_else(|| anyhow::anyhow!("subscription closed"))?;
        first.get_or_insert_with(Instant::now);
        seen.insert(msg.subject.to_string());
    }
    Ok(first.unwrap_or_else(Instant::now))
}

/// `breakdown`: the operator logs at `info,kube_client=debug` (every API request it
/// makes, with timestamps) and the run ends with a timeline from the apply call to
/// the last key: the watch, the finalizer round trip, the revision, the writes.
pub async fn run(devices: usize, breakdown: bool) -> anyhow::Result<()> {
    let cp = if breakdown {
        control_plane_with(&[("RUST_LOG", "info,kube_client=debug".into())]).await?
    } else {
        control_plane().await?
    };
    let (conn_client, js, operator_pid) = (cp.client.clone(), cp.js.clone(), cp.operator_pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss_kib(operator_pid)?;

    let deployments: Api<Deployment> = Api::namespaced(cp.kube.clone(), "default");
    let targets: Vec<String> = (0..devices).map(|i| format!("dev{i}")).collect();
    let score: IotScore = serde_json::from_value(
        serde_json::json!({"PodmanV0": {"services": [{"name": "web", "image": "localhost/iot-web:v1"}]}}),
    )?;
    let payload_len = DesiredState::new(DeploymentRef::new("default", "fanout")?, score.clone())
        .to_bytes()
        .len();

    // Baseline first: a raw client putting the same number of keys, same payload size,
    // pipelined the same way as the operator does it.
    let mut raw_sub = conn_client
        .subscribe(format!("$KV.{DESIRED_STATE_BUCKET}.*.default_raw"))
        .await?;
    let raw_dep = DeploymentRef::new("default", "raw")?;
    let raw_value = Bytes::from(DesiredState::new(raw_dep.clone(), score.clone()).to_bytes());
    let ops: Vec<KvOp> = targets
        .iter()
        .map(|d| {
            Ok(KvOp::Put {
                key: desired_state_key(&Id::new(d.as_str())?, &raw_dep),
                value: raw_value.clone(),
            })
        })
        .collect::<Result<_, IdError>>()?;
    let t = Instant::now();
    let (acked, err) = write_batch(&js, DESIRED_STATE_BUCKET, &ops, iot_nats::write::DEFAULT_WINDOW).await;
    anyhow::ensure!(err.is_none() && acked == devices, "raw puts failed: {err:?}");
    wait_keys(&mut raw_sub, devices, Duration::from_secs(300)).await?;
    let raw = t.elapsed();

    // A naive raw client: one acknowledged `kv.put` after another.
    let mut seq_sub = conn_client
        .subscribe(format!("$KV.{DESIRED_STATE_BUCKET}.*.default_seq"))
        .await?;
    let store = js.get_key_value(DESIRED_STATE_BUCKET).await?;
    let t = Instant::now();
    for d in &ops {
        let key = d.key().replace(".default_raw", ".default_seq");
        store.put(key, raw_value.clone()).await?;
    }
    wait_keys(&mut seq_sub, devices, Duration::from_secs(300)).await?;
    let sequential = t.elapsed();

    // Ours: apply the resource, wait for every key.
    let mut sub = conn_client
        .subscribe(format!("$KV.{DESIRED_STATE_BUCKET}.*.default_fanout"))
        .await?;
    let mut dep = Deployment::new(
        "fanout",
        DeploymentSpec::for_devices(targets, iot_api::IotScore::from_wire(&score)),
    );
    dep.metadata.namespace = Some("default".into());
    let log_from = std::fs::metadata(cp.operator_log()).map(|m| m.len()).unwrap_or(0);
    let wall = chrono::Utc::now();
    let t = Instant::now();
    deployments
        .patch("fanout", &PatchParams::apply("bench").force(), &Patch::Apply(&dep))
        .await?;
    let applied = t.elapsed();
    let first_key = wait_keys(&mut sub, devices, Duration::from_secs(300)).await?;
    let ours = t.elapsed();
    let to_first_key = first_key.duration_since(t);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(operator_pid)?;

    println!("| devices targeted | {devices} (payload {payload_len} B per key) |");
    println!(
        "| raw client: pipelined puts until every key is seen | {:.3} s |",
        raw.as_secs_f64()
    );
    println!(
        "| operator: SSA apply until every key is seen | {:.3} s (of which the API call {:.3} s) |",
        ours.as_secs_f64(),
        applied.as_secs_f64()
    );
    println!(
        "| raw client: sequential acked kv.put until every key is seen | {:.3} s |",
        sequential.as_secs_f64()
    );
    println!(
        "| operator: apply -> first key (API server + watch + plan) | {:.3} s |",
        to_first_key.as_secs_f64()
    );
    println!(
        "| operator: first key -> last key (the writes) | {:.3} s |",
        (ours - to_first_key).as_secs_f64()
    );
    println!(
        "| ratio ours/raw pipelined, whole path | {:.2}x |",
        ours.as_secs_f64() / raw.as_secs_f64()
    );
    println!(
        "| ratio ours/(the API server's apply + raw pipelined), whole path | {:.2}x |",
        ours.as_secs_f64() / (applied + raw).as_secs_f64()
    );
    println!(
        "| ratio ours/raw pipelined, write phase only | {:.2}x |",
        (ours - to_first_key).as_secs_f64() / raw.as_secs_f64()
    );
    println!(
        "| ratio ours/raw sequential, whole path | {:.2}x |",
        ours.as_secs_f64() / sequential.as_secs_f64()
    );
    println!(
        "| operator RSS idle / after fan-out | {:.1} MiB / {:.1} MiB |",
        rss_idle as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    if breakdown {
        let log = std::fs::read(cp.operator_log())?;
        let log = String::from_utf8_lossy(&log[(log_from as usize).min(log.len())..]).into_owned();
        print_timeline(
            &log,
            wall,
            &[
                (Duration::ZERO, "bench: SSA apply sent"),
                (applied, "bench: SSA apply answered"),
                (to_first_key, "bench: first key seen"),
                (ours, "bench: last key seen"),
            ],
        );
    }
    drop(cp);
    Ok(())
}

/// The operator's log lines after `wall` (the apply), as offsets from it, merged
/// with the bench's own marks. Long-lived watch requests are left out.
fn print_timeline(log: &str, wall: chrono::DateTime<chrono::Utc>, marks: &[(Duration, &str)]) {
    let mut rows: Vec<(f64, String)> = marks
        .iter()
        .map(|(d, what)| (d.as_secs_f64() * 1000.0, (*what).to_owned()))
        .collect();
    for line in log.lines() {
        let Some((stamp, rest)) = line.split_once(' ') else {
            continue;
        };
        let Ok(at) = chrono::DateTime::parse_from_rfc3339(stamp.trim()) else {
            continue;
        };
        let ms = (at.with_timezone(&chrono::Utc) - wall).num_microseconds().unwrap_or(0) as f64 / 1000.0;
        if ms < 0.0 || rest.contains("watch=true") {
            continue;
        }
        let rest = rest.trim();
        let what = if let Some(i) = rest.find("http.method=") {
            // kube_client's HTTP span: method, path, and what happened.
            let span = &rest[i..];
            let method = span["http.method=".len()..].split_whitespace().next().unwrap_or("");
            let url = span
                .split_once("http.url=")
                .map(|(_, u)| u.split_whitespace().next().unwrap_or(""))
                .unwrap_or("");
            let path = url
                .split_once("://")
                .map_or(url, |(_, r)| r.find('/').map_or(r, |p| &r[p..]));
            let event = rest.rsplit(": ").next().unwrap_or("");
            format!("operator HTTP {method} {path}: {event}")
        } else {
            format!("operator: {}", rest.chars().take(160).collect::<String>())
        };
        rows.push((ms, what));
    }
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    println!();
    println!("| ms after the apply call | event |");
    println!("| ---: | --- |");
    for (ms, what) in rows {
        println!("| {ms:.1} | {} |", what.replace('|', "\\|"));
    }
}
