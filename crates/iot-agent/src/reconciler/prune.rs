//! Removing images the device no longer needs, so upgrades do not fill its disk.
//!
//! The policy: for each repository (`registry/path`, without tag or digest) that
//! some desired deployment of this device names, keep the images its containers
//! run (running or not), the image each container says it replaced (the previous
//! version, for a rollback by hand; [`crate::labels::PREVIOUS_IMAGE`], so it
//! survives an agent restart) and the images the desired state names; remove the
//! other images of those repositories. Images of any other repository (a person's
//! own, the pause image, other tools') are never touched, nor images that also
//! carry a name outside those repositories, nor images of repositories that do
//! not name a registry: `localhost/...` was built or loaded on the host and no
//! pull brings it back (a host shared by several agents, as in tests, keeps its
//! fixtures), and podman stores a bare `nginx` under another name anyway.
//!
//! The choice is the pure [`images_to_prune`]; the reconciler runs it once after
//! the desired state was first read in full and after each completed replacement,
//! outside the action loop, and retries removals that failed later.

use std::collections::BTreeSet;

use crate::plan::ImageRef;
use crate::runtime::{ObservedContainer, StoredImage};

/// The images of `images` to remove, given the image references the desired state
/// names and this device's containers.
pub fn images_to_prune<'i>(
    desired_images: &BTreeSet<String>,
    containers: &[ObservedContainer],
    images: &'i [StoredImage],
) -> Vec<&'i StoredImage> {
    let repositories: BTreeSet<&str> = desired_images.iter().map(|i| ImageRef::parse(i).repository).collect();
    let kept: BTreeSet<&str> = containers
        .iter()
        .flat_map(|c| [Some(c.image.id.as_str()), c.previous_image.as_deref()])
        .flatten()
        .filter(|id| !id.is_empty())
        .collect();
    images
        .iter()
        .filter(|image| {
            let names: Vec<ImageRef<'_>> = image
                .tags
                .iter()
                .chain(&image.repo_digests)
                .map(|n| ImageRef::parse(n))
                .collect();
            !names.is_empty()
                && names
                    .iter()
                    .all(|n| repositories.contains(n.repository) && from_registry(n.repository))
                && !kept.contains(image.id.as_str())
                && !desired_images.iter().any(|d| names_image(d, image))
        })
        .collect()
}

/// Whether a registry serves `repository`: it names one, and not `localhost`.
fn from_registry(repository: &str) -> bool {
    crate::runtime::credential_host(repository).is_some()
}

/// Whether the reference `desired` names `image`: one of its tags or repo digests,
/// or a digest reference to its digest within one of its repositories.
fn names_image(desired: &str, image: &StoredImage) -> bool {
    if image.tags.iter().chain(&image.repo_digests).any(|n| n == desired) {
        return true;
    }
    let r = ImageRef::parse(desired);
    r.digest.is_some_and(|d| {
        image.digest.as_deref() == Some(d)
            && image
                .tags
                .iter()
                .chain(&image.repo_digests)
                .any(|n| ImageRef::parse(n).repository == r.repository)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{ContainerImage, ContainerState};

    fn image(id: &str, tags: &[&str]) -> StoredImage {
        let repo_digests = tags
            .iter()
            .map(|t| format!("{}@sha256:{id}", ImageRef::parse(t).repository))
            .collect();
        StoredImage {
            id: id.into(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            repo_digests,
            digest: Some(format!("sha256:{id}")),
        }
    }

    fn container(image_id: &str, previous: Option<&str>, state: ContainerState) -> ObservedContainer {
        ObservedContainer {
            id: format!("c-{image_id}"),
            name: "n".into(),
            deployment: "default/web".parse().ok(),
            service: "web".into(),
            service_hash: "h".into(),
            revision: None,
            state,
            image: ContainerImage {
                name: "r:5000/iot/web:x".into(),
                id: image_id.into(),
                ..Default::default()
            },
            previous_image: previous.map(str::to_owned),
        }
    }

    fn pruned(desired: &[&str], containers: &[ObservedContainer], images: &[StoredImage]) -> Vec<String> {
        let desired = desired.iter().map(|d| (*d).to_owned()).collect();
        images_to_prune(&desired, containers, images)
            .into_iter()
            .map(|i| i.id.clone())
            .collect()
    }

    #[test]
    fn only_the_running_and_the_previous_version_of_a_desired_repository_stay() {
        let images = [
            image("a1", &["r:5000/iot/web:v1"]),
            image("a2", &["r:5000/iot/web:v2"]),
            image("a3", &["r:5000/iot/web:v3"]),
            image("a0", &[]),
            image("b1", &["r:5000/iot/other:v1"]),
            image("p", &["localhost/podman-pause:4.3.1-0"]),
        ];
        // v3 runs; it replaced v2.
        let running = [container("a3", Some("a2"), ContainerState::Running)];
        assert_eq!(pruned(&["r:5000/iot/web:v3"], &running, &images), ["a1"]);
        // Pinned to v3's digest: the same.
        assert_eq!(pruned(&["r:5000/iot/web@sha256:a3"], &running, &images), ["a1"]);
        // A stopped container's image is in use too; no label: no previous.
        let stopped = [container("a3", None, ContainerState::Exited { code: 0 })];
        assert_eq!(pruned(&["r:5000/iot/web:v3"], &stopped, &images), ["a1", "a2"]);
        // The desired image is kept before any container runs it (pulled, waiting).
        assert_eq!(pruned(&["r:5000/iot/web:v2"], &[], &images), ["a1", "a3"]);
        assert_eq!(pruned(&["r:5000/iot/web@sha256:a2"], &[], &images), ["a1", "a3"]);
        // No desired state names a repository: nothing is touched.
        assert!(pruned(&[], &running, &images).is_empty());
    }

    #[test]
    fn images_built_on_the_host_are_never_removed() {
        let images = [
            image("l1", &["localhost/iot-web:v1"]),
            image("l2", &["localhost/iot-web:v2"]),
        ];
        let running = [container("l2", None, ContainerState::Running)];
        assert!(pruned(&["localhost/iot-web:v2"], &running, &images).is_empty());
        let bare = [image("n1", &["nginx:1"]), image("n2", &["nginx:2"])];
        assert!(pruned(&["nginx:2"], &[], &bare).is_empty());
    }

    #[test]
    fn an_image_that_also_has_a_name_of_someone_else_stays() {
        let images = [
            image("a1", &["r:5000/iot/web:v1", "localhost/mine:keep"]),
            image("a2", &["r:5000/iot/web:v2"]),
        ];
        assert!(pruned(&["r:5000/iot/web:v2"], &[], &images).is_empty());
    }
}
