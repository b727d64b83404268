//! Consumer-free reads of KV state with JetStream batched direct get.
//!
//! `$JS.API.DIRECT.GET.KV_<bucket>` with `{"multi_last": [filter], "batch": N}`
//! answers with one message per matching key (its latest value or delete marker),
//! then an end-of-batch message with status 204. No consumer is created, which is
//! what lets every device re-read its state at will (nats-server 2.11+, bucket
//! stream with `allow_direct`).

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use harmony_reconciler_contracts::keys::{key_from_subject, kv_stream_name};

use crate::error::KvError;

/// Most keys one request returns; the server's own cap for `multi_last` is 1024.
pub const MAX_BATCH: usize = 1024;

/// The latest record of one key.
#[derive(Debug, Clone, PartialEq)]
pub struct KvRecord {
    pub key: String,
    pub sequence: u64,
    /// `None` for a key whose latest record is a delete or purge marker.
    pub value: Option<Bytes>,
}

/// Latest record of every key in `bucket` whose subject matches `key_filter`
/// (a KV key pattern such as `dev1.>`). Deleted keys are returned with
/// `value: None` so a caller can tell "deleted" from "never seen".
pub async fn last_values_for(
    client: &async_nats::Client,
    bucket: &str,
    key_filter: &str,
    timeout: Duration,
) -> Result<Vec<KvRecord>, KvError> {
    let api = format!("$JS.API.DIRECT.GET.{}", kv_stream_name(bucket));
    let filter = format!("$KV.{bucket}.{key_filter}");
    let body =
        serde_json::to_vec(&serde_json::json!({"multi_last": [filter], "batch": MAX_BATCH})).map_err(KvError::js)?;
    let inbox = client.new_inbox();
    let mut sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| request_err(&api, e))?;
    client
        .publish_with_reply(api.clone(), inbox, Bytes::from(body))
        .await
        .map_err(|e| request_err(&api, e))?;

    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let msg = match tokio::time::timeout_at(deadline, sub.next()).await {
            Err(_) => return Err(KvError::Timeout(timeout)),
            Ok(None) => return Err(request_err(&api, "reply subscription closed")),
            Ok(Some(msg)) => msg,
        };
        if let Some(status) = msg.status {
            match status.as_u16() {
                // End of batch.
                204 => break,
                // Nothing matches the filter: an empty result, not an error.
                404 => break,
                503 => {
                    return Err(KvError::BucketMissing {
                        bucket: bucket.to_owned(),
                    });
                }
                code => {
                    let text = msg.description.clone().unwrap_or_default();
                    return Err(request_err(&api, format!("status {code} {text}")));
                }
            }
        }
        let headers = msg.headers.as_ref();
        let get = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
        let Some(subject) = get("Nats-Subject") else {
            // A JSON error body without status (e.g. bad request) lands here.
            return Err(request_err(&api, String::from_utf8_lossy(&msg.payload)));
        };
        let Some(key) = key_from_subject(bucket, &subject) else {
            continue;
        };
        let sequence = get("Nats-Sequence").and_then(|s| s.parse().ok()).unwrap_or(0);
        let deleted = matches!(get("KV-Operation").as_deref(), Some("DEL") | Some("PURGE"));
        out.push(KvRecord {
            key: key.to_owned(),
            sequence,
            value: (!deleted).then(|| msg.payload.clone()),
        });
    }
    if out.len() >= MAX_BATCH {
        tracing::warn!(
            bucket,
            key_filter,
            "direct get returned a full batch; keys beyond {MAX_BATCH} are not read"
        );
    }
    Ok(out)
}

fn request_err(subject: &str, e: impl std::fmt::Display) -> KvError {
    KvError::Request {
        subject: subject.to_owned(),
        message: e.to_string(),
    }
}
