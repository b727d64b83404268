//! The status relay (devices use `iot_nats::status_relay::write_via_relay`).
//!
//! The relay takes `iot.status.write.<device>`, writes the body to
//! `agent-status/status.<device>` with a JetStream publish acknowledged on its own
//! inbox, and answers the device with the stored sequence. It answers only to the
//! device's own inbox, and shares itself fairly between devices ([`super`]): a
//! device has one write running and one waiting at most, a newer status replaces
//! its waiting one, and its writes are spaced.

use std::time::Duration;

use bytes::Bytes;
use harmony_reconciler_contracts::keys::kv_subject;
use harmony_reconciler_contracts::read::{
    MAX_STATUS_BYTES, STATUS_WRITE_PREFIX, STATUS_WRITE_QUEUE, StatusWriteAnswer, is_device_inbox,
};
use harmony_reconciler_contracts::{AGENT_STATUS_BUCKET, Id, agent_status_key};
use iot_nats::NatsError;

use super::fair::FairLimits;
use super::{DeviceRequest, ServiceCounts, ServiceSpec, serve};

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
) -> Result<(), NatsError> {
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
