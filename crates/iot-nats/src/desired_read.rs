//! The client of the operator's desired-state read responder (see
//! `harmony_reconciler_contracts::read` for why it exists, and
//! `iot_operator::device_services::desired_read` for the responder), and the
//! records' wire form both sides share.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use harmony_reconciler_contracts::Id;
use harmony_reconciler_contracts::read::{DesiredReadPage, DesiredReadRequest, DesiredRecord, desired_read_subject};

use crate::direct::KvRecord;
use crate::error::NatsError;

/// Pages of one read, at most: far beyond any device (a guard against a loop).
const MAX_PAGES: usize = 10_000;

/// A record as the responder sends it: text as is, other bytes in base64, a
/// deleted key as a marker.
pub fn to_wire(r: KvRecord) -> DesiredRecord {
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

/// A record as the responder sent it.
pub fn from_wire(r: DesiredRecord) -> Result<KvRecord, String> {
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
) -> Result<Vec<KvRecord>, NatsError> {
    let subject = desired_read_subject(device);
    let mut out: Vec<KvRecord> = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let body = serde_json::to_vec(&DesiredReadRequest { after: after.clone() }).map_err(NatsError::js)?;
        let page: DesiredReadPage = crate::status_relay::ask(
            client,
            &subject,
            body.into(),
            timeout,
            "no desired-state read responder is running",
        )
        .await?;
        if let Some(error) = page.error {
            return Err(NatsError::Request {
                subject: subject.clone(),
                message: error,
            });
        }
        after = page.records.last().map(|r| r.key.clone());
        let more = page.more && after.is_some();
        for r in page.records {
            out.push(from_wire(r).map_err(|message| NatsError::Request {
                subject: subject.clone(),
                message,
            })?);
        }
        if !more {
            return Ok(out);
        }
    }
    Err(NatsError::Request {
        subject,
        message: format!("more than {MAX_PAGES} pages"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_text_and_binary_survive_the_wire() -> Result<(), String> {
        let rec = |key: &str, value: Option<&'static [u8]>| KvRecord {
            key: key.into(),
            sequence: 1,
            stored_at: None,
            value: value.map(Bytes::from_static),
        };
        for r in [
            rec("d.gone", None),
            rec("d.bin", Some(&[0xff, 0xfe])),
            rec("d.text", Some(b"{}")),
        ] {
            assert_eq!(from_wire(to_wire(r.clone()))?, r);
        }
        Ok(())
    }
}
