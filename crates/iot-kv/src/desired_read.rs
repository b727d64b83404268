//! The desired-state read responder and its client (see
//! `harmony_reconciler_contracts::read` for why it exists).
//!
//! The responder answers `iot.desired.read.<device>` with that device's records,
//! read by one batched direct get ([`last_values_for`]) and cut into pages below
//! [`PAGE_BUDGET`] bytes. Pages are separate reads, so a key written between two pages
//! may be seen at either value; the device's change subscription, which runs
//! alongside, delivers the newer one in any case.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use futures::StreamExt;
use harmony_reconciler_contracts::read::{
    DESIRED_READ_PREFIX, DESIRED_READ_QUEUE, DesiredReadPage, DesiredReadRequest, DesiredRecord, desired_read_subject,
    device_of_read_subject, is_device_inbox,
};
use harmony_reconciler_contracts::{DESIRED_STATE_BUCKET, Id};

use crate::direct::{KvRecord, last_values_for};
use crate::error::KvError;

/// Payload bytes per page. JSON escaping can nearly double text, and NATS's
/// default max payload is 1 MiB.
pub const PAGE_BUDGET: usize = 384 * 1024;
/// Pages of one read, at most: far beyond any device (a guard against a loop).
const MAX_PAGES: usize = 10_000;

/// Answers read requests until the subscription ends. Any number of responders can
/// run; they share the requests through a queue group.
pub async fn serve_desired_reads(client: async_nats::Client, read_timeout: Duration) -> Result<(), KvError> {
    let subject = format!("{DESIRED_READ_PREFIX}.*");
    let mut sub = client
        .queue_subscribe(subject.clone(), DESIRED_READ_QUEUE.to_owned())
        .await
        .map_err(|e| KvError::Request {
            subject: subject.clone(),
            message: e.to_string(),
        })?;
    // Reads in flight at most: a device flooding its subject cannot take more.
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    while let Some(msg) = sub.next().await {
        let client = client.clone();
        let Some(reply) = msg.reply.clone() else { continue };
        // Answer only to the asking device's own inbox: a reply subject is chosen by
        // the sender and not checked by permissions, and this connection may publish
        // to the desired-state bucket.
        if !device_of_read_subject(&msg.subject).is_some_and(|d| is_device_inbox(&d, &reply)) {
            tracing::warn!(subject = %msg.subject, reply = %reply, "read request with a reply subject outside the device's inbox; ignored");
            continue;
        }
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        tokio::spawn(async move {
            let _permit = permit;
            let page = match device_of_read_subject(&msg.subject) {
                None => DesiredReadPage {
                    error: Some(format!("{} names no valid device", msg.subject)),
                    ..Default::default()
                },
                Some(device) => {
                    let request: DesiredReadRequest = serde_json::from_slice(&msg.payload).unwrap_or_default();
                    match last_values_for(&client, DESIRED_STATE_BUCKET, &format!("{device}.>"), read_timeout).await {
                        Ok(records) => page_after(records, request.after.as_deref()),
                        Err(e) => DesiredReadPage {
                            error: Some(e.to_string()),
                            ..Default::default()
                        },
                    }
                }
            };
            let body = serde_json::to_vec(&page).unwrap_or_default();
            if let Err(e) = client.publish(reply.clone(), body.into()).await {
                // Most likely a page over the server's max payload: say so to the
                // device, which keeps its last view and logs the error.
                tracing::warn!(error = %e, subject = %msg.subject, "could not answer a desired-state read");
                let page = DesiredReadPage {
                    error: Some(format!("the answer could not be sent: {e}")),
                    ..Default::default()
                };
                if let Err(e) = client
                    .publish(reply, serde_json::to_vec(&page).unwrap_or_default().into())
                    .await
                {
                    tracing::debug!(error = %e, "could not send the error either");
                }
            }
        });
    }
    Err(KvError::Request {
        subject,
        message: "subscription closed".into(),
    })
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

fn to_wire(r: KvRecord) -> DesiredRecord {
    let mut out = DesiredRecord {
        key: r.key,
        revision: r.sequence,
        ..Default::default()
    };
    match r.value {
        None => out.deleted = true,
        Some(v) => match String::from_utf8(v.to_vec()) {
            Ok(text) => out.value = Some(text),
            Err(_) => out.value_base64 = Some(STANDARD.encode(&v)),
        },
    }
    out
}

fn from_wire(r: DesiredRecord) -> Result<KvRecord, String> {
    let value = if r.deleted {
        None
    } else if let Some(text) = r.value {
        Some(Bytes::from(text))
    } else if let Some(b64) = r.value_base64 {
        Some(Bytes::from(
            STANDARD.decode(b64).map_err(|e| format!("key {}: {e}", r.key))?,
        ))
    } else {
        Some(Bytes::new())
    };
    Ok(KvRecord {
        key: r.key,
        sequence: r.revision,
        stored_at: None,
        value,
    })
}

/// Reads all of `device`'s records through the responder. Complete or an error.
pub async fn read_via_responder(
    client: &async_nats::Client,
    device: &Id,
    timeout: Duration,
) -> Result<Vec<KvRecord>, KvError> {
    let subject = desired_read_subject(device);
    let mut out: Vec<KvRecord> = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let body = serde_json::to_vec(&DesiredReadRequest { after: after.clone() }).map_err(KvError::js)?;
        let page: DesiredReadPage = crate::status_relay::ask(
            client,
            &subject,
            body.into(),
            timeout,
            "no desired-state read responder is running",
        )
        .await?;
        if let Some(error) = page.error {
            return Err(KvError::Request {
                subject: subject.clone(),
                message: error,
            });
        }
        after = page.records.last().map(|r| r.key.clone());
        let more = page.more && after.is_some();
        for r in page.records {
            out.push(from_wire(r).map_err(|message| KvError::Request {
                subject: subject.clone(),
                message,
            })?);
        }
        if !more {
            return Ok(out);
        }
    }
    Err(KvError::Request {
        subject,
        message: format!("more than {MAX_PAGES} pages"),
    })
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
    fn an_oversized_record_still_travels_alone_and_markers_and_binary_survive() -> Result<(), String> {
        let page = page_after(vec![rec("d.big", PAGE_BUDGET * 2), rec("d.next", 1)], None);
        assert_eq!(page.records.len(), 1);
        assert!(page.more);
        let marker = KvRecord {
            value: None,
            ..rec("d.gone", 0)
        };
        let binary = KvRecord {
            value: Some(Bytes::from_static(&[0xff, 0xfe])),
            ..rec("d.bin", 0)
        };
        for r in [marker, binary] {
            assert_eq!(from_wire(to_wire(r.clone()))?, r);
        }
        Ok(())
    }
}
