//! The client of the operator's status relay (see
//! `harmony_reconciler_contracts::read` for why devices with scoped permissions do
//! not publish to JetStream themselves, and
//! `iot_operator::device_services::status_relay` for the relay), and the one way
//! every client asks an operator-side service.

use std::time::Duration;

use bytes::Bytes;
use harmony_reconciler_contracts::Id;
use harmony_reconciler_contracts::read::{StatusWriteAnswer, status_write_subject};

use crate::error::NatsError;

/// Writes `device`'s status through the relay; the stored sequence.
pub async fn write_via_relay(
    client: &async_nats::Client,
    device: &Id,
    status: Bytes,
    timeout: Duration,
) -> Result<u64, NatsError> {
    let subject = status_write_subject(device);
    let answer: StatusWriteAnswer = ask(client, &subject, status, timeout, "no status relay is running").await?;
    match answer.error {
        Some(message) => Err(NatsError::Request { subject, message }),
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
) -> Result<T, NatsError> {
    let failed = |message: String| NatsError::Request {
        subject: subject.to_owned(),
        message,
    };
    let msg = tokio::time::timeout(timeout, client.request(subject.to_owned(), body))
        .await
        .map_err(|_| NatsError::Timeout(timeout))?
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => failed(format!("{missing} (the operator serves it)")),
            _ => failed(e.to_string()),
        })?;
    serde_json::from_slice(&msg.payload).map_err(|e| failed(format!("unreadable answer: {e}")))
}
