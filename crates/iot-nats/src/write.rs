//! Pipelined KV writes: many puts and purges with a bounded window of outstanding
//! acks, instead of one round trip per key. This is what makes a fan-out to
//! thousands of devices take about as long as the server needs to store them.

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use harmony_reconciler_contracts::keys::kv_subject;

use crate::error::NatsError;

/// One write to a KV bucket.
#[derive(Debug, Clone, PartialEq)]
pub enum KvOp {
    Put {
        key: String,
        value: Bytes,
    },
    /// Removes the key's value, leaving a single purge marker (readers see a delete)
    /// that expires after [`PURGE_MARKER_TTL`].
    Purge {
        key: String,
    },
}

impl KvOp {
    pub fn key(&self) -> &str {
        match self {
            KvOp::Put { key, .. } | KvOp::Purge { key } => key,
        }
    }
}

/// How long a purge marker outlives its key. Markers only matter to readers that
/// follow changes live (they see the purge as it happens) and to history watches;
/// consumer-free full reads treat an absent key and a marker alike. Without a TTL the
/// markers of every deployment a device ever had would pile up in the bucket.
pub const PURGE_MARKER_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// Default number of unacknowledged writes in flight.
pub const DEFAULT_WINDOW: usize = 512;

/// Applies `ops` in order of submission with up to `window` awaiting acks. Returns
/// how many were acknowledged (acks complete out of order, so not necessarily the
/// first ones), and the first failure if any.
pub async fn write_batch(
    js: &jetstream::Context,
    bucket: &str,
    ops: &[KvOp],
    window: usize,
) -> (usize, Option<NatsError>) {
    write_batch_with(js, bucket, ops, window, PURGE_MARKER_TTL).await
}

/// [`write_batch`] with purge markers that expire after `marker_ttl` (at least 1 s).
pub async fn write_batch_with(
    js: &jetstream::Context,
    bucket: &str,
    ops: &[KvOp],
    window: usize,
    marker_ttl: std::time::Duration,
) -> (usize, Option<NatsError>) {
    let ttl = format!("{}s", marker_ttl.as_secs().max(1));
    let mut inflight = FuturesUnordered::new();
    let mut acked = 0usize;
    for op in ops {
        let subject = kv_subject(bucket, op.key());
        let msg = match op {
            KvOp::Put { value, .. } => PublishMessage::build().payload(value.clone()),
            KvOp::Purge { .. } => PublishMessage::build()
                .header("KV-Operation", "PURGE")
                .header("Nats-Rollup", "sub")
                .header("Nats-TTL", ttl.as_str()),
        };
        // The context caps unacknowledged publishes across all its users (5,000 by
        // default) and makes a publish wait for room. Acks are collected while
        // waiting: a batch that waited without polling its own acks would hold its
        // share of that room for good, and enough concurrent batches (a reconcile
        // of many deployments at once) would wait on each other forever.
        let publish = js.send_publish(subject, msg);
        tokio::pin!(publish);
        let sent = loop {
            tokio::select! {
                biased;
                sent = &mut publish => break sent,
                Some(res) = inflight.next(), if !inflight.is_empty() => match res {
                    Ok(_) => acked += 1,
                    Err(e) => return (acked, Some(NatsError::js(e))),
                },
            }
        };
        match sent {
            Ok(ack) => inflight.push(std::future::IntoFuture::into_future(ack)),
            Err(e) => return (acked, Some(NatsError::js(e))),
        }
        while inflight.len() >= window.max(1) {
            match inflight.next().await {
                Some(Ok(_)) => acked += 1,
                Some(Err(e)) => return (acked, Some(NatsError::js(e))),
                None => break,
            }
        }
    }
    while let Some(res) = inflight.next().await {
        match res {
            Ok(_) => acked += 1,
            Err(e) => return (acked, Some(NatsError::js(e))),
        }
    }
    (acked, None)
}
