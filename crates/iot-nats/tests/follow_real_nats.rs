//! The consumer-free follower against a real nats-server.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use harmony_reconciler_contracts::keys::kv_stream_name;
use harmony_reconciler_contracts::{DESIRED_STATE_BUCKET, DeploymentRef, Id};
use iot_nats::buckets::ensure_buckets;
use iot_nats::follow::FollowConfig;
use iot_nats::{Anonymous, DesiredView, NatsConnection, NatsError, connect, follow_desired_state, last_values_for};
use iot_testkit::NatsServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;

fn dep(name: &str) -> DeploymentRef {
    DeploymentRef::new("default", name).expect("valid")
}

async fn wait_view(
    rx: &mut watch::Receiver<DesiredView>,
    what: &str,
    pred: impl Fn(&DesiredView) -> bool,
) -> anyhow::Result<DesiredView> {
    let got = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|v| pred(v)))
        .await
        .map(|r| r.map(|v| v.clone()));
    match got {
        Ok(Ok(v)) => Ok(v),
        _ => anyhow::bail!("timed out waiting for {what}; view: {:?}", *rx.borrow()),
    }
}

/// A nats-server with the platform's buckets and `dev1.default_web = v1`, and a
/// follower for dev1 (re-reading every `resync`) that has done its first read.
struct Followed {
    nats: NatsServer,
    admin: NatsConnection,
    desired: jetstream::kv::Store,
    rx: watch::Receiver<DesiredView>,
    task: JoinHandle<Result<(), NatsError>>,
}

impl Followed {
    async fn start(resync: Duration) -> anyhow::Result<Self> {
        let nats = NatsServer::start().await?;
        let admin = connect(&[nats.url()], &Anonymous, "admin", nats.ca_file()).await?;
        let (desired, _) = ensure_buckets(&jetstream::new(admin.client.clone())).await?;
        desired.put("dev1.default_web", Bytes::from_static(b"v1")).await?;
        let conn = connect(&[nats.url()], &Anonymous, "dev1", nats.ca_file()).await?;
        let (tx, mut rx) = watch::channel(DesiredView::default());
        let cfg = FollowConfig {
            resync,
            ..Default::default()
        };
        let task = tokio::spawn(follow_desired_state(conn, Id::new("dev1")?, cfg, tx));
        wait_view(&mut rx, "initial read", |v| v.synced).await?;
        Ok(Self {
            nats,
            admin,
            desired,
            rx,
            task,
        })
    }
}

#[tokio::test]
async fn direct_get_reads_only_one_devices_keys_and_reports_deletes() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let conn = connect(&[nats.url()], &Anonymous, "test", nats.ca_file()).await?;
    let js = jetstream::new(conn.client.clone());
    let (desired, _) = ensure_buckets(&js).await?;
    desired.put("dev1.default_a", Bytes::from_static(b"A")).await?;
    desired.put("dev1.default_b", Bytes::from_static(b"B")).await?;
    desired
        .put("dev10.default_a", Bytes::from_static(b"other device"))
        .await?;
    desired.delete("dev1.default_b").await?;

    let mut recs = last_values_for(&conn.client, DESIRED_STATE_BUCKET, "dev1.>", Duration::from_secs(5)).await?;
    recs.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert_eq!(
        (recs[0].key.as_str(), recs[0].value.as_deref()),
        ("dev1.default_a", Some(&b"A"[..]))
    );
    assert_eq!(
        (recs[1].key.as_str(), recs[1].value.as_deref()),
        ("dev1.default_b", None)
    );
    assert!(recs[0].sequence > 0);

    let none = last_values_for(&conn.client, DESIRED_STATE_BUCKET, "nobody.>", Duration::from_secs(5)).await?;
    assert!(none.is_empty());

    // Reading created no consumer.
    let info = js
        .get_stream(kv_stream_name(DESIRED_STATE_BUCKET))
        .await?
        .info()
        .await?
        .clone();
    assert_eq!(info.state.consumer_count, 0);
    Ok(())
}

#[tokio::test]
async fn missing_bucket_is_a_typed_error() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let conn = connect(&[nats.url()], &Anonymous, "test", nats.ca_file()).await?;
    // JetStream is up but the bucket does not exist.
    let err = last_values_for(&conn.client, DESIRED_STATE_BUCKET, "dev1.>", Duration::from_secs(5))
        .await
        .expect_err("no bucket");
    assert!(matches!(err, iot_nats::NatsError::BucketMissing { .. }), "{err}");
    Ok(())
}

#[tokio::test]
async fn follower_sees_puts_deletes_and_converges_after_server_restart() -> anyhow::Result<()> {
    let Followed {
        mut nats,
        admin: _first_admin,
        desired,
        mut rx,
        task,
    } = Followed::start(Duration::from_secs(2)).await?;
    let v = rx.borrow().clone();
    assert_eq!(v.entries.get(&dep("web")).map(|b| &b[..]), Some(&b"v1"[..]));

    // Live updates through the core subscription.
    desired.put("dev1.default_web", Bytes::from_static(b"v2")).await?;
    desired.put("dev1.default_db", Bytes::from_static(b"db")).await?;
    desired.put("dev2.default_web", Bytes::from_static(b"not mine")).await?;
    wait_view(&mut rx, "v2 and db", |v| {
        v.entries.get(&dep("web")).map(|b| &b[..]) == Some(b"v2") && v.entries.contains_key(&dep("db"))
    })
    .await?;
    desired.purge("dev1.default_db").await?;
    let v = wait_view(&mut rx, "db purged", |v| !v.entries.contains_key(&dep("db"))).await?;
    assert_eq!(v.entries.len(), 1, "other devices' keys must not appear: {v:?}");

    // Outage: change state while the follower is disconnected... the server is down,
    // so change it right after it comes back, before the follower reconnects.
    drop(desired);
    nats.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.restart().await?;
    let admin = connect(&[nats.url()], &Anonymous, "admin2", nats.ca_file()).await?;
    let js = jetstream::new(admin.client.clone());
    let desired = js.get_key_value(DESIRED_STATE_BUCKET).await?;
    desired.put("dev1.default_web", Bytes::from_static(b"v3")).await?;
    let v = wait_view(&mut rx, "v3 after restart", |v| {
        v.entries.get(&dep("web")).map(|b| &b[..]) == Some(b"v3")
    })
    .await?;
    assert!(v.synced);

    // Still no consumers on the stream.
    let info = js
        .get_stream(kv_stream_name(DESIRED_STATE_BUCKET))
        .await?
        .info()
        .await?
        .clone();
    assert_eq!(info.state.consumer_count, 0);

    // The follower stops by itself once nobody listens.
    drop(rx);
    let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "follower did not stop cleanly: {ended:?}"
    );
    Ok(())
}

#[tokio::test]
async fn unchanged_rereads_publish_nothing() -> anyhow::Result<()> {
    let Followed {
        nats: _nats,
        desired,
        mut rx,
        task,
        ..
    } = Followed::start(Duration::from_millis(200)).await?;
    rx.borrow_and_update();
    // Several re-reads happen here; none of them changes anything.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!rx.has_changed()?, "an unchanged re-read woke the reconciler");
    // A real change still does.
    desired.put("dev1.default_web", Bytes::from_static(b"v2")).await?;
    wait_view(&mut rx, "v2", |v| {
        v.entries.get(&dep("web")).map(|b| &b[..]) == Some(b"v2")
    })
    .await?;
    task.abort();
    Ok(())
}

/// Attack: bytes published on a device's desired-state subject that the stream
/// never stored (here: the stream refuses them, as it refuses a publish with a
/// wrong expected sequence; in the wild: an answer whose reply subject someone
/// pointed there). Before, the follower applied any message body it received.
#[tokio::test]
async fn a_message_the_stream_does_not_hold_is_never_applied() -> anyhow::Result<()> {
    // A long resync: every read after the first is caused by a signal.
    let Followed {
        nats: _nats,
        admin,
        desired,
        mut rx,
        task,
    } = Followed::start(Duration::from_secs(600)).await?;

    // Every subscriber of the subject receives this; the stream refuses to store it.
    let subject = "$KV.desired-state.dev1.default_web";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Expected-Last-Subject-Sequence", "1000000");
    let mut spy = admin.client.subscribe(subject.to_owned()).await?;
    admin
        .client
        .publish_with_headers(subject.to_owned(), headers, Bytes::from_static(b"forged"))
        .await?;
    let seen = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut spy)).await?;
    assert_eq!(
        seen.map(|m| m.payload),
        Some(Bytes::from_static(b"forged")),
        "delivered"
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("KV-Operation", "DEL");
    headers.insert("Nats-Expected-Last-Subject-Sequence", "1000000");
    admin
        .client
        .publish_with_headers(subject.to_owned(), headers, Bytes::new())
        .await?;
    let stored = last_values_for(&admin.client, DESIRED_STATE_BUCKET, "dev1.>", Duration::from_secs(5)).await?;
    assert_eq!(stored[0].value.as_deref(), Some(&b"v1"[..]), "the stream refused both");

    // The follower read the stream after each signal and kept v1.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v = rx.borrow().clone();
    assert_eq!(v.entries.get(&dep("web")).map(|b| &b[..]), Some(&b"v1"[..]), "{v:?}");
    // A real write still arrives at once (the resync is 10 minutes away).
    desired.put("dev1.default_web", Bytes::from_static(b"v2")).await?;
    wait_view(&mut rx, "v2", |v| {
        v.entries.get(&dep("web")).map(|b| &b[..]) == Some(b"v2")
    })
    .await?;
    task.abort();
    Ok(())
}
