//! A device's registry pull grant, asked of the operator (see
//! `harmony_reconciler_contracts::read::REGISTRY_GRANT_PREFIX`), and kept until
//! shortly before it expires.

use std::time::Duration;

use bytes::Bytes;
use harmony_reconciler_contracts::Id;
use harmony_reconciler_contracts::read::{RegistryGrant, registry_grant_subject};
use tokio::sync::Mutex;

use crate::NatsError;

/// A grant is asked for again this long before it expires, so a pull never starts
/// with a token that runs out halfway through fetching its blobs' tokens.
pub const RENEW_BEFORE: Duration = Duration::from_secs(120);

/// Asks the operator for a grant. `Ok` with `error` set: the operator answered
/// and has no token to give (it says why).
pub async fn request_grant(
    client: &async_nats::Client,
    device: &Id,
    timeout: Duration,
) -> Result<RegistryGrant, NatsError> {
    crate::status_relay::ask(
        client,
        &registry_grant_subject(device),
        Bytes::new(),
        timeout,
        "no registry grant responder is running (the operator has no --registry configured)",
    )
    .await
}

/// The device's current grant, fetched when missing or about to expire.
#[derive(Debug)]
pub struct GrantCache {
    client: async_nats::Client,
    device: Id,
    timeout: Duration,
    current: Mutex<Option<RegistryGrant>>,
}

impl GrantCache {
    pub fn new(client: async_nats::Client, device: Id, timeout: Duration) -> Self {
        Self {
            client,
            device,
            timeout,
            current: Mutex::new(None),
        }
    }

    /// A grant valid for at least [`RENEW_BEFORE`] that names `repository`.
    /// A cached grant that does not name it is replaced: the deployment naming it
    /// may be newer than the grant.
    pub async fn grant_for(&self, repository: &str, now_unix: i64) -> Result<RegistryGrant, NatsError> {
        let mut current = self.current.lock().await;
        if let Some(g) = current.as_ref()
            && g.token.is_some()
            && g.expires_at - now_unix > RENEW_BEFORE.as_secs() as i64
            && g.repositories.iter().any(|r| r == repository)
        {
            return Ok(g.clone());
        }
        let fresh = request_grant(&self.client, &self.device, self.timeout).await?;
        if fresh.token.is_some() {
            *current = Some(fresh.clone());
        }
        Ok(fresh)
    }
}
