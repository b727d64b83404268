//! Image tags pinned to digests, once per revision.
//!
//! A Deployment that names `registry/repo:tag` on one of the platform's registries
//! runs `registry/repo@sha256:...` on every device: the digest the tag named when
//! the revision was recorded. A tag that moves mid-rollout changes nothing; only a
//! new revision or the `iot.nationtech.io/resolve-images` annotation asks the
//! registry again (see `revisions`). Images elsewhere run as named.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use iot_api::IotScore;
use iot_registry::ImageRef;
use iot_registry::resolve::{ResolveError, Resolver};

/// Resolves tags on the managed registries.
#[derive(Debug)]
pub struct ImagePinner {
    resolver: Resolver,
    registries: BTreeSet<String>,
}

impl ImagePinner {
    pub fn new(resolver: Resolver, registries: BTreeSet<String>) -> Self {
        Self { resolver, registries }
    }

    /// The score with every managed image pinned, and what each was pinned to.
    /// Each tag is asked once, in the order the score names them.
    pub async fn pin(&self, score: &IotScore) -> Result<Pinned, ResolveError> {
        let mut digests = BTreeMap::new();
        for image in managed_images(score, &self.registries) {
            if digests.contains_key(&image.to_string()) {
                continue;
            }
            let digest = self.resolver.resolve(&image).await?;
            digests.insert(image.to_string(), digest);
        }
        Ok(pin_with(score, &digests))
    }
}

/// A pinned score and its pins (image as named -> digest).
#[derive(Debug, Clone, PartialEq)]
pub struct Pinned {
    pub score: IotScore,
    pub images: BTreeMap<String, String>,
}

/// The images of `score` on `registries`, parsed (pure). Unparseable names are
/// left to the devices, which report them.
pub fn managed_images(score: &IotScore, registries: &BTreeSet<String>) -> Vec<ImageRef> {
    let IotScore::PodmanV0(podman) = score;
    podman
        .services
        .iter()
        .filter_map(|s| ImageRef::parse(&s.image).ok())
        .filter(|r| r.registry.as_ref().is_some_and(|h| registries.contains(h)))
        .collect()
}

/// `score` with each image found in `digests` replaced by its pinned form (pure).
/// An image that names a digest itself keeps it.
pub fn pin_with(score: &IotScore, digests: &BTreeMap<String, String>) -> Pinned {
    let mut pinned = score.clone();
    let mut images = BTreeMap::new();
    let IotScore::PodmanV0(podman) = &mut pinned;
    for service in &mut podman.services {
        let Some(digest) = digests.get(&service.image) else {
            continue;
        };
        let Ok(image) = ImageRef::parse(&service.image) else {
            continue;
        };
        images.insert(service.image.clone(), digest.clone());
        service.image = image.pinned(digest);
    }
    Pinned { score: pinned, images }
}

/// Shared by the controller's reconciles.
pub type SharedPinner = Option<Arc<ImagePinner>>;

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn score(images: &[&str]) -> IotScore {
        let services: Vec<serde_json::Value> = images
            .iter()
            .enumerate()
            .map(|(i, img)| serde_json::json!({"name": format!("s{i}"), "image": img}))
            .collect();
        serde_json::from_value(serde_json::json!({"type": "PodmanV0", "services": services}))
            .or_else(|_| serde_json::from_value(serde_json::json!({"PodmanV0": {"services": services}})))
            .expect("score")
    }

    fn images(s: &IotScore) -> Vec<String> {
        let IotScore::PodmanV0(p) = s;
        p.services.iter().map(|s| s.image.clone()).collect()
    }

    #[test]
    fn only_managed_tags_are_pinned_and_digests_are_kept() {
        let managed: BTreeSet<String> = ["reg:5000".to_owned()].into();
        let s = score(&[
            "reg:5000/iot/web:v1",
            "localhost/iot-web:v1",
            &format!("reg:5000/iot/db@{D2}"),
            "other.io/x:v1",
        ]);
        let wanted: Vec<String> = managed_images(&s, &managed).iter().map(ToString::to_string).collect();
        assert_eq!(
            wanted,
            ["reg:5000/iot/web:v1".to_owned(), format!("reg:5000/iot/db@{D2}")]
        );
        let digests: BTreeMap<String, String> = [
            ("reg:5000/iot/web:v1".to_owned(), D1.to_owned()),
            (format!("reg:5000/iot/db@{D2}"), D2.to_owned()),
        ]
        .into();
        let p = pin_with(&s, &digests);
        assert_eq!(
            images(&p.score),
            [
                format!("reg:5000/iot/web@{D1}"),
                "localhost/iot-web:v1".to_owned(),
                format!("reg:5000/iot/db@{D2}"),
                "other.io/x:v1".to_owned()
            ]
        );
        assert_eq!(p.images.get("reg:5000/iot/web:v1").map(String::as_str), Some(D1));
        assert_ne!(p.score.spec_hash(), s.spec_hash(), "pinning changes what devices run");
        assert_eq!(
            pin_with(&s, &BTreeMap::new()).score,
            s,
            "nothing to pin: the score as written"
        );
    }
}
