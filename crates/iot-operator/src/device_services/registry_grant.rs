//! Registry pull grants (see `harmony_reconciler_contracts::read::REGISTRY_GRANT_PREFIX`).
//!
//! A device asks on `iot.registry.grant.<device>`; only that device may publish
//! there, so the subject proves who asks. The answer is a registry token for that
//! device (its `sub`), allowing `pull` on the repositories its desired state names
//! on the registries the operator manages, and nothing else: not `push`, not a
//! repository of another device's deployment. A revoked device loses its desired
//! state, and with it every grant; a grant already given lives at most
//! [`GRANT_TTL`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use harmony_reconciler_contracts::read::{REGISTRY_GRANT_PREFIX, REGISTRY_GRANT_QUEUE, RegistryGrant, is_device_inbox};
use harmony_reconciler_contracts::{DecodedDesiredState, IotScore, ScoreSlot};
use iot_nats::NatsError;
use iot_registry::{Access, ImageRef, SigningKey};

use super::desired_read::DesiredSource;
use super::fair::FairLimits;
use super::{DeviceRequest, ServiceCounts, ServiceSpec, serve};

/// How long a grant lives: long enough for a slow pull to fetch its token more than
/// once (podman asks per blob), short enough that a stolen one soon expires.
pub const GRANT_TTL: Duration = Duration::from_secs(10 * 60);

/// What the operator signs grants with, and for which registries.
#[derive(Debug)]
pub struct GrantSigner {
    pub key: SigningKey,
    pub issuer: String,
    pub service: String,
    /// `host:port` of the registries whose tokens this key signs.
    pub registries: BTreeSet<String>,
}

pub fn registry_grant_spec() -> ServiceSpec {
    ServiceSpec {
        prefix: REGISTRY_GRANT_PREFIX,
        queue_group: REGISTRY_GRANT_QUEUE,
        workers: 8,
        limits: FairLimits {
            max_waiting: 100_000,
            max_waiting_bytes: 16 << 20,
            min_gap: Duration::ZERO,
        },
        is_own_inbox: is_device_inbox,
    }
}

/// The repositories on `registries` that the payloads name (pure).
pub fn repositories_named<'a>(
    payloads: impl Iterator<Item = &'a [u8]>,
    registries: &BTreeSet<String>,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for bytes in payloads {
        let Ok(decoded) = DecodedDesiredState::from_slice(bytes) else {
            continue;
        };
        let ScoreSlot::Known(IotScore::PodmanV0(score)) = decoded.state.score else {
            continue;
        };
        for service in &score.services {
            if let Ok(image) = ImageRef::parse(&service.image)
                && image.registry.as_ref().is_some_and(|r| registries.contains(r))
            {
                out.insert(image.repository);
            }
        }
    }
    out
}

/// The answer for one device (pure but for the clock and randomness).
pub fn grant_for(signer: &GrantSigner, device: &str, repositories: BTreeSet<String>, now_unix: i64) -> RegistryGrant {
    let registries: Vec<String> = signer.registries.iter().cloned().collect();
    let access: Vec<Access> = repositories.iter().map(|r| Access::repository(r, &["pull"])).collect();
    match signer
        .key
        .mint(&signer.issuer, &signer.service, device, access, now_unix, GRANT_TTL)
    {
        Ok((token, claims)) => RegistryGrant {
            token: Some(token),
            expires_at: claims.exp,
            registries,
            repositories: repositories.into_iter().collect(),
            error: None,
        },
        Err(e) => RegistryGrant {
            registries,
            error: Some(e.to_string()),
            ..Default::default()
        },
    }
}

/// Answers grant requests until the subscription ends.
pub async fn serve_registry_grants(
    client: async_nats::Client,
    signer: Arc<GrantSigner>,
    source: Arc<dyn DesiredSource>,
    counts: ServiceCounts,
) -> Result<(), NatsError> {
    serve(client, registry_grant_spec(), counts, move |req: DeviceRequest| {
        let (signer, source) = (signer.clone(), source.clone());
        async move {
            let answer = match source.records_for(&req.id) {
                None => RegistryGrant {
                    registries: signer.registries.iter().cloned().collect(),
                    error: Some("the operator is still loading desired state; ask again shortly".into()),
                    ..Default::default()
                },
                Some(records) => {
                    let repos =
                        repositories_named(records.iter().filter_map(|r| r.value.as_deref()), &signer.registries);
                    tracing::debug!(device = %req.id, repositories = ?repos, "registry pull grant");
                    grant_for(&signer, req.id.as_str(), repos, iot_registry::token::now_unix())
                }
            };
            Bytes::from(serde_json::to_vec(&answer).unwrap_or_default())
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use harmony_reconciler_contracts::{DeploymentRef, DesiredState};

    fn payload(images: &[&str]) -> Vec<u8> {
        let services: Vec<serde_json::Value> = images
            .iter()
            .enumerate()
            .map(|(i, img)| serde_json::json!({"name": format!("s{i}"), "image": img}))
            .collect();
        let score: IotScore =
            serde_json::from_value(serde_json::json!({"PodmanV0": {"services": services}})).expect("score");
        DesiredState::new(DeploymentRef::new("ns", "web").expect("ref"), score).to_bytes()
    }

    #[test]
    fn only_repositories_on_managed_registries_are_granted() {
        let managed: BTreeSet<String> = ["10.77.0.1:5000".to_owned()].into();
        let a = payload(&["10.77.0.1:5000/iot/web:v1", "localhost/iot-web:v1"]);
        let b = payload(&[
            "other.io/iot/db:v1",
            "10.77.0.1:5000/iot/cache@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ]);
        let broken = b"{not json".to_vec();
        let repos = repositories_named([a.as_slice(), b.as_slice(), broken.as_slice()].into_iter(), &managed);
        assert_eq!(repos, ["iot/cache".to_owned(), "iot/web".to_owned()].into());
    }
}
