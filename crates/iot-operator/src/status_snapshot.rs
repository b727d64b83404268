//! The status snapshot for viewers (the dashboard): `iot.status.read.<name>` answers
//! with the fleet's latest reports, page by page, from the operator's device index.
//!
//! A viewer used to follow the `agent-status` stream itself, which took JetStream
//! API rights; with those, any identity can make the server publish on any subject
//! (a request's reply, a consumer's deliver subject), including devices' desired
//! state. Viewers now get no JetStream API at all: this snapshot, plus a plain
//! subscription to `$KV.agent-status.>` for changes.

use std::sync::Arc;

use bytes::Bytes;
use harmony_reconciler_contracts::read::{STATUS_READ_PREFIX, STATUS_READ_QUEUE, StatusReadRequest, is_viewer_inbox};
use iot_kv::KvError;
use iot_kv::device_service::{DeviceRequest, ServiceCounts, ServiceSpec, serve};
use iot_kv::fair::FairLimits;

use crate::aggregator::DeviceIndex;

/// JSON bytes per page: well below NATS's default 1 MiB max payload.
pub const PAGE_BUDGET: usize = 384 * 1024;

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
        },
        is_own_inbox: is_viewer_inbox,
    }
}

/// Answers snapshot requests until the subscription ends.
pub async fn serve_status_reads(
    client: async_nats::Client,
    devices: Arc<DeviceIndex>,
    counts: ServiceCounts,
) -> Result<(), KvError> {
    serve(client, status_read_spec(), counts, move |req: DeviceRequest| {
        let devices = devices.clone();
        async move {
            let request: StatusReadRequest = serde_json::from_slice(&req.payload).unwrap_or_default();
            let page = devices.status_page(request.after.as_deref(), PAGE_BUDGET);
            Bytes::from(serde_json::to_vec(&page).unwrap_or_default())
        }
    })
    .await
}
