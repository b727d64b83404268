//! The buckets on a real 3-member JetStream cluster (routes in mutual TLS): three
//! replicas, and writes that keep working while members are killed and restarted
//! under load (nats-server #8519 reported R3 KV buckets that stopped taking writes
//! after two of three servers restarted, on 2.12.12 and 2.14.5).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use harmony_reconciler_contracts::DESIRED_STATE_BUCKET;
use harmony_reconciler_contracts::keys::kv_stream_name;
use iot_nats::buckets::ensure_buckets_replicated;
use iot_testkit::{Ca, ClusterOptions, NatsCluster};

/// A 3-member cluster on loopback in a temporary directory (which the caller
/// keeps), with its CA.
async fn three_members() -> anyhow::Result<(tempfile::TempDir, Ca, NatsCluster)> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::create(dir.path())?;
    let cluster = NatsCluster::start(
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
    Ok((dir, ca, cluster))
}

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
    let (_dir, ca, mut cluster) = three_members().await?;
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

/// An index that remembers the fewest keys it held after its first catch-up.
#[derive(Default)]
struct CountingIndex {
    keys: std::sync::Mutex<std::collections::BTreeSet<String>>,
    caught_up: std::sync::atomic::AtomicBool,
    fewest_after_catch_up: AtomicU64,
    catch_ups: AtomicU64,
}

impl iot_nats::BucketIndex for CountingIndex {
    fn apply(&self, entry: iot_nats::BucketEntry) {
        let mut keys = self.keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match entry.value {
            Some(_) => keys.insert(entry.key),
            None => keys.remove(&entry.key),
        };
        if self.caught_up.load(Ordering::Relaxed) {
            self.fewest_after_catch_up
                .fetch_min(keys.len() as u64, Ordering::Relaxed);
        }
    }
    fn caught_up(&self) {
        let held = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len() as u64;
        self.fewest_after_catch_up.fetch_min(held, Ordering::Relaxed);
        self.caught_up.store(true, Ordering::Relaxed);
        self.catch_ups.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_follower_keeps_every_key_when_the_stream_leader_dies() -> anyhow::Result<()> {
    let (_dir, ca, mut cluster) = three_members().await?;
    let connect = || {
        async_nats::ConnectOptions::new()
            .add_root_certificates(ca.cert_file())
            .require_tls(true)
            .connect(cluster.urls())
    };
    let js = jetstream::new(connect().await?);
    let (desired, _) = ensure_buckets_replicated(&js, 3).await?;
    for k in 0..50 {
        desired
            .put(format!("dev{k}.default_web"), Bytes::from_static(b"v1"))
            .await?;
    }
    // The follower on a connection of its own, as the operator's.
    let conn = iot_nats::connect(&cluster.urls(), &iot_nats::Anonymous, "follower", Some(&ca.cert_file())).await?;
    let store = jetstream::new(conn.client.clone())
        .get_key_value(DESIRED_STATE_BUCKET)
        .await?;
    let index = Arc::new(CountingIndex {
        fewest_after_catch_up: AtomicU64::new(u64::MAX),
        ..Default::default()
    });
    let follower = Arc::new(iot_nats::BucketFollower::new(DESIRED_STATE_BUCKET));
    let task = {
        let (index, follower, connects) = (index.clone(), follower.clone(), conn.connects.clone());
        tokio::spawn(async move { follower.run(store, Some(connects), index.as_ref()).await })
    };
    tokio::time::timeout(Duration::from_secs(20), follower.wait_caught_up()).await?;

    // The member that hosts the follower's consumer is made the stream's leader,
    // then killed: the follower's watch fails and it replays the bucket while the
    // stream elects a new leader (what the operator met in the e2e test).
    let stream = js.get_stream(kv_stream_name(DESIRED_STATE_BUCKET)).await?;
    let mut consumers = stream.consumers();
    let host = match consumers.next().await {
        Some(Ok(info)) => info.cluster.and_then(|c| c.leader),
        _ => None,
    };
    drop(consumers);
    let host = host
        .and_then(|name| cluster.index_of(&name))
        .ok_or_else(|| anyhow::anyhow!("the follower's consumer has no host"))?;
    if leader_of(&js, &cluster).await? != host {
        let body = serde_json::json!({"placement": {"preferred": iot_testkit::nats_cluster::member_name(host)}});
        let subject = format!(
            "$JS.API.STREAM.LEADER.STEPDOWN.{}",
            kv_stream_name(DESIRED_STATE_BUCKET)
        );
        let client = connect().await?;
        client.request(subject, serde_json::to_vec(&body)?.into()).await?;
        let until = Instant::now() + Duration::from_secs(20);
        while leader_of(&js, &cluster).await.ok() != Some(host) {
            anyhow::ensure!(Instant::now() < until, "nats-{host} did not become the leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    cluster.member_mut(host).stop();
    let mut leaderless_empty = 0;
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(2), desired.status()).await
            && status.info.cluster.as_ref().is_some_and(|c| c.leader.is_none())
            && status.values() == 0
        {
            leaderless_empty += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fewest = index.fewest_after_catch_up.load(Ordering::Relaxed);
    task.abort();
    let catch_ups = index.catch_ups.load(Ordering::Relaxed);
    eprintln!(
        "stream info answers without a leader and with an empty state: {leaderless_empty}; replays: {catch_ups}; fewest keys held: {fewest}"
    );
    assert_eq!(
        fewest, 50,
        "the index never dropped a key while the leader was re-elected"
    );
    Ok(())
}
