//! Issue 26 against real podman: the operator's move from tags to digests restarts
//! nothing, and old images of the device's repositories are pruned.
//!
//! No registry is needed: podman 4.3.1 gives locally built and tagged images a
//! `Digest` and a `RepoDigests` entry per repository, as it does pulled ones, and
//! the images here are tagged with a registry's name (`10.77.0.1:5000/...`) that
//! nothing ever pulls from, in a repository of each test's own.

mod common;

use common::*;
use harmony_reconciler_contracts::Phase;
use iot_testkit::{free_port, podman::podman_cli, unique_id, wait_until};

/// Image names this test made; removed on drop (after the containers, when
/// declared before the device's guard).
struct Images(Vec<String>);

impl Drop for Images {
    fn drop(&mut self) {
        for name in &self.0 {
            if let Err(e) = podman_cli(&["rmi", "-f", name]) {
                eprintln!("removing test image {name}: {e}");
            }
        }
    }
}

fn exists(image: &str) -> bool {
    podman_cli(&["image", "exists", image]).is_ok()
}

#[tokio::test]
async fn pinning_the_running_tag_to_its_digest_keeps_the_container() -> anyhow::Result<()> {
    let repo = format!("10.77.0.1:5000/{}/web", unique_id("pin"));
    let tagged = format!("{repo}:v1");
    let _images = Images(vec![tagged.clone()]);
    podman_cli(&["tag", "localhost/iot-web:v1", &tagged])?;
    let stack = Stack::start().await?;
    let (dev, guard) = device();
    let _agent = Agent::spawn(&stack, &dev)?;
    let web = dep("default", "web");
    let port = free_port()?;

    let h1 = stack.put(&dev, &web, &web_score(&tagged, port)).await?;
    stack.wait_phase(&dev, &web, Phase::Running, Some(&h1)).await?;
    let before = guard.running_ids();
    assert_eq!(before.len(), 1);

    let digest = podman_cli(&["image", "inspect", "--format", "{{.Digest}}", &tagged])?;
    let pinned = format!("{repo}@{}", digest.trim());
    let h2 = stack.put(&dev, &web, &web_score(&pinned, port)).await?;
    assert_ne!(h1, h2);
    let status = stack.wait_phase(&dev, &web, Phase::Running, Some(&h2)).await?;
    // A few more passes to misbehave in.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(guard.running_ids(), before, "the pinned container was replaced");
    assert!(
        !status.recent_events.iter().any(|e| e.message.contains("replaced")),
        "{:?}",
        status.recent_events
    );
    wait_http(port, "v1").await?;

    // Another digest of the same repository is an upgrade.
    let h3 = stack.put(&dev, &web, &web_score("localhost/iot-web:v2", port)).await?;
    stack.wait_phase(&dev, &web, Phase::Running, Some(&h3)).await?;
    assert_ne!(guard.running_ids(), before);
    Ok(())
}

#[tokio::test]
async fn after_two_upgrades_only_the_running_and_the_previous_image_remain() -> anyhow::Result<()> {
    let id = unique_id("prune");
    let repo = format!("10.77.0.1:5000/{id}/web");
    let version = |v: &str| format!("{repo}:{v}");
    // Until the test lets go of it, each version also has a name of a repository
    // no desired state names, which keeps it from being pruned too early.
    let hold = |v: &str| format!("localhost/{id}-hold:{v}");
    let unrelated = format!("10.77.0.1:5000/{id}/other:v1");
    let mut names = vec![unrelated.clone()];
    for v in ["v1", "v2", "v3"] {
        names.extend([version(v), hold(v)]);
    }
    let _images = Images(names);
    let dir = tempfile::tempdir()?;
    for (v, name) in [
        ("v1", version("v1")),
        ("v2", version("v2")),
        ("v3", version("v3")),
        ("other", unrelated.clone()),
    ] {
        std::fs::write(
            dir.path().join("Containerfile"),
            format!("FROM localhost/iot-web:v1\nLABEL test={id}-{v}\n"),
        )?;
        let context = dir.path().to_string_lossy();
        let held = hold(v);
        let mut args = vec!["build", "-q", "--pull=never", "-t", &name];
        if v != "other" {
            args.extend(["-t", &held]);
        }
        args.push(&context);
        podman_cli(&args)?;
    }
    let untag = |v: &str| podman_cli(&["untag", &version(v), &hold(v)]).map(drop);

    let stack = Stack::start().await?;
    let (dev, _guard) = device();
    let _agent = Agent::spawn(&stack, &dev)?;
    let web = dep("default", "web");
    let port = free_port()?;
    for v in ["v1", "v2", "v3"] {
        let h = stack.put(&dev, &web, &web_score(&version(v), port)).await?;
        stack.wait_phase(&dev, &web, Phase::Running, Some(&h)).await?;
        // Running: in use, so no longer in need of the hold.
        untag(v)?;
    }
    // The replacement by v3 is followed by pruning: v1 goes.
    wait_until(WAIT, "v1 pruned", || async { (!exists(&version("v1"))).then_some(()) }).await?;
    assert!(exists(&version("v3")), "the running image");
    assert!(exists(&version("v2")), "the previous image");
    assert!(exists(&unrelated), "an image of a repository no deployment names");
    assert!(exists("localhost/iot-web:v1"), "the base image");
    Ok(())
}
