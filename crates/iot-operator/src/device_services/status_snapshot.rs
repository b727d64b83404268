//! The status snapshot for viewers (the dashboard): `iot.status.read.<name>` answers
//! with the fleet's latest reports, page by page, read from the `agent-status`
//! stream in the order it stored them (a batched direct get: no consumer, and
//! nothing held in the operator's memory). Only reports that decode and name the
//! device of their key are passed on.
//!
//! A viewer used to follow the `agent-status` stream itself, which took JetStream
//! API rights; with those, any identity can make the server publish on any subject
//! (a request's reply, a consumer's deliver subject), including devices' desired
//! state. Viewers now get no JetStream API at all: this snapshot, plus a plain
//! subscription to `$KV.agent-status.>` for changes.

use std::time::Duration;

use super::fair::FairLimits;
use super::{DeviceRequest, ServiceCounts, ServiceSpec, serve};
use bytes::Bytes;
use harmony_reconciler_contracts::AGENT_STATUS_BUCKET;
use harmony_reconciler_contracts::read::{
    STATUS_READ_PREFIX, STATUS_READ_QUEUE, StatusReadPage, StatusReadRequest, StatusRecord, is_viewer_inbox,
};
use harmony_reconciler_contracts::report;
use iot_nats::NatsError;

/// Stored bytes per page: the answer (the same reports, as JSON) stays well below
/// NATS's default 1 MiB max payload.
pub const PAGE_BUDGET: usize = 256 * 1024;

/// Where the snapshot responder listens: a few viewers, each with one page in
/// flight.
pub fn status_read_spec() -> ServiceSpec {
    ServiceSpec {
        prefix: STATUS_READ_PREFIX,
        queue_group: STATUS_READ_QUEUE,
        workers: 4,
        limits: FairLimits {
            max_waiting: 1_000,
            max_waiting_bytes: 1 << 20,
            min_gap: std::time::Duration::ZERO,
        },
        is_own_inbox: is_viewer_inbox,
    }
}

/// Answers snapshot requests until the subscription ends; `page_budget` bounds the
/// stored bytes one page reads.
pub async fn serve_status_reads(
    client: async_nats::Client,
    page_budget: usize,
    counts: ServiceCounts,
) -> Result<(), NatsError> {
    let reader = client.clone();
    serve(client, status_read_spec(), counts, move |req: DeviceRequest| {
        let client = reader.clone();
        async move {
            let request: StatusReadRequest = serde_json::from_slice(&req.payload).unwrap_or_default();
            let page = status_page(&client, request.from_sequence, page_budget).await;
            Bytes::from(serde_json::to_vec(&page).unwrap_or_default())
        }
    })
    .await
}

/// One page of reports stored at `from_sequence` or later.
pub async fn status_page(client: &async_nats::Client, from_sequence: u64, budget: usize) -> StatusReadPage {
    let read = iot_nats::direct::page_by_sequence(
        client,
        AGENT_STATUS_BUCKET,
        ">",
        from_sequence,
        budget,
        Duration::from_secs(10),
    )
    .await;
    let (records, more) = match read {
        Ok(r) => r,
        Err(e) => {
            return StatusReadPage {
                error: Some(e.to_string()),
                ..Default::default()
            };
        }
    };
    let next_sequence = records
        .iter()
        .map(|r| r.sequence)
        .max()
        .map_or(from_sequence, |s| s + 1);
    let records = records
        .into_iter()
        .filter_map(|r| {
            // Taken as every reader of the fleet takes a report: one under
            // someone else's key, or one that does not decode, is not passed on.
            let device = report::report_device(&r.key).ok()?;
            let status = report::decode_report(&device, r.value.as_deref()?).ok()?;
            Some(StatusRecord {
                device,
                stored_at: r.stored_at?,
                status,
            })
        })
        .collect();
    StatusReadPage {
        records,
        more,
        next_sequence,
        error: None,
    }
}
