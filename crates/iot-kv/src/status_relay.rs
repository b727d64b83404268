//! The status relay and its client (see `harmony_reconciler_contracts::read` for
//! why devices with scoped permissions do not publish to JetStream themselves).
//!
//! The relay takes `iot.status.write.<device>`, writes the body to
//! `agent-status/status.<device>` with a JetStream publish acknowledged on its own
//! inbox, and answers the device with the stored sequence. It answers only to the
//! device's own inbox, and shares itself fairly between devices
//! ([`crate::device_service`]): a device has one write running and one waiting at
//! most, a newer status replaces its waiting one, and its writes are spaced.

use std::time::Duration;

use bytes::Bytes;
use harmony_reconciler_contracts::keys::kv_subject;
use harmony_reconciler_contracts::read::{
    STATUS_WRITE_PREFIX, STATUS_WRITE_QUEUE, StatusWriteAnswer, is_device_inbox, status_write_subject,
};
use harmony_reconciler_contracts::{AGENT_STATUS_BUCKET, Id, agent_status_key};

use crate::device_service::{DeviceRequest, ServiceCounts, ServiceSpec, serve};
use crate::error::KvError;
use crate::fair::FairLimits;

/// Largest status accepted (a status is a few KB; the cap keeps a device from
/// filling the bucket's history with megabytes).
pub const MAX_STATUS_BYTES: usize = 256 * 1024;

/// Where the relay listens and how much it takes on: 256 writes run at once (each
/// waits for the stream's acknowledgement), up to 100,000 devices or 256 MiB of
/// statuses wait for their turn, and a device's writes start at least 250 ms apart
/// (an agent reports at most every 500 ms; a flooding device gets four writes a
/// second into the stream, each its latest).
pub fn status_relay_spec() -> ServiceSpec {
    ServiceSpec {
        prefix: STATUS_WRITE_PREFIX,
        queue_group: STATUS_WRITE_QUEUE,
        workers: 256,
        limits: FairLimits {
            max_waiting: 100_000,
            max_waiting_bytes: 256 << 20,
            min_gap: Duration::from_millis(250),
        },
        is_own_inbox: is_device_inbox,
    }
}

/// Relays status writes until the subscription ends.
pub async fn serve_status_writes(
    client: async_nats::Client,
    write_timeout: Duration,
    counts: ServiceCounts,
) -> Result<(), KvError> {
    let js = async_nats::jetstream::new(client.clone());
    serve(client, status_relay_spec(), counts, move |req: DeviceRequest| {
        let js = js.clone();
        async move {
            let answer = store_status(&js, &req.id, req.payload, write_timeout).await;
            Bytes::from(serde_json::to_vec(&answer).unwrap_or_default())
        }
    })
    .await
}

async fn store_status(
    js: &async_nats::jetstream::Context,
    device: &Id,
    status: Bytes,
    write_timeout: Duration,
) -> StatusWriteAnswer {
    if status.len() > MAX_STATUS_BYTES {
        return StatusWriteAnswer {
            error: Some(format!(
                "status of {} bytes is over the {MAX_STATUS_BYTES}-byte cap",
                status.len()
            )),
            ..Default::default()
        };
    }
    let target = kv_subject(AGENT_STATUS_BUCKET, &agent_status_key(device));
    let stored = async {
        let ack = js.publish(target, status).await.map_err(|e| e.to_string())?;
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
