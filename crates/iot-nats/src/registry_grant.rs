//! A device's registry pull grant, asked of the operator (see
//! `harmony_reconciler_contracts::read::REGISTRY_GRANT_PREFIX`). Asked afresh for
//! every pull and never kept: a pull is rare, a grant cheap, and a kept one would
//! miss a repository that a deployment newer than it names.

use std::time::Duration;

use bytes::Bytes;
use harmony_reconciler_contracts::Id;
use harmony_reconciler_contracts::read::{RegistryGrant, registry_grant_subject};

use crate::NatsError;

/// Asks the operator for a grant. `Ok(None)`: nothing serves grants (the
/// operator manages no registry), so pulls go without. `Ok` with `error` set: the
/// operator answered and has no token to give (it says why).
pub async fn request_grant(
    client: &async_nats::Client,
    device: &Id,
    timeout: Duration,
) -> Result<Option<RegistryGrant>, NatsError> {
    let subject = registry_grant_subject(device);
    let failed = |message: String| NatsError::Request {
        subject: subject.clone(),
        message,
    };
    let msg = match tokio::time::timeout(timeout, client.request(subject.clone(), Bytes::new())).await {
        Err(_) => return Err(NatsError::Timeout(timeout)),
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => return Ok(None),
        Ok(Err(e)) => return Err(failed(e.to_string())),
        Ok(Ok(msg)) => msg,
    };
    serde_json::from_slice(&msg.payload)
        .map(Some)
        .map_err(|e| failed(format!("unreadable answer: {e}")))
}
