//! Reads that do not fit one batched direct get, against a real nats-server: a device
//! with more keys than the server's 1024-subject cap for `multi_last`, deleted keys
//! that count against it, and keys rewritten while a paged read runs. A read is
//! complete or an error; it is never silently cut short.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use harmony_reconciler_contracts::keys::kv_stream_name;
use harmony_reconciler_contracts::{DESIRED_STATE_BUCKET, DeploymentRef, Id, desired_state_key};
use iot_nats::buckets::ensure_buckets;
use iot_nats::follow::FollowConfig;
use iot_nats::write::{DEFAULT_WINDOW, PURGE_MARKER_TTL};
use iot_nats::{
    Anonymous, DesiredView, KvOp, NatsError, connect, follow_desired_state, last_values_for, write_batch,
    write_batch_with,
};
use iot_testkit::NatsServer;
use tokio::sync::watch;

fn key(device: &str, i: usize) -> String {
    let dep = DeploymentRef::new("default", format!("app-{i}")).expect("valid");
    desired_state_key(&Id::new(device).expect("valid"), &dep)
}

async fn setup() -> anyhow::Result<(NatsServer, iot_nats::NatsConnection, jetstream::Context)> {
    let nats = NatsServer::start().await?;
    let conn = connect(&[nats.url()], &Anonymous, "test", nats.ca_file()).await?;
    let js = jetstream::new(conn.client.clone());
    ensure_buckets(&js).await?;
    Ok((nats, conn, js))
}

async fn put_keys(
    js: &jetstream::Context,
    device: &str,
    range: std::ops::Range<usize>,
    value: &str,
) -> anyhow::Result<()> {
    let ops: Vec<KvOp> = range
        .map(|i| KvOp::Put {
            key: key(device, i),
            value: Bytes::from(format!("{value}-{i}")),
        })
        .collect();
    let (_, err) = write_batch(js, DESIRED_STATE_BUCKET, &ops, DEFAULT_WINDOW).await;
    err.map_or(Ok(()), |e| Err(e.into()))
}

async fn follow_until(
    conn: &iot_nats::NatsConnection,
    device: &str,
    pred: impl Fn(&DesiredView) -> bool,
) -> anyhow::Result<DesiredView> {
    let (tx, mut rx) = watch::channel(DesiredView::default());
    let task = tokio::spawn(follow_desired_state(
        conn.clone(),
        Id::new(device)?,
        FollowConfig::default(),
        tx,
    ));
    let got = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|v| pred(v)))
        .await
        .map(|r| r.map(|v| v.clone()));
    task.abort();
    match got {
        Ok(Ok(view)) => Ok(view),
        _ => {
            let view = rx.borrow();
            anyhow::bail!(
                "follower never got there; {} entries, synced {}",
                view.entries.len(),
                view.synced
            )
        }
    }
}

#[tokio::test]
async fn a_device_with_1500_keys_sees_every_one() -> anyhow::Result<()> {
    let (_nats, conn, js) = setup().await?;
    put_keys(&js, "big", 0..1500, "v").await?;
    put_keys(&js, "other", 0..10, "x").await?;
    let recs = last_values_for(&conn.client, DESIRED_STATE_BUCKET, "big.>", Duration::from_secs(10)).await?;
    assert_eq!(recs.len(), 1500);
    let keys: BTreeSet<&str> = recs.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys.len(), 1500, "duplicates in the read");
    assert!(recs.iter().all(|r| r.key.starts_with("big.")));
    for r in &recs {
        let i: usize = r.key.trim_start_matches("big.default_app-").parse()?;
        assert_eq!(r.value.as_deref(), Some(format!("v-{i}").as_bytes()));
        assert!(r.stored_at.is_some(), "server timestamp missing");
    }
    let view = follow_until(&conn, "big", |v| v.synced).await?;
    assert_eq!(view.entries.len(), 1500);
    Ok(())
}

#[tokio::test]
async fn a_device_with_3000_deleted_and_5_live_keys_sees_the_5() -> anyhow::Result<()> {
    let (_nats, conn, js) = setup().await?;
    put_keys(&js, "churn", 0..3005, "v").await?;
    let purges: Vec<KvOp> = (5..3005).map(|i| KvOp::Purge { key: key("churn", i) }).collect();
    let (_, err) = write_batch(&js, DESIRED_STATE_BUCKET, &purges, DEFAULT_WINDOW).await;
    assert!(err.is_none(), "{err:?}");
    let recs = last_values_for(&conn.client, DESIRED_STATE_BUCKET, "churn.>", Duration::from_secs(10)).await?;
    let live: Vec<&str> = recs
        .iter()
        .filter(|r| r.value.is_some())
        .map(|r| r.key.as_str())
        .collect();
    assert_eq!(live.len(), 5, "{live:?}");
    assert_eq!(recs.len(), 3005, "deleted keys come back as deletions");
    let view = follow_until(&conn, "churn", |v| v.synced).await?;
    let names: BTreeSet<String> = view.entries.keys().map(|d| d.name().to_owned()).collect();
    assert_eq!(names, (0..5).map(|i| format!("app-{i}")).collect());
    Ok(())
}

#[tokio::test]
async fn keys_rewritten_during_a_paged_read_are_never_missed() -> anyhow::Result<()> {
    let (_nats, conn, js) = setup().await?;
    put_keys(&js, "busy", 0..2000, "v0").await?;
    let writer = {
        let js = js.clone();
        tokio::spawn(async move {
            for round in 1..=20 {
                if let Err(e) = put_keys(&js, "busy", 0..2000, &format!("v{round}")).await {
                    panic!("rewrite round {round}: {e}");
                }
            }
        })
    };
    let mut overlapped = 0;
    for _ in 0..5 {
        let during = !writer.is_finished();
        let recs = last_values_for(&conn.client, DESIRED_STATE_BUCKET, "busy.>", Duration::from_secs(10)).await?;
        let live = recs.iter().filter(|r| r.value.is_some()).count();
        assert_eq!(live, 2000, "a key rewritten during the read was lost");
        if during && !writer.is_finished() {
            overlapped += 1;
        }
    }
    assert!(
        overlapped > 0,
        "no read overlapped the rewrites; the test proved nothing"
    );
    writer.await?;
    // After the last rewrite, a read returns the newest value of every key.
    let recs = last_values_for(&conn.client, DESIRED_STATE_BUCKET, "busy.>", Duration::from_secs(10)).await?;
    for r in &recs {
        let i: usize = r.key.trim_start_matches("busy.default_app-").parse()?;
        assert_eq!(r.value.as_deref(), Some(format!("v20-{i}").as_bytes()), "{}", r.key);
    }
    Ok(())
}

#[tokio::test]
async fn purge_markers_expire_so_the_bucket_does_not_grow_forever() -> anyhow::Result<()> {
    let (_nats, conn, js) = setup().await?;
    let mut stream = js.get_stream(kv_stream_name(DESIRED_STATE_BUCKET)).await?;
    assert!(
        stream.info().await?.config.allow_message_ttl,
        "buckets allow per-message TTLs"
    );
    put_keys(&js, "gone", 0..50, "v").await?;
    // The platform's markers carry the one-hour TTL...
    let purges: Vec<KvOp> = (0..25).map(|i| KvOp::Purge { key: key("gone", i) }).collect();
    let (_, err) = write_batch(&js, DESIRED_STATE_BUCKET, &purges, DEFAULT_WINDOW).await;
    assert!(err.is_none(), "{err:?}");
    let marker = stream
        .direct_get_last_for_subject(format!("$KV.{DESIRED_STATE_BUCKET}.{}", key("gone", 0)))
        .await?;
    let ttl = marker.headers.get("Nats-TTL").map(|v| v.as_str().to_owned());
    assert_eq!(
        ttl.as_deref(),
        Some(format!("{}s", PURGE_MARKER_TTL.as_secs()).as_str())
    );
    // ...and the server removes a marker when its TTL runs out (1 s here).
    let short: Vec<KvOp> = (25..50).map(|i| KvOp::Purge { key: key("gone", i) }).collect();
    let (_, err) = write_batch_with(
        &js,
        DESIRED_STATE_BUCKET,
        &short,
        DEFAULT_WINDOW,
        Duration::from_secs(1),
    )
    .await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(stream.info().await?.state.messages, 50);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(stream.info().await?.state.messages, 25, "short-lived markers expired");
    let recs = last_values_for(&conn.client, DESIRED_STATE_BUCKET, "gone.>", Duration::from_secs(5)).await?;
    assert_eq!(recs.len(), 25);
    assert!(recs.iter().all(|r| r.value.is_none()));
    Ok(())
}

#[tokio::test]
async fn a_stream_without_direct_get_is_explained_not_called_missing() -> anyhow::Result<()> {
    let (_nats, conn, js) = setup().await?;
    js.create_stream(jetstream::stream::Config {
        name: kv_stream_name("nodirect"),
        subjects: vec!["$KV.nodirect.>".into()],
        allow_direct: false,
        ..Default::default()
    })
    .await?;
    let err = last_values_for(&conn.client, "nodirect", ">", Duration::from_secs(5))
        .await
        .expect_err("no direct get");
    assert!(!matches!(err, NatsError::BucketMissing { .. }), "{err}");
    assert!(err.to_string().contains("does not allow direct get"), "{err}");
    let missing = last_values_for(&conn.client, "absent", ">", Duration::from_secs(5))
        .await
        .expect_err("missing");
    assert!(matches!(missing, NatsError::BucketMissing { .. }), "{missing}");
    Ok(())
}

/// The IOT account caps each connection's subscriptions (`max_subscriptions`), and
/// every batched read holds a reply subscription while it runs. Many reads at once
/// on one connection (the operator's read responder has 64 workers, and reads the
/// stream directly until its index has caught up) must all succeed under a cap
/// below their number: the reads take turns instead of having their subscriptions
/// refused and timing out.
#[tokio::test]
async fn many_reads_at_once_stay_under_the_accounts_subscription_cap() -> anyhow::Result<()> {
    // Above the in-flight limit plus this connection's own few subscriptions, far
    // below the number of reads.
    let cap = iot_nats::direct::MAX_BATCHES_IN_FLIGHT + 8;
    let config = format!(
        "accounts {{ IOT {{ jetstream: enabled, limits: {{ max_subscriptions: {cap} }}, users: [ {{ user: op, password: op }} ] }} }}\n"
    );
    let nats = NatsServer::start_with_config(&config).await?;
    let creds = iot_nats::UserPassword {
        user: "op".into(),
        password: "op".into(),
    };
    let conn = connect(&[nats.url()], &creds, "many-reads", nats.ca_file()).await?;
    let js = jetstream::new(conn.client.clone());
    ensure_buckets(&js).await?;
    let devices = 96;
    for d in 0..devices {
        put_keys(&js, &format!("dev{d}"), 0..2, "v1").await?;
    }

    let reads = (0..devices).map(|d| {
        let client = conn.client.clone();
        async move {
            last_values_for(
                &client,
                DESIRED_STATE_BUCKET,
                &format!("dev{d}.>"),
                Duration::from_secs(20),
            )
            .await
        }
    });
    let results = futures::future::join_all(reads).await;
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(ToString::to_string))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {devices} reads failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().is_ok_and(|records| records.len() == 2))
    );
    Ok(())
}

/// Many batches at once on one context, together far past its cap of
/// unacknowledged publishes (5,000), as when the operator reconciles many
/// deployments at once. A publish waits for room; a batch that waits without
/// collecting its own acks keeps its share of that room, and enough such batches
/// wait on each other forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_past_the_contexts_ack_cap_all_finish() -> anyhow::Result<()> {
    let (_nats, _conn, js) = setup().await?;
    let batches = 100usize;
    let per_batch = 400usize;
    let tasks: Vec<_> = (0..batches)
        .map(|b| {
            let js = js.clone();
            tokio::spawn(async move {
                let ops: Vec<KvOp> = (0..per_batch)
                    .map(|i| KvOp::Put {
                        key: key(&format!("dev{b}"), i),
                        value: Bytes::from_static(b"x"),
                    })
                    .collect();
                write_batch(&js, DESIRED_STATE_BUCKET, &ops, DEFAULT_WINDOW).await
            })
        })
        .collect();
    let results = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(tasks))
        .await
        .map_err(|_| anyhow::anyhow!("concurrent batches wedged"))?;
    for r in results {
        let (acked, err) = r?;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(acked, per_batch);
    }
    Ok(())
}
