//! The desired-state read responder (see `harmony_reconciler_contracts::read` for
//! why it exists; devices use `iot_nats::desired_read::read_via_responder`).
//!
//! The responder answers `iot.desired.read.<device>` with that device's records,
//! cut into pages below [`PAGE_BUDGET`] bytes. It reads them from a
//! [`DesiredSource`]: the operator's index of the bucket (one follower of the
//! stream, so an answer costs no request to the server), or, while that index is
//! not caught up, one batched direct get of the stream. Pages are separate reads,
//! so a key written between two pages may be seen at either value; the device's
//! change subscription, which runs alongside, delivers the newer one in any case.

use std::time::Duration;

use bytes::Bytes;
use harmony_reconciler_contracts::read::{
    DESIRED_READ_PREFIX, DESIRED_READ_QUEUE, DesiredReadPage, DesiredReadRequest, is_device_inbox,
};
use harmony_reconciler_contracts::{DESIRED_STATE_BUCKET, Id};
use iot_nats::desired_read::to_wire;
use iot_nats::{KvRecord, NatsError, last_values_for};

use super::fair::FairLimits;
use super::{DeviceRequest, ServiceCounts, ServiceSpec, serve};

/// Payload bytes per page. JSON escaping can nearly double text, and NATS's
/// default max payload is 1 MiB.
pub const PAGE_BUDGET: usize = 384 * 1024;

/// Where the responder listens and how much it takes on: 64 reads at once, and up
/// to 100,000 devices waiting (one read each at most).
pub fn desired_read_spec() -> ServiceSpec {
    ServiceSpec {
        prefix: DESIRED_READ_PREFIX,
        queue_group: DESIRED_READ_QUEUE,
        workers: 64,
        limits: FairLimits {
            max_waiting: 100_000,
            max_waiting_bytes: 64 << 20,
            min_gap: Duration::ZERO,
        },
        is_own_inbox: is_device_inbox,
    }
}

/// Where the responder finds a device's records when it does not ask the stream.
pub trait DesiredSource: Send + Sync {
    /// Every record of `device`'s keys (deleted keys left out), or `None` while the
    /// source is not caught up with the stream.
    fn records_for(&self, device: &Id) -> Option<Vec<KvRecord>>;
}

/// Answers read requests until the subscription ends. Any number of responders can
/// run; they share the requests through a queue group. `source`: an index that
/// follows the bucket (without one, every read asks the stream).
pub async fn serve_desired_reads(
    client: async_nats::Client,
    read_timeout: Duration,
    source: Option<std::sync::Arc<dyn DesiredSource>>,
    counts: ServiceCounts,
) -> Result<(), NatsError> {
    let reader = client.clone();
    serve(client, desired_read_spec(), counts, move |req: DeviceRequest| {
        let (client, source) = (reader.clone(), source.clone());
        async move {
            let request: DesiredReadRequest = serde_json::from_slice(&req.payload).unwrap_or_default();
            let indexed = source.as_ref().and_then(|s| s.records_for(&req.id));
            let records = match indexed {
                Some(records) => Ok(records),
                None => last_values_for(&client, DESIRED_STATE_BUCKET, &format!("{}.>", req.id), read_timeout).await,
            };
            let page = match records {
                Ok(records) => page_after(records, request.after.as_deref()),
                Err(e) => DesiredReadPage {
                    error: Some(e.to_string()),
                    ..Default::default()
                },
            };
            Bytes::from(serde_json::to_vec(&page).unwrap_or_default())
        }
    })
    .await
}

/// The page of `records` that starts after key `after` (pure, for tests).
pub fn page_after(mut records: Vec<KvRecord>, after: Option<&str>) -> DesiredReadPage {
    records.sort_by(|a, b| a.key.cmp(&b.key));
    let mut page = DesiredReadPage::default();
    let mut used = 0usize;
    for r in records.into_iter().filter(|r| after.is_none_or(|a| r.key.as_str() > a)) {
        let size = r.value.as_ref().map_or(0, Bytes::len) + r.key.len();
        if !page.records.is_empty() && used + size > PAGE_BUDGET {
            page.more = true;
            break;
        }
        used += size;
        page.records.push(to_wire(r));
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str, len: usize) -> KvRecord {
        KvRecord {
            key: key.into(),
            sequence: 1,
            stored_at: None,
            value: Some(Bytes::from(vec![b'x'; len])),
        }
    }

    #[test]
    fn pages_cover_every_record_once_in_key_order() {
        let records: Vec<KvRecord> = (0..10)
            .rev()
            .map(|i| rec(&format!("d.k{i}"), PAGE_BUDGET / 3))
            .collect();
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = page_after(records.clone(), after.as_deref());
            assert!(page.records.len() <= 3);
            seen.extend(page.records.iter().map(|r| r.key.clone()));
            after = page.records.last().map(|r| r.key.clone());
            if !page.more {
                break;
            }
        }
        let expected: Vec<String> = (0..10).map(|i| format!("d.k{i}")).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn an_oversized_record_still_travels_alone() {
        let page = page_after(vec![rec("d.big", PAGE_BUDGET * 2), rec("d.next", 1)], None);
        assert_eq!(page.records.len(), 1);
        assert!(page.more);
    }
}
