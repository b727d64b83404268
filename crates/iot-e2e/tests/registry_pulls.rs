//! Images from the platform's private registry (issue 26), on the real stack:
//! docker-registry 2.8 over TLS with token authentication by `iot-registry-token`,
//! the operator pinning tags and granting pulls, and real agents whose devices
//! each have an empty podman store of their own inside a network namespace on one
//! bridge (pulls cross each device's own link).
//!
//! One stack serves every case, in order:
//! 1. **Pull and pin.** Two fresh devices pull v1 with grants over TLS and serve
//!    it; `.status.images` shows the digest. v2 pushed under the same tag changes
//!    nothing through a resync; the resolve-images annotation moves every device
//!    to v2's digest.
//! 2. **Registry down.** For a device (agent stopped while the operator resolves,
//!    then continued with the registry stopped): a readable error, backoff, v2 keeps
//!    serving, v3 once the registry is back. For the operator: a score change
//!    while the registry is stopped is `RegistryUnavailable`, and the devices keep
//!    what they run.
//! 3. **The tag moves during a rollout.** With `pause: {}` after a one-device
//!    batch, the tag is pushed again before the promotion: the remaining device
//!    gets the digest the revision was recorded with.
//! 4. **Wrong credentials.** The operator restarted with a key the registry does
//!    not trust: a Deployment naming a digest (nothing to resolve) fails on the
//!    device with an error naming the registry and the refusal, the token service
//!    sees few requests (backoff, no tight loop), and the old version serves.
//! 5. **Pacing.** Six more devices, `maxConcurrentPulls: 2`, links shaped to
//!    16 Mbit/s: the registry's own log never shows more than two devices fetching
//!    blobs at once.
//! 6. **Link cut mid-pull.** A device on a 4 Mbit/s link loses it for 8 s in the
//!    middle of a pull: the pull completes when it returns, and no broken image
//!    remains.
//! 7. **Full disk.** A device whose store and pull staging directory sit on a
//!    small filesystem gets an image that does not fit: Failed with "no space left
//!    on device while pulling", and v1 still serves.
//!
//! `IOT_REGISTRY_CASES=1,5` runs only those cases; `IOT_E2E_LOGS=1` prints logs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use harmony_reconciler_contracts::{AgentStatus, DeploymentRef, Phase};
use iot_api::conditions::DESIRED_STATE_WRITTEN;
use iot_api::rollout::BatchPause;
use iot_api::{
    Deployment, DeploymentStatus, IotScore, PROMOTE_ANNOTATION, RESOLVE_IMAGES_ANNOTATION, RolloutBatch, RolloutPhase,
    RolloutSpec,
};
use iot_e2e::registry::{
    DeviceStore, RegistryStack, SmallDisk, build_image, deployment_to, remove_local_image, web_score,
};
use iot_testkit::wait_until;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Patch, PatchParams, PostParams};

const NS: &str = "default";
/// Each case's Deployment publishes its own port: several run on one device.
const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(90);

fn score(image: &str, mode: &str) -> IotScore {
    score_on(image, mode, PORT)
}

fn score_on(image: &str, mode: &str, port: u16) -> IotScore {
    web_score(image, port, Some(mode))
}

fn deployment(name: &str, devices: &[String], score: IotScore, rollout: Option<RolloutSpec>) -> Deployment {
    deployment_to(name, devices, score, rollout)
}

async fn create(rs: &RegistryStack, dep: Deployment) -> anyhow::Result<()> {
    rs.stack.deployments(NS).create(&PostParams::default(), &dep).await?;
    Ok(())
}

async fn patch(rs: &RegistryStack, name: &str, body: serde_json::Value) -> anyhow::Result<()> {
    rs.stack
        .deployments(NS)
        .patch(name, &PatchParams::default(), &Patch::Merge(&body))
        .await?;
    Ok(())
}

async fn set_score(rs: &RegistryStack, name: &str, score: &IotScore) -> anyhow::Result<()> {
    patch(rs, name, serde_json::json!({"spec": {"score": score}})).await
}

async fn annotate(rs: &RegistryStack, name: &str, key: &str, value: &str) -> anyhow::Result<()> {
    patch(rs, name, serde_json::json!({"metadata": {"annotations": {key: value}}})).await
}

fn pinned_digest(status: &DeploymentStatus) -> Option<&str> {
    status.images.first().map(|i| i.digest.as_str())
}

fn condition<'a>(
    status: &'a DeploymentStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// Waits until device `i` serves `body` and runs the image pinned to `digest`.
async fn wait_runs(rs: &RegistryStack, i: usize, body: &str, digest: &str) -> anyhow::Result<()> {
    wait_runs_on(rs, i, body, digest, PORT).await
}

async fn wait_runs_on(rs: &RegistryStack, i: usize, body: &str, digest: &str, port: u16) -> anyhow::Result<()> {
    let d = rs.device(i);
    wait_until(
        WAIT,
        &format!("device {} serves {body} from {digest}", d.id),
        || async {
            let served = d.http_body(port).await?;
            let images = d.running_images().ok()?;
            (served.trim() == body && images.iter().any(|im| im.ends_with(&format!("@{digest}")))).then_some(())
        },
    )
    .await
}

/// The device's report for one deployment.
async fn phase_of(rs: &RegistryStack, i: usize, name: &str) -> Option<harmony_reconciler_contracts::DeploymentPhase> {
    let status: AgentStatus = rs.stack.agent_status(&rs.device(i).id).await?;
    let dep = DeploymentRef::new(NS, name).ok()?;
    status.deployments.get(&dep).cloned()
}

/// Lines of the token service's log that refused `user`.
fn refusals_for(rs: &RegistryStack, user: &str) -> usize {
    rs.token
        .log()
        .lines()
        .filter(|l| l.contains("registry token refused") && l.contains(&format!("user \\\"{user}\\\"")))
        .count()
}

struct Images {
    v1: String,
    v2: String,
    v3: String,
}

impl Drop for Images {
    fn drop(&mut self) {
        for i in [&self.v1, &self.v2, &self.v3] {
            remove_local_image(i);
        }
    }
}

fn wanted(case: u32) -> bool {
    match std::env::var("IOT_REGISTRY_CASES") {
        Ok(list) => list.split(',').any(|c| c.trim() == case.to_string()),
        Err(_) => true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn images_come_from_the_private_registry() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut rs = RegistryStack::start().await?;
    eprintln!("stack, registry and operator: {:?}", started.elapsed());
    let tag = iot_testkit::unique_id("t");
    let images = Images {
        v1: build_image(&format!("{tag}-v1"), "v1", 1)?,
        v2: build_image(&format!("{tag}-v2"), "v2", 1)?,
        v3: build_image(&format!("{tag}-v3"), "v3", 1)?,
    };
    eprintln!("bring-up: {:?}", started.elapsed());
    let mut failures: Vec<String> = Vec::new();
    let mut record = |case: &str, r: anyhow::Result<()>| {
        if let Err(e) = r {
            eprintln!("case {case} FAILED: {e:#}");
            failures.push(format!("{case}: {e:#}"));
        }
    };
    // Cases 1-4 share two devices and the `web` Deployment.
    let a = rs.add_device(DeviceStore::default()).await?;
    let b = rs.add_device(DeviceStore::default()).await?;
    if wanted(1) || wanted(2) || wanted(3) || wanted(4) {
        let t = Instant::now();
        let r = pull_and_pin(&rs, &images, [a, b]).await;
        eprintln!("case 1: {:?}", t.elapsed());
        let ok = r.is_ok();
        record("1 pull and pin", r);
        if ok && wanted(2) {
            let t = Instant::now();
            record("2 registry down", registry_down(&mut rs, &images, [a, b]).await);
            eprintln!("case 2: {:?}", t.elapsed());
        }
        if ok && wanted(3) {
            let t = Instant::now();
            record("3 tag moves mid-rollout", tag_moves(&rs, &images, [a, b]).await);
            eprintln!("case 3: {:?}", t.elapsed());
        }
        if ok && wanted(4) {
            let t = Instant::now();
            record("4 wrong credentials", wrong_credentials(&mut rs, [a, b]).await);
            eprintln!("case 4: {:?}", t.elapsed());
        }
    }
    if wanted(5) {
        let t = Instant::now();
        record("5 pacing", pacing(&mut rs).await);
        eprintln!("case 5: {:?}", t.elapsed());
    }
    if wanted(6) {
        let t = Instant::now();
        record("6 link cut mid-pull", link_cut(&mut rs).await);
        eprintln!("case 6: {:?}", t.elapsed());
    }
    if wanted(7) {
        let t = Instant::now();
        record("7 full disk", full_disk(&mut rs, &images).await);
        eprintln!("case 7: {:?}", t.elapsed());
    }
    eprintln!("total: {:?}", started.elapsed());
    anyhow::ensure!(failures.is_empty(), "failed cases:\n{}", failures.join("\n"));
    Ok(())
}

async fn pull_and_pin(rs: &RegistryStack, images: &Images, devices: [usize; 2]) -> anyhow::Result<()> {
    for &i in &devices {
        anyhow::ensure!(
            rs.device(i).image_digests()?.is_empty(),
            "device {} does not start with an empty store",
            rs.device(i).id
        );
    }
    let d1 = rs.push(&images.v1, "iot/web:stable")?;
    let ids: Vec<String> = devices.iter().map(|&i| rs.device(i).id.clone()).collect();
    let image = rs.image("iot/web:stable");
    create(rs, deployment("web", &ids, score(&image, "a"), None)).await?;
    let st = rs
        .stack
        .wait_resource_status(NS, "web", "v1 pinned", |s| pinned_digest(s) == Some(d1.as_str()))
        .await?;
    anyhow::ensure!(st.images[0].image == image, "status.images names {:?}", st.images);
    let first_revision = st.current_revision;
    for &i in &devices {
        wait_runs(rs, i, "v1", &d1).await?;
    }
    // Each device fetched the blobs itself, from its own address, with a token the
    // service issued to it.
    let log = rs.registry.completed_requests();
    for &i in &devices {
        let d = rs.device(i);
        anyhow::ensure!(
            log.iter()
                .any(|r| r.is_blob_get() && r.status == 200 && r.remote.starts_with(&format!("{}:", d.net.ns_ip))),
            "the registry's log shows no blob fetched by {} ({})",
            d.id,
            d.net.ns_ip
        );
        anyhow::ensure!(
            rs.token
                .log()
                .lines()
                .any(|l| l.contains("registry token issued") && l.contains(&d.id)),
            "the token service issued nothing to {}",
            d.id
        );
    }
    // The tag moves: nothing changes, through resyncs (every 5 s here).
    let d2 = rs.push(&images.v2, "iot/web:stable")?;
    anyhow::ensure!(d2 != d1, "v2 has v1's digest");
    tokio::time::sleep(Duration::from_secs(7)).await;
    let st = rs.stack.status_of(NS, "web").await.unwrap_or_default();
    anyhow::ensure!(
        pinned_digest(&st) == Some(d1.as_str()) && st.current_revision == first_revision,
        "a moved tag changed the deployment by itself: {:?}, revision {:?}",
        st.images,
        st.current_revision
    );
    for &i in &devices {
        wait_runs(rs, i, "v1", &d1).await?;
    }
    // A deliberate re-resolve moves every device.
    annotate(rs, "web", RESOLVE_IMAGES_ANNOTATION, "1").await?;
    let st = rs
        .stack
        .wait_resource_status(NS, "web", "v2 pinned", |s| pinned_digest(s) == Some(d2.as_str()))
        .await?;
    anyhow::ensure!(
        st.current_revision > first_revision,
        "re-resolving to new bits made no new revision"
    );
    for &i in &devices {
        wait_runs(rs, i, "v2", &d2).await?;
    }
    Ok(())
}

async fn registry_down(rs: &mut RegistryStack, images: &Images, [a, b]: [usize; 2]) -> anyhow::Result<()> {
    let d2 = rs.digest_of("iot/web:stable")?;
    let d3 = rs.push(&images.v3, "iot/web:stable")?;
    // Device b's agent sleeps while the operator resolves and a pulls.
    let pid = rs
        .stack
        .agent_pid(&rs.device(b).id)
        .ok_or_else(|| anyhow::anyhow!("no agent for b"))?;
    signal(pid, "STOP")?;
    annotate(rs, "web", RESOLVE_IMAGES_ANNOTATION, "2").await?;
    rs.stack
        .wait_resource_status(NS, "web", "v3 pinned", |s| pinned_digest(s) == Some(d3.as_str()))
        .await?;
    wait_runs(rs, a, "v3", &d3).await?;
    rs.registry.stop();
    signal(pid, "CONT")?;
    let phase = wait_until(WAIT, "b reports the unreachable registry", || async {
        phase_of(rs, b, "web")
            .await
            .filter(|p| p.last_error.as_deref().is_some_and(|e| e.contains("unreachable")))
    })
    .await?;
    let err = phase.last_error.unwrap_or_default();
    anyhow::ensure!(
        err.contains(&rs.registry.url()),
        "the error does not name the registry: {err}"
    );
    // v2 keeps serving while the registry is away.
    for _ in 0..5 {
        wait_runs(rs, b, "v2", &d2).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The operator: a new score cannot be resolved, the devices keep what they run.
    set_score(rs, "web", &score(&rs.image("iot/web:stable"), "b")).await?;
    let st = rs
        .stack
        .wait_resource_status(NS, "web", "RegistryUnavailable", |s| {
            condition(s, DESIRED_STATE_WRITTEN).is_some_and(|c| c.reason == "RegistryUnavailable")
        })
        .await?;
    let msg = condition(&st, DESIRED_STATE_WRITTEN)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    anyhow::ensure!(
        msg.contains(&rs.registry.url()),
        "the condition does not name the registry: {msg}"
    );
    anyhow::ensure!(
        pinned_digest(&st) == Some(d3.as_str()),
        "status.images moved: {:?}",
        st.images
    );
    wait_runs(rs, a, "v3", &d3).await?;
    rs.registry.restart().await?;
    // The new score resolves (to v3, the tag's digest now), and b catches up.
    rs.stack
        .wait_resource_status(NS, "web", "written after the registry returned", |s| {
            condition(s, DESIRED_STATE_WRITTEN).is_some_and(|c| c.status == "True")
        })
        .await?;
    wait_runs(rs, a, "v3", &d3).await?;
    wait_runs(rs, b, "v3", &d3).await?;
    Ok(())
}

async fn tag_moves(rs: &RegistryStack, images: &Images, [a, b]: [usize; 2]) -> anyhow::Result<()> {
    let ids = [rs.device(a).id.clone(), rs.device(b).id.clone()];
    let d1 = rs.push(&images.v1, "iot/canary:release")?;
    let rollout = RolloutSpec {
        batches: vec![
            RolloutBatch {
                pause: Some(BatchPause {}),
                ..RolloutBatch::of(IntOrString::Int(1))
            },
            RolloutBatch::of(IntOrString::Int(2)),
        ],
        ..Default::default()
    };
    let image = rs.image("iot/canary:release");
    // Revision 1 without a rollout, so that it is the last good one; then the
    // rollout and a new score together make revision 2, which rolls out in batches.
    create(rs, deployment("canary", &ids, score_on(&image, "c", 8081), None)).await?;
    for i in [a, b] {
        wait_runs_on(rs, i, "v1", &d1, 8081).await?;
    }
    let d2 = rs.push(&images.v2, "iot/canary:release")?;
    patch(
        rs,
        "canary",
        serde_json::json!({"spec": {"score": score_on(&image, "d", 8081), "rollout": rollout}}),
    )
    .await?;
    let st = rs
        .stack
        .wait_resource_status(NS, "canary", "batch 1 passed, waiting", |s| {
            s.rollout
                .as_ref()
                .is_some_and(|r| r.phase == RolloutPhase::Paused && r.batches.first().is_some_and(|b| b.succeeded == 1))
        })
        .await?;
    anyhow::ensure!(
        pinned_digest(&st) == Some(d2.as_str()),
        "revision not pinned to v2: {:?}",
        st.images
    );
    let revision = st.rollout.as_ref().map(|r| r.revision).unwrap_or_default();
    // The tag moves back to v1 mid-rollout.
    anyhow::ensure!(
        rs.push(&images.v1, "iot/canary:release")? == d1,
        "v1 pushed again has another digest"
    );
    annotate(
        rs,
        "canary",
        PROMOTE_ANNOTATION,
        &iot_api::rollout::promote_value(revision, 1),
    )
    .await?;
    rs.stack
        .wait_resource_status(NS, "canary", "rollout complete", |s| {
            s.rollout
                .as_ref()
                .is_some_and(|r| r.phase == RolloutPhase::Complete && r.revision == revision)
        })
        .await?;
    for i in [a, b] {
        let d = rs.device(i);
        let running = d.running_images()?;
        anyhow::ensure!(
            running.iter().any(|im| im.ends_with(&format!("iot/canary@{d2}"))),
            "device {} runs {running:?}, not the digest the revision was recorded with ({d2})",
            d.id
        );
    }
    rs.stack.deployments(NS).delete("canary", &Default::default()).await?;
    Ok(())
}

async fn wrong_credentials(rs: &mut RegistryStack, [a, b]: [usize; 2]) -> anyhow::Result<()> {
    let st = rs.stack.status_of(NS, "web").await.unwrap_or_default();
    let good = pinned_digest(&st)
        .ok_or_else(|| anyhow::anyhow!("web has no pinned image"))?
        .to_owned();
    let serving = rs
        .device(a)
        .http_body(PORT)
        .await
        .ok_or_else(|| anyhow::anyhow!("web does not answer"))?;
    // Restart the operator with a key the registry does not trust.
    let other = iot_launch::RegistryKeys::generate(&rs.stack.dir.path().join("other-keys"))?;
    let key_env = (
        "IOT_REGISTRY_SIGNING_KEY".to_owned(),
        other.key_pem.display().to_string(),
    );
    let saved = rs.stack.operator_env.clone();
    rs.stack.operator_env.retain(|(k, _)| k != "IOT_REGISTRY_SIGNING_KEY");
    rs.stack.operator_env.push(key_env);
    rs.stack.stop_operator();
    rs.stack.start_operator()?;
    rs.stack.wait_operator_ready().await?;
    // A digest needs no resolving: the devices' grants are what fails.
    // Bits no device has: podman finds an image by digest under any name, so v2
    // (which every device holds as iot/web) would need no pull at all.
    let fresh = build_image(&iot_testkit::unique_id("creds"), "creds", 1)?;
    let pushed = rs.push(&fresh, "iot/other:v2");
    remove_local_image(&fresh);
    let d_old = pushed?;
    let image = format!("{}/iot/other@{d_old}", rs.registry.url());
    let ids = [rs.device(a).id.clone(), rs.device(b).id.clone()];
    create(rs, deployment("creds", &ids, score_on(&image, "e", 8082), None)).await?;
    let device = rs.device(a).id.clone();
    let phase = wait_until(WAIT, "the device reports the refused credentials", || async {
        phase_of(rs, a, "creds").await.filter(|p| {
            p.last_error
                .as_deref()
                .is_some_and(|e| e.contains("refused the credentials"))
        })
    })
    .await;
    let phase = match phase {
        Ok(p) => p,
        Err(e) => anyhow::bail!("{e}; the device reports {:?}", phase_of(rs, a, "creds").await),
    };
    let err = phase.last_error.unwrap_or_default();
    anyhow::ensure!(
        err.contains(&rs.registry.url()),
        "the error does not name the registry: {err}"
    );
    // No tight loop: count the token service's refusals for this device over 20 s.
    let before = refusals_for(rs, &device);
    anyhow::ensure!(before >= 1, "the token service's log shows no refusal for {device}");
    tokio::time::sleep(Duration::from_secs(20)).await;
    let during = refusals_for(rs, &device) - before;
    anyhow::ensure!(
        during <= 6,
        "{during} refused token requests in 20 s: retries do not back off"
    );
    eprintln!("wrong credentials: {during} refused token requests in 20 s; error: {err}");
    // The old deployment keeps serving, and the restarted operator found its
    // revision without asking the registry (with this key it could not).
    wait_runs(rs, a, serving.trim(), &good).await?;
    let st = rs.stack.status_of(NS, "web").await.unwrap_or_default();
    anyhow::ensure!(
        condition(&st, DESIRED_STATE_WRITTEN).is_some_and(|c| c.status == "True")
            && pinned_digest(&st) == Some(good.as_str()),
        "the restarted operator re-resolved web: {:?}",
        condition(&st, DESIRED_STATE_WRITTEN)
    );
    rs.stack.operator_env = saved;
    rs.stack.stop_operator();
    rs.stack.start_operator()?;
    rs.stack.wait_operator_ready().await?;
    rs.stack.deployments(NS).delete("creds", &Default::default()).await?;
    Ok(())
}

async fn pacing(rs: &mut RegistryStack) -> anyhow::Result<()> {
    let big = build_image(&iot_testkit::unique_id("pace"), "paced", 4)?;
    let digest = rs.push(&big, "iot/paced:v1");
    remove_local_image(&big);
    let digest = digest?;
    let mut idx = Vec::new();
    for _ in 0..6 {
        let i = rs.add_device(DeviceStore::default()).await?;
        rs.device(i).net.throttle("16mbit")?;
        idx.push(i);
    }
    let ids: Vec<String> = idx.iter().map(|&i| rs.device(i).id.clone()).collect();
    let rollout = RolloutSpec {
        max_concurrent_pulls: Some(2),
        ..Default::default()
    };
    let since = std::time::SystemTime::now();
    let t = Instant::now();
    create(
        rs,
        deployment(
            "paced",
            &ids,
            score_on(&rs.image("iot/paced:v1"), "p", 8083),
            Some(rollout),
        ),
    )
    .await?;
    for &i in &idx {
        wait_runs_on(rs, i, "paced", &digest, 8083).await?;
    }
    let elapsed = t.elapsed();
    // The registry's view: per device, from its first blob request's start to its
    // last one's end.
    let mut spans: BTreeMap<String, (std::time::SystemTime, std::time::SystemTime)> = BTreeMap::new();
    for r in rs.registry.completed_requests() {
        if !r.is_blob_get() || r.finished < since {
            continue;
        }
        let ip = r.remote.rsplit_once(':').map(|(h, _)| h.to_owned()).unwrap_or_default();
        let e = spans.entry(ip).or_insert((r.started(), r.finished));
        e.0 = e.0.min(r.started());
        e.1 = e.1.max(r.finished);
    }
    let devices_seen = idx
        .iter()
        .filter(|&&i| spans.contains_key(&rs.device(i).net.ns_ip))
        .count();
    anyhow::ensure!(
        devices_seen == 6,
        "the registry saw blob fetches from {devices_seen} of 6 devices: {spans:?}"
    );
    let mut peak = 0;
    for (start, _) in spans.values() {
        let at_once = spans.values().filter(|(s, e)| s <= start && start < e).count();
        peak = peak.max(at_once);
    }
    eprintln!(
        "pacing: 6 devices, limit 2, {elapsed:?} to all running; at most {peak} devices fetching at once (registry log)"
    );
    anyhow::ensure!(
        peak <= 2,
        "the registry served {peak} devices at once with maxConcurrentPulls 2"
    );
    anyhow::ensure!(peak == 2, "never two devices at once: pacing serialises (peak {peak})");
    Ok(())
}

async fn link_cut(rs: &mut RegistryStack) -> anyhow::Result<()> {
    let big = build_image(&iot_testkit::unique_id("cut"), "survived", 6)?;
    let digest = rs.push(&big, "iot/cut:v1");
    remove_local_image(&big);
    let digest = digest?;
    let i = rs.add_device(DeviceStore::default()).await?;
    rs.device(i).net.throttle("4mbit")?;
    let ids = vec![rs.device(i).id.clone()];
    let since = std::time::SystemTime::now();
    create(
        rs,
        deployment("cut", &ids, score_on(&rs.image("iot/cut:v1"), "x", 8084), None),
    )
    .await?;
    // Cut once the big layer is on its way (the registry has not finished it yet,
    // and the device reports a pull in progress).
    wait_until(WAIT, "the pull is under way", || async {
        let p = phase_of(rs, i, "cut").await?;
        p.pull.as_ref().filter(|p| p.bytes_done > 512 * 1024).map(|_| ())
    })
    .await?;
    rs.device(i).net.link_down()?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    rs.device(i).net.link_up()?;
    wait_runs_on(rs, i, "survived", &digest, 8084).await?;
    let d = rs.device(i);
    // No broken or dangling image: exactly the pulled one (and podman's pause image
    // if it made one), and it reads back whole.
    let all = d.podman(&["images", "-a", "--format", "{{.Repository}}@{{.Digest}} {{.ID}}"])?;
    let dangling = d.podman(&["images", "-q", "--filter", "dangling=true"])?;
    anyhow::ensure!(dangling.trim().is_empty(), "dangling images after the cut:\n{all}");
    d.podman(&["image", "inspect", &format!("{}/iot/cut@{digest}", rs.registry.url())])?;
    let blobs = rs
        .registry
        .completed_requests()
        .into_iter()
        .filter(|r| r.is_blob_get() && r.finished >= since && r.remote.starts_with(&format!("{}:", d.net.ns_ip)))
        .count();
    eprintln!("link cut: pull completed after an 8 s cut; {blobs} blob requests from the device; images:\n{all}");
    Ok(())
}

async fn full_disk(rs: &mut RegistryStack, images: &Images) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = SmallDisk::create(dir.path(), 64)?;
    let store = DeviceStore {
        store_dir: Some(disk.mount.join("store")),
        tmp_dir: Some(disk.mount.join("tmp")),
    };
    let d1 = rs.push(&images.v1, "iot/disk:v1")?;
    let i = rs.add_device(store).await?;
    let ids = vec![rs.device(i).id.clone()];
    create(rs, deployment("disk", &ids, score(&rs.image("iot/disk:v1"), "y"), None)).await?;
    wait_runs(rs, i, "v1", &d1).await?;
    let big = build_image(&iot_testkit::unique_id("huge"), "huge", 80)?;
    let pushed = rs.push(&big, "iot/disk:v2");
    remove_local_image(&big);
    let d2 = pushed?;
    set_score(rs, "disk", &score(&format!("{}/iot/disk@{d2}", rs.registry.url()), "y")).await?;
    let phase = wait_until(WAIT, "Failed for lack of space", || async {
        phase_of(rs, i, "disk").await.filter(|p| {
            p.phase == Phase::Failed
                && p.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("no space left on device while pulling"))
        })
    })
    .await?;
    eprintln!("full disk: {}", phase.last_error.unwrap_or_default());
    for _ in 0..3 {
        wait_runs(rs, i, "v1", &d1).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Free the device before its disk goes.
    rs.stack.deployments(NS).delete("disk", &Default::default()).await?;
    let dev = rs.devices.remove(i);
    rs.stack.kill_agent(&dev.id);
    drop(dev);
    drop(disk);
    Ok(())
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?
        .success();
    anyhow::ensure!(ok, "kill -{sig} {pid} failed");
    Ok(())
}
