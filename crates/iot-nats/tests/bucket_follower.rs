//! The one bucket follower against a real nats-server: caught-up over history and
//! markers, a server restart, and keys that vanish while it is cut off.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use iot_nats::{Anonymous, BucketEntry, BucketFollower, BucketIndex, NatsConnection, connect};
use iot_testkit::{NatsServer, PartitionProxy};

const BUCKET: &str = "follow-test";

/// What the follower handed over: key -> (value, stamp).
#[derive(Default)]
struct Recorded {
    keys: Mutex<BTreeMap<String, (Bytes, DateTime<Utc>)>>,
    caught_up_calls: Mutex<u32>,
}

impl BucketIndex for Recorded {
    fn apply(&self, entry: BucketEntry) {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        match entry.value {
            Some(v) => keys.insert(entry.key, (v, entry.stored_at)),
            None => keys.remove(&entry.key),
        };
    }
    fn caught_up(&self) {
        *self.caught_up_calls.lock().unwrap_or_else(PoisonError::into_inner) += 1;
    }
}

impl Recorded {
    fn values(&self) -> BTreeMap<String, String> {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        keys.iter()
            .map(|(k, (v, _))| (k.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect()
    }
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

async fn bucket(conn: &NatsConnection) -> anyhow::Result<kv::Store> {
    let js = jetstream::new(conn.client.clone());
    let store = js
        .create_key_value(kv::Config {
            bucket: BUCKET.into(),
            history: 1,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    Ok(store)
}

/// A follower of the bucket over `conn`, running until dropped.
struct Following {
    follower: Arc<BucketFollower>,
    index: Arc<Recorded>,
    task: tokio::task::JoinHandle<()>,
}

impl Following {
    async fn start(conn: &NatsConnection) -> anyhow::Result<Self> {
        let store = jetstream::new(conn.client.clone()).get_key_value(BUCKET).await?;
        let (follower, index) = (Arc::new(BucketFollower::new(BUCKET)), Arc::new(Recorded::default()));
        let (f, i, connects) = (follower.clone(), index.clone(), Some(conn.connects.clone()));
        let task = tokio::spawn(async move { f.run(store, connects, i.as_ref()).await });
        Ok(Self { follower, index, task })
    }

    async fn caught_up(&self, within: Duration) -> anyhow::Result<()> {
        tokio::time::timeout(within, self.follower.wait_caught_up())
            .await
            .map_err(|_| anyhow::anyhow!("not caught up within {within:?}; index {:?}", self.index.values()))
    }

    async fn until(&self, what: &str, want: &BTreeMap<String, String>) -> anyhow::Result<()> {
        for _ in 0..300 {
            if &self.index.values() == want && self.follower.is_caught_up() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!(
            "{what}: index {:?} (caught up: {}), wanted {want:?}",
            self.index.values(),
            self.follower.is_caught_up()
        )
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn caught_up_means_history_replayed_with_markers_and_server_time() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let admin = connect(&[nats.url()], &Anonymous, "admin", nats.ca_file()).await?;
    let store = bucket(&admin).await?;
    // An empty bucket is caught up at once.
    let empty = Following::start(&admin).await?;
    empty.caught_up(Duration::from_secs(10)).await?;
    assert!(empty.index.values().is_empty());
    drop(empty);

    let before = Utc::now() - chrono::Duration::seconds(1);
    store.put("a", Bytes::from_static(b"1")).await?;
    store.put("b", Bytes::from_static(b"2")).await?;
    store.put("c", Bytes::from_static(b"3")).await?;
    store.delete("b").await?;
    store.purge("c").await?;
    let after = Utc::now() + chrono::Duration::seconds(1);
    let f = Following::start(&admin).await?;
    f.caught_up(Duration::from_secs(10)).await?;
    // Caught up means the whole history is in: markers removed what they mark.
    assert_eq!(f.index.values(), map(&[("a", "1")]));
    let stamp = f.index.keys.lock().unwrap_or_else(PoisonError::into_inner)["a"].1;
    assert!(
        before < stamp && stamp < after,
        "stamped with the server's store time: {stamp}"
    );
    assert_eq!(
        *f.index.caught_up_calls.lock().unwrap_or_else(PoisonError::into_inner),
        1
    );
    // And it follows live changes after.
    store.put("d", Bytes::from_static(b"4")).await?;
    store.delete("a").await?;
    f.until("live changes", &map(&[("d", "4")])).await?;
    Ok(())
}

#[tokio::test]
async fn a_server_restart_rebuilds_and_keeps_following() -> anyhow::Result<()> {
    let mut nats = NatsServer::start().await?;
    let admin = connect(&[nats.url()], &Anonymous, "admin", nats.ca_file()).await?;
    let store = bucket(&admin).await?;
    store.put("a", Bytes::from_static(b"1")).await?;
    store.put("b", Bytes::from_static(b"2")).await?;
    let conn = connect(&[nats.url()], &Anonymous, "follower", nats.ca_file()).await?;
    let f = Following::start(&conn).await?;
    f.until("first replay", &map(&[("a", "1"), ("b", "2")])).await?;

    nats.restart().await?;
    // Written once both clients are back: the follower must see them whether its
    // watch survived the restart or was rebuilt.
    let mut written = false;
    for _ in 0..100 {
        if store.put("c", Bytes::from_static(b"3")).await.is_ok() && store.delete("a").await.is_ok() {
            written = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::ensure!(written, "could not write after the restart");
    f.until("after the restart", &map(&[("b", "2"), ("c", "3")])).await?;
    assert!(
        *f.index.caught_up_calls.lock().unwrap_or_else(PoisonError::into_inner) >= 2,
        "the reconnect made the follower replay the bucket"
    );
    Ok(())
}

#[tokio::test]
async fn a_key_deleted_without_a_trace_while_cut_off_is_swept_on_return() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let admin = connect(&[nats.url()], &Anonymous, "admin", nats.ca_file()).await?;
    let store = bucket(&admin).await?;
    store.put("a", Bytes::from_static(b"1")).await?;
    store.put("b", Bytes::from_static(b"2")).await?;
    let proxy = PartitionProxy::start(([127, 0, 0, 1], nats.port()).into()).await?;
    let via_proxy = nats
        .url()
        .replace(&format!(":{}", nats.port()), &format!(":{}", proxy.port()));
    let conn = connect(&[via_proxy], &Anonymous, "follower", nats.ca_file()).await?;
    let f = Following::start(&conn).await?;
    f.until("first replay", &map(&[("a", "1"), ("b", "2")])).await?;

    proxy.partition();
    // While the follower hears nothing: b is deleted and its marker purged from the
    // stream (as an expired marker would be), so no replay will ever mention b;
    // c is new.
    store.delete("b").await?;
    let stream = jetstream::new(admin.client.clone())
        .get_stream(format!("KV_{BUCKET}"))
        .await?;
    stream.purge().filter(format!("$KV.{BUCKET}.b")).await?;
    store.put("c", Bytes::from_static(b"3")).await?;
    assert_eq!(
        f.index.values(),
        map(&[("a", "1"), ("b", "2")]),
        "cut off: nothing arrives"
    );
    proxy.heal();
    // The client notices the dead link by its pings (a few seconds), reconnects,
    // and the follower replays and sweeps.
    f.until("after the cut", &map(&[("a", "1"), ("c", "3")])).await?;
    Ok(())
}
