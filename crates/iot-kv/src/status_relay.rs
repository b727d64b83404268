//! The status relay and its client (see `harmony_reconciler_contracts::read` for
//! why devices with scoped permissions do not publish to JetStream themselves).
//!
//! The relay takes `iot.status.write.<device>`, writes the body to
//! `agent-status/status.<device>` with a JetStream publish acknowledged on its own
//! inbox, and answers the device with the stored sequence. It answers only to the
//! device's own inbox.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use harmony_reconciler_contracts::keys::kv_subject;
use harmony_reconciler_contracts::read::{
    STATUS_WRITE_PREFIX, STATUS_WRITE_QUEUE, StatusWriteAnswer, device_of_status_subject, is_device_inbox,
    status_write_subject,
};
use harmony_reconciler_contracts::{AGENT_STATUS_BUCKET, Id, agent_status_key};

use crate::error::KvError;

/// Largest status accepted (a status is a few KB; the cap keeps a device from
/// filling the bucket's history with megabytes).
pub const MAX_STATUS_BYTES: usize = 256 * 1024;

/// Relays status writes until the subscription ends.
pub async fn serve_status_writes(client: async_nats::Client, write_timeout: Duration) -> Result<(), KvError> {
    let subject = format!("{STATUS_WRITE_PREFIX}.*");
    let mut sub = client
        .queue_subscribe(subject.clone(), STATUS_WRITE_QUEUE.to_owned())
        .await
        .map_err(|e| KvError::Request {
            subject: subject.clone(),
            message: e.to_string(),
        })?;
    let js = async_nats::jetstream::new(client.clone());
    let limit = Arc::new(tokio::sync::Semaphore::new(256));
    while let Some(msg) = sub.next().await {
        let Some(reply) = msg.reply.clone() else { continue };
        let Some(device) = device_of_status_subject(&msg.subject) else {
            continue;
        };
        if !is_device_inbox(&device, &reply) {
            tracing::warn!(%device, reply = %reply, "status write with a reply subject outside the device's inbox; ignored");
            continue;
        }
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let (client, js) = (client.clone(), js.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let answer = if msg.payload.len() > MAX_STATUS_BYTES {
                StatusWriteAnswer {
                    error: Some(format!(
                        "status of {} bytes is over the {MAX_STATUS_BYTES}-byte cap",
                        msg.payload.len()
                    )),
                    ..Default::default()
                }
            } else {
                let target = kv_subject(AGENT_STATUS_BUCKET, &agent_status_key(&device));
                let stored = async {
                    let ack = js
                        .publish(target, msg.payload.clone())
                        .await
                        .map_err(|e| e.to_string())?;
                    ack.await.map_err(|e| e.to_string())
                };
                match tokio::time::timeout(write_timeout, stored).await {
                    Ok(Ok(ack)) => StatusWriteAnswer {
                        sequence: ack.sequence,
                        error: None,
                    },
                    Ok(Err(e)) => StatusWriteAnswer {
                        error: Some(e),
                        ..Default::default()
                    },
                    Err(_) => StatusWriteAnswer {
                        error: Some(format!("not stored within {write_timeout:?}")),
                        ..Default::default()
                    },
                }
            };
            let body = serde_json::to_vec(&answer).unwrap_or_default();
            if let Err(e) = client.publish(reply, body.into()).await {
                tracing::debug!(error = %e, "could not answer a status write");
            }
        });
    }
    Err(KvError::Request {
        subject,
        message: "subscription closed".into(),
    })
}

/// Writes `device`'s status through the relay; the stored sequence.
pub async fn write_via_relay(
    client: &async_nats::Client,
    device: &Id,
    status: Bytes,
    timeout: Duration,
) -> Result<u64, KvError> {
    let subject = status_write_subject(device);
    let answer: StatusWriteAnswer = ask(client, &subject, status, timeout, "no status relay is running").await?;
    match answer.error {
        Some(message) => Err(KvError::Request { subject, message }),
        None => Ok(answer.sequence),
    }
}

/// One request to an operator-side device service, its JSON answer decoded.
/// `missing` says what is not running when nobody answers.
pub(crate) async fn ask<T: serde::de::DeserializeOwned>(
    client: &async_nats::Client,
    subject: &str,
    body: Bytes,
    timeout: Duration,
    missing: &str,
) -> Result<T, KvError> {
    let failed = |message: String| KvError::Request {
        subject: subject.to_owned(),
        message,
    };
    let msg = tokio::time::timeout(timeout, client.request(subject.to_owned(), body))
        .await
        .map_err(|_| KvError::Timeout(timeout))?
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => failed(format!("{missing} (the operator serves it)")),
            _ => failed(e.to_string()),
        })?;
    serde_json::from_slice(&msg.payload).map_err(|e| failed(format!("unreadable answer: {e}")))
}
