//! The client side of the viewers' status snapshot (the operator serves it; see
//! `iot_operator::status_snapshot`): the fleet's latest reports, page by page, with
//! no JetStream API at all.

use std::time::Duration;

use harmony_reconciler_contracts::Id;
use harmony_reconciler_contracts::read::{StatusReadPage, StatusReadRequest, StatusRecord, status_read_subject};

use crate::error::NatsError;

/// Pages of one snapshot at most: far beyond any fleet (a guard against a loop).
const MAX_PAGES: usize = 100_000;

/// Every device's latest report, asked as viewer `viewer`. Complete or an error.
pub async fn read_status_snapshot(
    client: &async_nats::Client,
    viewer: &Id,
    timeout: Duration,
) -> Result<Vec<StatusRecord>, NatsError> {
    let subject = status_read_subject(viewer);
    let mut latest: std::collections::BTreeMap<Id, StatusRecord> = std::collections::BTreeMap::new();
    let mut from_sequence = 0u64;
    for _ in 0..MAX_PAGES {
        let body = serde_json::to_vec(&StatusReadRequest { from_sequence }).map_err(NatsError::js)?;
        let page: StatusReadPage = crate::status_relay::ask(
            client,
            &subject,
            body.into(),
            timeout,
            "no status snapshot responder is running",
        )
        .await?;
        if let Some(message) = page.error {
            return Err(NatsError::Request { subject, message });
        }
        // In stored order: a later record of a device is its newer report.
        for r in page.records {
            latest.insert(r.device.clone(), r);
        }
        if !page.more || page.next_sequence <= from_sequence {
            return Ok(latest.into_values().collect());
        }
        from_sequence = page.next_sequence;
    }
    Err(NatsError::Request {
        subject,
        message: format!("more than {MAX_PAGES} pages"),
    })
}
