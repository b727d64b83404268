//! What `sync_interval: always` costs on a 3-node cluster (R3 buckets), against the
//! server default (fsync every 2 minutes), in one run, alternating: a fresh cluster
//! per mode and run, then
//! - KV put throughput: `--puts` acked puts to `desired-state`, from `--writers`
//!   concurrent publishers with `--window` puts in flight each;
//! - apply to every key: one pipelined writer (what the operator's fan-out does)
//!   puts a new value to each of `--devices` keys, every put acknowledged.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use iot_nats::{ClientOptions, NatsTls, connect_with};
use iot_testkit::Ca;

use crate::scale_bench::{Servers, payload, put_all};

pub struct Args {
    pub servers: usize,
    pub runs: usize,
    pub puts: usize,
    pub writers: usize,
    pub window: usize,
    pub devices: usize,
}

struct One {
    puts_per_sec: f64,
    apply: Duration,
}

async fn once(a: &Args, always: bool) -> anyhow::Result<One> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::create(&dir.path().join("ca"))?;
    let servers = Servers::start(a.servers, always, &ca, dir.path()).await?;
    let opts = ClientOptions::new("bench-sync").tls(NatsTls {
        ca_file: Some(ca.cert_file()),
        required: true,
    });
    let conn = connect_with(&servers.urls(), &iot_nats::Anonymous, &opts).await?;
    let js = jetstream::new(conn.client.clone());
    iot_nats::buckets::ensure_buckets_replicated(&js, a.servers.min(3)).await?;
    let (v0, _) = payload(0)?;
    put_all(&js, a.devices, &v0, 256).await?;

    // Throughput: several writers, each with its own connection and window.
    let mut writers = Vec::new();
    for w in 0..a.writers {
        let conn = connect_with(&servers.urls(), &iot_nats::Anonymous, &opts).await?;
        let js = jetstream::new(conn.client.clone());
        let (n, window, devices) = (a.puts / a.writers, a.window, a.devices);
        let value = Bytes::from(vec![b'x'; 300]);
        // Built before the clock starts: only the writes are timed.
        let ops: Vec<iot_nats::KvOp> = (0..n)
            .map(|k| iot_nats::KvOp::Put {
                key: format!("dev{}.throughput", (w * n + k) % devices),
                value: value.clone(),
            })
            .collect();
        writers.push(async move {
            let (_, failed) =
                iot_nats::write_batch(&js, harmony_reconciler_contracts::DESIRED_STATE_BUCKET, &ops, window).await;
            if let Some(e) = failed {
                anyhow::bail!("writer {w}: {e}");
            }
            drop(conn);
            anyhow::Ok(n)
        });
    }
    let t = Instant::now();
    let done: usize = futures::future::try_join_all(writers).await?.into_iter().sum();
    let puts_per_sec = done as f64 / t.elapsed().as_secs_f64();

    let (v1, _) = payload(1)?;
    let apply = put_all(&js, a.devices, &v1, 256).await?;
    let pids = servers.pids();
    drop(conn);
    drop(servers);
    std::thread::sleep(Duration::from_millis(300));
    anyhow::ensure!(
        pids.iter()
            .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()),
        "a nats-server outlived its run"
    );
    Ok(One { puts_per_sec, apply })
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let mut default = Vec::new();
    let mut always = Vec::new();
    for r in 0..a.runs {
        // Alternate which mode goes first.
        for mode in if r % 2 == 0 { [false, true] } else { [true, false] } {
            let one = once(&a, mode).await?;
            eprintln!(
                "run {r} sync_interval {}: {:.0} puts/s, apply to {} keys {:.2} s",
                if mode { "always" } else { "default" },
                one.puts_per_sec,
                a.devices,
                one.apply.as_secs_f64()
            );
            if mode { &mut always } else { &mut default }.push(one);
        }
    }
    let med_f = |v: &mut Vec<f64>| {
        v.sort_by(|x, y| x.total_cmp(y));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let mut tp_d: Vec<f64> = default.iter().map(|o| o.puts_per_sec).collect();
    let mut tp_a: Vec<f64> = always.iter().map(|o| o.puts_per_sec).collect();
    let mut ap_d: Vec<Duration> = default.iter().map(|o| o.apply).collect();
    let mut ap_a: Vec<Duration> = always.iter().map(|o| o.apply).collect();
    let list_f = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
    let list_d = |v: &[Duration]| {
        v.iter()
            .map(|x| format!("{:.2}", x.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (ld, la, lad, laa) = (list_f(&tp_d), list_f(&tp_a), list_d(&ap_d), list_d(&ap_a));
    let (md, ma) = (med_f(&mut tp_d), med_f(&mut tp_a));
    let (mad, maa) = (crate::util::median(&mut ap_d), crate::util::median(&mut ap_a));
    println!(
        "| {}-node cluster, R3, {} runs each, alternating | default (fsync every 2 min) | `sync_interval: always` | always / default |",
        a.servers, a.runs
    );
    println!("| --- | --- | --- | --- |");
    println!(
        "| KV puts/s, {} writers x {} in flight, {} acked puts | **{md:.0}** ({ld}) | **{ma:.0}** ({la}) | {:.2}x |",
        a.writers,
        a.window,
        a.puts,
        ma / md.max(1.0)
    );
    println!(
        "| apply to every key: {} acked puts, one pipelined writer | **{:.2} s** ({lad}) | **{:.2} s** ({laa}) | {:.2}x |",
        a.devices,
        mad.as_secs_f64(),
        maa.as_secs_f64(),
        maa.as_secs_f64() / mad.as_secs_f64().max(1e-9)
    );
    Ok(())
}
