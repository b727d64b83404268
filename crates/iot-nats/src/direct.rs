//! Consumer-free reads of KV state with JetStream batched direct get.
//!
//! No read here creates a consumer, which is what lets every device re-read its state
//! at will (nats-server 2.11+, bucket stream with `allow_direct`). Two request forms:
//!
//! - `multi_last`: `{"multi_last": [filter], "batch": N}` answers with the latest
//!   record of every matching key, then an end-of-batch (EOB, status 204). One round
//!   trip, but the server refuses it with 413 when more than 1024 subjects match,
//!   and delete markers count.
//! - a paged scan: `{"next_by_subj": filter, "seq": S, "batch": N}` answers with the
//!   stored messages matching `filter` from sequence `S` on, and the EOB says how many
//!   are left. KV buckets keep one message per key (history 1), so the stored messages
//!   *are* the latest records. Pages continue from the last sequence seen, without an
//!   upper bound: a key rewritten during the scan moves to a higher sequence, which a
//!   later page reaches, so every key is read at its newest value.
//!
//! [`last_values_for`] uses the first and falls back to the second on 413, so a read
//! is either complete or an error, never silently truncated.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use harmony_reconciler_contracts::keys::{key_from_subject, kv_stream_name};

use crate::error::NatsError;

/// Most keys one request returns; the server's own cap for `multi_last` is 1024.
pub const MAX_BATCH: usize = 1024;
/// Pages of one paged read: a million records, far beyond any device's keys.
const MAX_SCAN_PAGES: usize = 1000;

/// The latest record of one key.
#[derive(Debug, Clone, PartialEq)]
pub struct KvRecord {
    pub key: String,
    pub sequence: u64,
    /// When the server stored it (the server's clock, not the writer's).
    pub stored_at: Option<DateTime<Utc>>,
    /// `None` for a key whose latest record is a delete or purge marker.
    pub value: Option<Bytes>,
}

/// Latest record of every key in `bucket` whose subject matches `key_filter`
/// (a KV key pattern such as `dev1.>`). Deleted keys are returned with
/// `value: None` so a caller can tell "deleted" from "never seen". `timeout` bounds
/// each request, not the whole read.
pub async fn last_values_for(
    client: &async_nats::Client,
    bucket: &str,
    key_filter: &str,
    timeout: Duration,
) -> Result<Vec<KvRecord>, NatsError> {
    let filter = format!("$KV.{bucket}.{key_filter}");
    let body = serde_json::json!({"multi_last": [filter], "batch": MAX_BATCH});
    match request_batch(client, bucket, &body, timeout).await? {
        // A batch can also end early on the server's byte cap; then pages it is.
        Batch::Records { records, pending } if pending.is_none_or(|p| p == 0) => Ok(records),
        Batch::Records { .. } | Batch::TooManySubjects => scan(client, bucket, &filter, timeout).await,
    }
}

/// One page of the stored messages of `bucket` whose keys match `key_filter`, from
/// stream sequence `from_seq` on, in sequence order, at most about `max_bytes` of
/// them; and whether more follow. A bucket keeps one message per key, so the
/// messages are the keys' latest records; a key rewritten while pages are read
/// shows up again in a later page, at its newer value.
pub async fn page_by_sequence(
    client: &async_nats::Client,
    bucket: &str,
    key_filter: &str,
    from_seq: u64,
    max_bytes: usize,
    timeout: Duration,
) -> Result<(Vec<KvRecord>, bool), NatsError> {
    let filter = format!("$KV.{bucket}.{key_filter}");
    let (records, pending) = request_page(client, bucket, &filter, from_seq.max(1), Some(max_bytes), timeout).await?;
    Ok((records, pending.is_some_and(|p| p > 0)))
}

/// One `next_by_subj` page: the records, and the matches the server says are left
/// (`None` when it does not say).
async fn request_page(
    client: &async_nats::Client,
    bucket: &str,
    filter: &str,
    from_seq: u64,
    max_bytes: Option<usize>,
    timeout: Duration,
) -> Result<(Vec<KvRecord>, Option<u64>), NatsError> {
    let mut body = serde_json::json!({"next_by_subj": filter, "seq": from_seq, "batch": MAX_BATCH});
    if let Some(max_bytes) = max_bytes {
        body["max_bytes"] = max_bytes.into();
    }
    match request_batch(client, bucket, &body, timeout).await? {
        Batch::Records { records, pending } => Ok((records, pending)),
        Batch::TooManySubjects => Err(request_err(&api_subject(bucket), "page refused with 413")),
    }
}

/// Every stored message matching `filter`, page by page (see the module docs).
async fn scan(
    client: &async_nats::Client,
    bucket: &str,
    filter: &str,
    timeout: Duration,
) -> Result<Vec<KvRecord>, NatsError> {
    let mut out: Vec<KvRecord> = Vec::new();
    let mut next_seq = 1u64;
    let mut pages = 0usize;
    loop {
        let (records, pending) = request_page(client, bucket, filter, next_seq, None, timeout).await?;
        let Some(last) = records.last().map(|r| r.sequence) else {
            break;
        };
        out.extend(records);
        if pending == Some(0) || pending.is_none() {
            break;
        }
        // Every page must move forward; a bucket rewritten faster than it can be
        // read is an error, not an endless read.
        pages += 1;
        if last < next_seq || pages > MAX_SCAN_PAGES {
            return Err(request_err(
                &api_subject(bucket),
                format!("paged read of {filter} made no progress after {pages} pages"),
            ));
        }
        next_seq = last + 1;
    }
    // A key rewritten during the scan was seen twice; its higher sequence is newer.
    out.sort_by(|a, b| a.key.cmp(&b.key).then(b.sequence.cmp(&a.sequence)));
    out.dedup_by(|later, first| later.key == first.key);
    Ok(out)
}

enum Batch {
    Records {
        records: Vec<KvRecord>,
        /// `Nats-Num-Pending` of the end-of-batch message: matches not yet returned.
        pending: Option<u64>,
    },
    TooManySubjects,
}

fn api_subject(bucket: &str) -> String {
    format!("$JS.API.DIRECT.GET.{}", kv_stream_name(bucket))
}

/// Batches in flight at once in this process. Each holds a reply subscription of its
/// own (a batch has many answers, so the client's shared request inbox cannot take
/// them), and the IOT account caps every connection's subscriptions (64, in
/// `iot-auth`'s permissions). Unbounded, the operator's read responder (64 workers)
/// reading the stream while its index catches up could pass that cap, and the
/// server would refuse the subscriptions of exactly the reads a restarted fleet
/// waits for. Callers past the limit wait for a turn within their own timeout.
pub const MAX_BATCHES_IN_FLIGHT: usize = 16;

static BATCHES_IN_FLIGHT: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_BATCHES_IN_FLIGHT);

async fn request_batch(
    client: &async_nats::Client,
    bucket: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<Batch, NatsError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let _turn = match tokio::time::timeout_at(deadline, BATCHES_IN_FLIGHT.acquire()).await {
        Err(_) => return Err(NatsError::Timeout(timeout)),
        // Never closed: the semaphore is a static nobody closes.
        Ok(Err(_)) => return Err(NatsError::js("direct-get limiter closed")),
        Ok(Ok(turn)) => turn,
    };
    let api = api_subject(bucket);
    let body = serde_json::to_vec(body).map_err(NatsError::js)?;
    let inbox = client.new_inbox();
    let mut sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| request_err(&api, e))?;
    client
        .publish_with_reply(api.clone(), inbox, Bytes::from(body))
        .await
        .map_err(|e| request_err(&api, e))?;

    let mut records = Vec::new();
    loop {
        let msg = match tokio::time::timeout_at(deadline, sub.next()).await {
            Err(_) => return Err(NatsError::Timeout(timeout)),
            Ok(None) => return Err(request_err(&api, "reply subscription closed")),
            Ok(Some(msg)) => msg,
        };
        let header = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        if let Some(status) = msg.status {
            match status.as_u16() {
                // End of batch.
                204 => {
                    let pending = header("Nats-Num-Pending").and_then(|p| p.parse().ok());
                    return Ok(Batch::Records { records, pending });
                }
                // Nothing matches the filter: an empty result, not an error.
                404 => {
                    return Ok(Batch::Records {
                        records,
                        pending: Some(0),
                    });
                }
                413 => return Ok(Batch::TooManySubjects),
                503 => return Err(explain_no_responders(client, bucket).await),
                code => {
                    let text = msg.description.clone().unwrap_or_default();
                    return Err(request_err(&api, format!("status {code} {text}")));
                }
            }
        }
        let Some(subject) = header("Nats-Subject") else {
            // A JSON error body without status (e.g. bad request) lands here.
            return Err(request_err(&api, String::from_utf8_lossy(&msg.payload)));
        };
        let Some(key) = key_from_subject(bucket, &subject) else {
            continue;
        };
        let deleted = matches!(header("KV-Operation").as_deref(), Some("DEL") | Some("PURGE"));
        let Some(sequence) = header("Nats-Sequence").and_then(|s| s.parse().ok()) else {
            return Err(request_err(&api, format!("record for {subject} without a sequence")));
        };
        records.push(KvRecord {
            key: key.to_owned(),
            sequence,
            stored_at: header("Nats-Time-Stamp").and_then(|t| DateTime::parse_from_rfc3339(&t).ok().map(Into::into)),
            value: (!deleted).then(|| msg.payload.clone()),
        });
    }
}

/// "No responders" on a direct get means the stream does not exist, does not allow
/// direct get, or JetStream is off. One stream-info request tells which.
async fn explain_no_responders(client: &async_nats::Client, bucket: &str) -> NatsError {
    let info_subject = format!("$JS.API.STREAM.INFO.{}", kv_stream_name(bucket));
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(info_subject.clone(), Bytes::new()),
    )
    .await;
    let message = match reply {
        Err(_) => "no responder, and stream info timed out".to_owned(),
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
            "no responder: JetStream is not enabled for this account".to_owned()
        }
        Ok(Err(e)) => format!("no responder, and stream info failed: {e}"),
        Ok(Ok(msg)) => {
            let info: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
            // JSApiStreamNotFound
            if info.pointer("/error/err_code").and_then(serde_json::Value::as_u64) == Some(10059) {
                return NatsError::BucketMissing {
                    bucket: bucket.to_owned(),
                };
            }
            if info
                .pointer("/config/allow_direct")
                .and_then(serde_json::Value::as_bool)
                == Some(false)
            {
                "no responder: the bucket's stream does not allow direct get".to_owned()
            } else {
                "no responder for direct get".to_owned()
            }
        }
    };
    request_err(&api_subject(bucket), message)
}

fn request_err(subject: &str, e: impl std::fmt::Display) -> NatsError {
    NatsError::Request {
        subject: subject.to_owned(),
        message: e.to_string(),
    }
}
