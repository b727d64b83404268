//! Fleets on the real stack (API server, NATS, podman, real agents): Devices with
//! labels, selector Deployments whose membership follows the labels, the shrink
//! guard, revisions, and Device status written only when it means something.

use std::time::{Duration, Instant};

use iot_api::conditions::REMOVALS_HELD;
use iot_api::{
    CONFIRM_SHRINK_ANNOTATION, Deployment, DeploymentRevision, DeploymentSpec, DeviceSelector, REVOKED_ANNOTATION,
};
use iot_e2e::stack::*;
use iot_testkit::wait_until;
use kube::api::{ListParams, Patch, PatchParams};

fn site(value: &str) -> DeviceSelector {
    DeviceSelector {
        match_labels: [("site".to_owned(), value.to_owned())].into(),
        ..Default::default()
    }
}

async fn apply(stack: &Stack, name: &str, spec: DeploymentSpec) -> anyhow::Result<()> {
    let dep = Deployment::new(name, spec);
    stack
        .deployments("default")
        .patch(name, &PatchParams::apply("fleets-test").force(), &Patch::Apply(&dep))
        .await?;
    Ok(())
}

async fn wait_containers(c: &iot_testkit::podman::DeviceContainers, running: bool, what: &str) -> anyhow::Result<()> {
    wait_until(WAIT, what, || async {
        (c.running_ids().is_empty() != running).then_some(())
    })
    .await
}

fn held(s: &iot_api::DeploymentStatus) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    s.conditions.iter().find(|c| c.type_ == REMOVALS_HELD)
}

#[tokio::test]
async fn membership_follows_labels_and_a_large_shrink_waits_for_a_confirmation() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    stack.start_operator()?;
    let (a, a_ctr) = stack.start_agent()?;
    let (b, b_ctr) = stack.start_agent()?;
    stack.register_device(&a, &[("site", "madrid")]).await?;
    stack.register_device(&b, &[("site", "paris")]).await?;
    // The guard off at first: this part takes devices off one by one, which would
    // add up to a large shrink within the guard's window.
    let mut spec = DeploymentSpec::for_selector(site("madrid"), web_score("localhost/iot-web:v1", "a"));
    spec.max_shrink_percent = Some(100);
    apply(&stack, "web", spec).await?;
    wait_containers(&a_ctr, true, "the madrid device runs it").await?;
    stack
        .wait_resource_status("default", "web", "one matched", |s| {
            s.matched_devices == Some(1) && s.aggregate.as_ref().is_some_and(|a| a.succeeded == 1 && a.targets == 1)
        })
        .await?;
    assert!(b_ctr.ids().is_empty(), "the paris device runs nothing");

    // Labelled into the set: it gets the deployment, with no edit of the Deployment.
    stack.label_device(&b, "site", Some("madrid")).await?;
    wait_containers(&b_ctr, true, "the relabelled device runs it").await?;
    // A new device, registered with the label: it gets it too.
    let (c, c_ctr) = stack.start_agent()?;
    stack.register_device(&c, &[("site", "madrid")]).await?;
    wait_containers(&c_ctr, true, "a new madrid device runs it").await?;
    stack
        .wait_resource_status("default", "web", "three succeeded", |s| {
            s.matched_devices == Some(3) && s.aggregate.as_ref().is_some_and(|a| a.succeeded == 3)
        })
        .await?;

    // Labelled out (one device of three): the key goes and the agent removes it.
    stack.label_device(&a, "site", None).await?;
    wait_containers(&a_ctr, false, "the device labelled out stops running it").await?;
    wait_until(WAIT, "a's container removed", || async {
        a_ctr.ids().is_empty().then_some(())
    })
    .await?;
    // Revoked: it is no longer selected either.
    stack
        .devices()
        .patch(
            &c,
            &PatchParams::default(),
            &Patch::Merge(
                &serde_json::json!({"metadata": {"annotations": {REVOKED_ANNOTATION: "2027-01-01T00:00:00Z"}}}),
            ),
        )
        .await?;
    wait_containers(&c_ctr, false, "a revoked device stops running it").await?;

    // A second deployment on b and a third device d: then a typo in the selector
    // would take it off both at once (100 %): held, with a condition.
    let (d, d_ctr) = stack.start_agent()?;
    stack.register_device(&d, &[("site", "madrid")]).await?;
    wait_containers(&d_ctr, true, "d runs it").await?;
    let dep_ref = harmony_reconciler_contracts::DeploymentRef::new("default", "web")?;
    let before = stack.keys_of(&dep_ref).await?;
    assert_eq!(before.len(), 2, "{before:?}");
    apply(
        &stack,
        "web",
        DeploymentSpec::for_selector(site("madird"), web_score("localhost/iot-web:v1", "a")),
    )
    .await?;
    let st = stack
        .wait_resource_status("default", "web", "removals held", |s| {
            held(s).is_some_and(|c| c.status == "True") && s.matched_devices == Some(0)
        })
        .await?;
    let message = held(&st).map(|c| c.message.clone()).unwrap_or_default();
    assert!(message.contains("2 more"), "{message}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(stack.keys_of(&dep_ref).await?.len(), 2, "nothing removed while held");
    assert!(!b_ctr.running_ids().is_empty() && !d_ctr.running_ids().is_empty());
    // A person confirms with the token the condition names.
    let token = message
        .split(&format!("{CONFIRM_SHRINK_ANNOTATION}="))
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .ok_or_else(|| anyhow::anyhow!("no token in {message}"))?;
    stack
        .deployments("default")
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"metadata": {"annotations": {CONFIRM_SHRINK_ANNOTATION: token}}})),
        )
        .await?;
    wait_containers(&b_ctr, false, "confirmed removal reaches b").await?;
    wait_containers(&d_ctr, false, "confirmed removal reaches d").await?;
    stack
        .wait_resource_status("default", "web", "nothing held", |s| {
            held(s).is_some_and(|c| c.status == "False")
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn an_empty_selector_deploys_nowhere() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    stack.start_operator()?;
    let (a, a_ctr) = stack.start_agent()?;
    stack.register_device(&a, &[("site", "madrid")]).await?;
    apply(
        &stack,
        "web",
        DeploymentSpec::for_selector(DeviceSelector::default(), web_score("localhost/iot-web:v1", "a")),
    )
    .await?;
    stack
        .wait_resource_status("default", "web", "matched nothing", |s| s.matched_devices == Some(0))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(a_ctr.ids().is_empty());
    assert!(
        stack
            .keys_of(&harmony_reconciler_contracts::DeploymentRef::new("default", "web")?)
            .await?
            .is_empty()
    );
    Ok(())
}

async fn revisions(stack: &Stack) -> anyhow::Result<Vec<(u64, String)>> {
    let api: kube::Api<DeploymentRevision> = kube::Api::namespaced(stack.kube.clone(), "default");
    let mut list: Vec<(u64, String)> = api
        .list(&ListParams::default().labels("iot.nationtech.io/deployment=web"))
        .await?
        .items
        .into_iter()
        .map(|r| (r.spec.revision, r.spec.spec_hash))
        .collect();
    list.sort();
    Ok(list)
}

#[tokio::test]
async fn every_score_change_is_a_revision_and_undo_makes_a_new_one() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    stack.start_operator()?;
    let (dev, _ctr) = stack.start_agent()?;
    let mut spec = DeploymentSpec::for_devices([dev.clone()], web_score("localhost/iot-web:v1", "one"));
    spec.revision_history_limit = Some(3);
    let mut hashes = Vec::new();
    for (i, (image, mode)) in [
        ("localhost/iot-web:v1", "one"),
        ("localhost/iot-web:v2", "two"),
        ("localhost/iot-web:v1", "three"),
    ]
    .into_iter()
    .enumerate()
    {
        spec.score = web_score(image, mode);
        hashes.push(spec.score.spec_hash().to_string());
        apply(&stack, "web", spec.clone()).await?;
        let n = i as u64 + 1;
        stack
            .wait_resource_status("default", "web", &format!("running revision {n}"), |s| {
                s.current_revision == Some(n)
                    && s.aggregate.as_ref().is_some_and(|a| {
                        a.revision == Some(n) && a.revision_summary.as_deref() == Some(&format!("1/1 on rev {n}"))
                    })
            })
            .await?;
    }
    let st = stack.status_of("default", "web").await.expect("status");
    assert_eq!(st.aggregate.as_ref().and_then(|a| a.last_good_revision), Some(3));
    assert_eq!(
        revisions(&stack).await?,
        vec![(1, hashes[0].clone()), (2, hashes[1].clone()), (3, hashes[2].clone())]
    );
    // Undo to revision 1, as `iotctl rollout undo --to-revision 1` does: its score
    // goes back into the Deployment, and the operator records it as revision 4.
    let mut cmd = std::process::Command::new(iot_testkit::cargo_bin("iotctl")?);
    cmd.env("KUBECONFIG", stack.kubeconfig())
        .args(["rollout", "undo", "default/web", "--to-revision", "1"]);
    run_ok(cmd)?;
    let back = stack.deployments("default").get("web").await?;
    assert_eq!(back.spec.score.spec_hash().to_string(), hashes[0]);
    stack
        .wait_resource_status("default", "web", "revision 4 everywhere", |s| {
            s.current_revision == Some(4) && s.aggregate.as_ref().is_some_and(|a| a.last_good_revision == Some(4))
        })
        .await?;
    // The limit (3) pruned the oldest.
    assert_eq!(
        revisions(&stack).await?,
        vec![(2, hashes[1].clone()), (3, hashes[2].clone()), (4, hashes[0].clone())]
    );
    // The device reports the revision it runs.
    let report = stack.agent_status(&dev).await.expect("report");
    let phase = report.deployments.values().next().expect("phase");
    assert_eq!(phase.revision, Some(4));
    // Deleting the Deployment removes its revisions too.
    stack.deployments("default").delete("web", &Default::default()).await?;
    wait_until(WAIT, "revisions gone", || async {
        revisions(&stack).await.ok().filter(|r| r.is_empty()).map(|_| ())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn device_status_follows_reports_on_the_servers_clock_and_stays_quiet_when_idle() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    stack.operator_env.push(("IOT_STALE_AFTER".into(), "6s".into()));
    stack
        .operator_env
        .push(("IOT_DEVICE_LAST_SEEN_EVERY".into(), "20s".into()));
    stack.start_operator()?;
    // A device whose clock runs an hour ahead: judged by when its reports arrive.
    let early = stack.start_agent_with_clock("early", "+1h")?;
    stack.register_device(&early, &[("site", "lab")]).await?;
    // Reporting, but never registered: listed as such, never created.
    let (stranger, _s) = stack.start_agent()?;
    let online = |d: &iot_api::Device| {
        d.status.as_ref().is_some_and(|s| {
            s.conditions.iter().any(|c| c.type_ == "Online" && c.status == "True")
                && s.conditions
                    .iter()
                    .any(|c| c.type_ == "RuntimeReady" && c.status == "True")
        })
    };
    let dev = wait_until(WAIT, "the device online", || async {
        stack.devices().get(&early).await.ok().filter(online)
    })
    .await?;
    let st = dev.status.clone().expect("status");
    let seen = st.last_seen_at.expect("last seen");
    assert!(
        (chrono::Utc::now() - seen).num_minutes().abs() < 5,
        "lastSeenAt is the server's time, not the device's: {seen}"
    );
    assert!(st.inventory.as_ref().is_some_and(|i| !i.arch.is_empty()), "{st:?}");
    assert!(st.agent_version.is_some());
    assert_eq!(
        dev.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("site"))
            .map(String::as_str),
        Some("lab")
    );
    // kubectl's printer columns.
    let (ok, out, err) = stack.api.kubectl(&["get", "devices", "-l", "site=lab"], None)?;
    assert!(ok, "{err}");
    let header = out.lines().next().unwrap_or_default();
    for column in ["ONLINE", "ARCH", "AGENT", "RUNNING", "FAILED", "LAST-SEEN"] {
        assert!(header.contains(column), "{out}");
    }
    assert!(out.contains(&early) && out.contains("True"), "{out}");
    let (ok, out, _) = stack.api.kubectl(&["explain", "device.spec.paused"], None)?;
    assert!(ok && out.contains("rollout"), "{out}");

    // Idle: heartbeats every second, and no status write beyond one lastSeenAt
    // refresh per 20 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let writes = |text: &str, kind: &str| {
        metric(
            text,
            &format!("iot_operator_device_status_writes_total{{kind=\"{kind}\",result=\"ok\"}}"),
        )
    };
    let m0 = stack.operator_metrics().await?;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(25)).await;
    let m1 = stack.operator_metrics().await?;
    let changes = writes(&m1, "change") - writes(&m0, "change");
    let refreshes = writes(&m1, "refresh") - writes(&m0, "refresh");
    eprintln!(
        "idle for {:?}: {changes} change writes, {refreshes} refreshes",
        t0.elapsed()
    );
    assert_eq!(changes, 0.0, "an idle device causes no status changes");
    assert!(refreshes <= 2.0, "{refreshes} refreshes in 25 s at one per 20 s");
    assert!(metric(&m1, "iot_operator_unregistered_devices") >= 1.0, "{m1}");
    assert!(
        stack.devices().get_opt(&stranger).await?.is_none(),
        "never created on its own say-so"
    );

    // Silent: offline within the window (6 s) plus a pass, by the server's clock.
    stack.kill_agent(&early);
    let t = Instant::now();
    wait_until(WAIT, "the device offline", || async {
        stack.devices().get(&early).await.ok().filter(|d| {
            d.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Online" && c.status == "False" && c.reason == "Silent")
            })
        })
    })
    .await?;
    eprintln!("offline {:?} after the agent stopped", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(30));
    Ok(())
}

#[tokio::test]
async fn nothing_in_a_report_reaches_a_devices_labels_or_spec() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    stack.start_operator()?;
    let (a, _a) = stack.start_agent()?;
    let (b, _b) = stack.start_agent()?;
    stack.register_device(&a, &[("site", "madrid")]).await?;
    stack.register_device(&b, &[("site", "paris")]).await?;
    wait_until(WAIT, "a reports", || async {
        stack
            .devices()
            .get(&a)
            .await
            .ok()
            .and_then(|d| d.status.and_then(|s| s.last_seen_at))
    })
    .await?;
    stack.kill_agent(&a);
    // What a device controls is its own report: make it claim labels, a spec, and
    // to be b, under a's key.
    let key = harmony_reconciler_contracts::agent_status_key(&harmony_reconciler_contracts::Id::new(a.as_str())?);
    let mut forged = serde_json::to_value(stack.agent_status(&a).await.expect("report"))?;
    forged["labels"] = serde_json::json!({"site": "paris", "tenant": "other"});
    forged["spec"] = serde_json::json!({"paused": true});
    forged["metadata"] = serde_json::json!({"labels": {"site": "paris"}});
    stack.status.put(&key, serde_json::to_vec(&forged)?.into()).await?;
    forged["device_id"] = serde_json::json!(b);
    stack.status.put(&key, serde_json::to_vec(&forged)?.into()).await?;
    let key_b = harmony_reconciler_contracts::agent_status_key(&harmony_reconciler_contracts::Id::new(b.as_str())?);
    forged["device_id"] = serde_json::json!(a);
    stack.status.put(&key_b, serde_json::to_vec(&forged)?.into()).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    for (id, site) in [(&a, "madrid"), (&b, "paris")] {
        let d = stack.devices().get(id).await?;
        let labels = d.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("site").map(String::as_str), Some(site), "{id}: {labels:?}");
        assert!(!labels.contains_key("tenant"));
        assert!(!d.spec.paused, "{id}");
    }
    Ok(())
}

#[tokio::test]
async fn a_paused_device_keeps_what_it_runs_until_resumed() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    stack.start_operator()?;
    let (a, a_ctr) = stack.start_agent()?;
    let (b, _b) = stack.start_agent()?;
    stack.register_device(&a, &[("site", "lab")]).await?;
    stack.register_device(&b, &[("site", "lab")]).await?;
    apply(
        &stack,
        "web",
        DeploymentSpec::for_selector(site("lab"), web_score("localhost/iot-web:v1", "one")),
    )
    .await?;
    stack
        .wait_resource_status("default", "web", "both run v1", |s| {
            s.aggregate.as_ref().is_some_and(|a| a.succeeded == 2)
        })
        .await?;
    let pause = |paused: bool| serde_json::json!({"spec": {"paused": paused}});
    stack
        .devices()
        .patch(&b, &PatchParams::default(), &Patch::Merge(&pause(true)))
        .await?;
    // Give the reflector the pause before the spec changes.
    wait_until(WAIT, "paused seen", || async {
        stack.devices().get(&b).await.ok().filter(|d| d.spec.paused).map(|_| ())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let two = web_score("localhost/iot-web:v1", "two");
    let hash = two.spec_hash();
    apply(&stack, "web", DeploymentSpec::for_selector(site("lab"), two)).await?;
    stack
        .wait_resource_status("default", "web", "a on the new spec, b pending", |s| {
            s.aggregate.as_ref().is_some_and(|a| a.succeeded == 1 && a.pending == 1)
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let on = |device: &str| {
        let device = device.to_owned();
        let stack = &stack;
        async move {
            stack
                .agent_status(&device)
                .await
                .and_then(|r| r.deployments.values().next().and_then(|p| p.spec_hash.clone()))
        }
    };
    assert_eq!(on(&a).await.as_ref(), Some(&hash));
    assert_ne!(on(&b).await.as_ref(), Some(&hash), "a paused device got the change");
    // Labelled out while paused: it keeps it too.
    stack.label_device(&b, "site", None).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(on(&b).await.is_some(), "a paused device lost its deployment");
    // Resumed (and labelled back): it catches up.
    stack.label_device(&b, "site", Some("lab")).await?;
    stack
        .devices()
        .patch(&b, &PatchParams::default(), &Patch::Merge(&pause(false)))
        .await?;
    stack
        .wait_resource_status("default", "web", "both on the new spec", |s| {
            s.aggregate.as_ref().is_some_and(|a| a.succeeded == 2)
        })
        .await?;
    // A deleted Device is no longer selected: its container goes.
    stack.devices().delete(&a, &Default::default()).await?;
    wait_containers(&a_ctr, false, "a deleted Device's container goes").await?;
    stack
        .wait_resource_status("default", "web", "one target left", |s| s.matched_devices == Some(1))
        .await?;
    Ok(())
}
