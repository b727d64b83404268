//! The buckets on a real 3-member JetStream cluster (routes in mutual TLS): three
//! replicas, and writes that keep working while members are killed and restarted
//! under load (nats-server #8519 reported R3 KV buckets that stopped taking writes
//! after two of three servers restarted, on 2.12.12 and 2.14.5).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use harmony_reconciler_contracts::DESIRED_STATE_BUCKET;
use harmony_reconciler_contracts::keys::kv_stream_name;
use iot_nats::buckets::ensure_buckets_replicated;
use iot_testkit::{Ca, ClusterOptions, NatsCluster};

/// The stream's leader, by member index.
async fn leader_of(js: &jetstream::Context, cluster: &NatsCluster) -> anyhow::Result<usize> {
    let mut stream = js.get_stream(kv_stream_name(DESIRED_STATE_BUCKET)).await?;
    let info = stream.info().await?;
    let name = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .ok_or_else(|| anyhow::anyhow!("the stream has no leader: {:?}", info.cluster))?;
    cluster
        .index_of(&name)
        .ok_or_else(|| anyhow::anyhow!("leader {name} is not a member"))
}

/// A put that is retried until acknowledged, as the operator retries its writes.
async fn put_until_acked(kv: &jetstream::kv::Store, key: &str, value: Bytes, within: Duration) -> anyhow::Result<u64> {
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout(Duration::from_secs(3), kv.put(key, value.clone())).await {
            Ok(Ok(seq)) => return Ok(seq),
            Ok(Err(e)) if Instant::now() < deadline => eprintln!("put {key}: {e}; retrying"),
            Err(_) if Instant::now() < deadline => eprintln!("put {key}: no ack in 3 s; retrying"),
            Ok(Err(e)) => anyhow::bail!("put {key} never acknowledged: {e}"),
            Err(_) => anyhow::bail!("put {key} never acknowledged (timeouts)"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_buckets_keep_taking_writes_while_two_members_restart_under_load() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::create(dir.path())?;
    let mut cluster = NatsCluster::start(
        &ClusterOptions {
            size: 3,
            host: "127.0.0.1",
            parent: dir.path(),
            shared_config: None,
            sync_interval: None,
        },
        &ca,
    )
    .await?;
    let client = async_nats::ConnectOptions::new()
        .add_root_certificates(ca.cert_file())
        .require_tls(true)
        .connect(cluster.urls())
        .await?;
    let js = jetstream::new(client);
    let (desired, _) = ensure_buckets_replicated(&js, 3).await?;
    let info = js
        .get_stream(kv_stream_name(DESIRED_STATE_BUCKET))
        .await?
        .info()
        .await?
        .clone();
    assert_eq!(info.config.num_replicas, 3);
    let peers = info.cluster.as_ref().map(|c| c.replicas.len()).unwrap_or(0);
    assert_eq!(peers, 2, "a leader and two followers: {:?}", info.cluster);

    // Load: a writer that keeps putting to 200 keys until told to stop.
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let writer = {
        let (kv, acked, failed, stop) = (desired.clone(), acked.clone(), failed.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            loop {
                let put = kv.put(format!("load.k{}", i % 200), Bytes::from(i.to_string()));
                tokio::select! {
                    _ = stop.notified() => return,
                    r = tokio::time::timeout(Duration::from_secs(3), put) => match r {
                        Ok(Ok(_)) => { acked.fetch_add(1, Ordering::Relaxed); }
                        _ => { failed.fetch_add(1, Ordering::Relaxed); }
                    },
                }
                i += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Restart two members one after the other, the stream's leader first (SIGKILL,
    // then the same port and store), each under the writer's load.
    let first = leader_of(&js, &cluster).await?;
    let second = (first + 1) % 3;
    for member in [first, second] {
        let before = acked.load(Ordering::Relaxed);
        cluster.member_mut(member).stop();
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.member_mut(member).restart().await?;
        cluster.wait_healthy(member).await?;
        // Writes were acknowledged meanwhile, or at the latest once it was back.
        let wait = Instant::now();
        while acked.load(Ordering::Relaxed) <= before + 50 {
            anyhow::ensure!(
                wait.elapsed() < Duration::from_secs(30),
                "writes stopped after restarting {member}: acked {} (failed {})",
                acked.load(Ordering::Relaxed),
                failed.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stop.notify_one();
    writer.await?;

    // After both restarts: every new write is acknowledged, on every key, and each
    // member serves the final values (a direct get may be answered by any replica,
    // so each one is asked on its own connection until it has caught up).
    let mut last = 0;
    for k in 0..200u64 {
        last = put_until_acked(
            &desired,
            &format!("load.k{k}"),
            Bytes::from(format!("final-{k}")),
            Duration::from_secs(30),
        )
        .await?;
    }
    assert!(last > 0);
    for member in 0..3 {
        let client = async_nats::ConnectOptions::new()
            .add_root_certificates(ca.cert_file())
            .require_tls(true)
            .connect(cluster.member(member).url())
            .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let records =
                iot_nats::last_values_for(&client, DESIRED_STATE_BUCKET, "load.>", Duration::from_secs(5)).await?;
            let finals = records
                .iter()
                .filter(|r| r.value.as_deref().is_some_and(|v| v.starts_with(b"final-")))
                .count();
            if finals == 200 {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "member {member} serves {finals}/200 final values"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!(
        "under load: {} writes acknowledged, {} unacknowledged (retried by callers) across two restarts",
        acked.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    Ok(())
}
