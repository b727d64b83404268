//! Registry credentials from the operator: before each pull from a registry, the
//! agent asks for a pull grant over NATS and hands it to podman as the password
//! (user: the device id). The grant lives minutes and allows pulling only what
//! this device's deployments name; nothing about the registry is stored here.

use std::sync::Arc;
use std::time::Duration;

use harmony_reconciler_contracts::Id;
use iot_nats::registry_grant::request_grant;

use crate::podman::RegistryAuth;
use crate::runtime::RegistryCredentials;

/// How long a grant request may take.
const GRANT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct NatsGrants {
    pub client: async_nats::Client,
    pub device: Id,
}

impl NatsGrants {
    pub fn new(client: async_nats::Client, device: Id) -> Arc<Self> {
        Arc::new(Self { client, device })
    }
}

impl RegistryCredentials for NatsGrants {
    fn credentials<'a>(
        &'a self,
        registry: &'a str,
        image: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<RegistryAuth>, String>> {
        Box::pin(async move {
            let Some(grant) = request_grant(&self.client, &self.device, GRANT_TIMEOUT)
                .await
                .map_err(|e| format!("cannot get a pull grant for registry {registry} from the operator: {e}"))?
            else {
                return Ok(None);
            };
            if grant.token.is_none()
                && let Some(why) = &grant.error
            {
                // The operator cannot grant now (still loading, say): a short retry,
                // not a pull without credentials that the registry refuses.
                return Err(format!(
                    "the operator gave no pull grant for registry {registry}: {why}"
                ));
            }
            if !grant.registries.iter().any(|r| r == registry) {
                // Not one of the platform's registries: pull as podman is set up to.
                return Ok(None);
            }
            // The desired state naming this image may have reached the device before
            // the operator's index: ask again shortly rather than be refused.
            let repository = crate::plan::ImageRef::parse(image).repository;
            let path = repository
                .strip_prefix(registry)
                .and_then(|r| r.strip_prefix('/'))
                .unwrap_or(repository);
            if !grant.repositories.iter().any(|r| r == path) {
                return Err(format!(
                    "the operator's pull grant does not name {path} yet (its index may be behind the desired state)"
                ));
            }
            match grant.token {
                Some(token) => Ok(Some(RegistryAuth {
                    username: self.device.to_string(),
                    password: token,
                    server: registry.to_owned(),
                })),
                None => Err(format!(
                    "the operator gave no pull grant for registry {registry}: {}",
                    grant.error.unwrap_or_else(|| "no reason given".into())
                )),
            }
        })
    }
}
