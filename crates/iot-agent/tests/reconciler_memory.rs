//! The reconciler's bookkeeping (phases, events, backoff, pulls, replacements,
//! restart accounting) with the in-memory runtime. Podman behaviour itself is covered
//! by agent_e2e against real podman.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use harmony_reconciler_contracts::*;
use iot_agent::memory_runtime::MemoryRuntime;
use iot_agent::reconciler::{Reconciler, ReconcilerConfig, Report, failure_backoff, rollback_backoff};
use iot_agent::runtime::ContainerState;
use iot_nats::DesiredView;
use tokio::sync::watch;

fn dep(name: &str) -> DeploymentRef {
    DeploymentRef::new("default", name).expect("valid")
}

fn payload(name: &str, image: &str) -> Bytes {
    payload_with(name, serde_json::json!({"name": "web", "image": image}))
}

fn payload_with(name: &str, service: serde_json::Value) -> Bytes {
    let score: IotScore =
        serde_json::from_value(serde_json::json!({"PodmanV0": {"services": [service]}})).expect("score");
    Bytes::from(DesiredState::new(dep(name), score).to_bytes())
}

/// A payload of revision `revision` of `name`'s score with these services.
fn payload_rev(name: &str, services: serde_json::Value, revision: u64) -> Bytes {
    let score: IotScore =
        serde_json::from_value(serde_json::json!({"PodmanV0": {"services": services}})).expect("score");
    Bytes::from(DesiredState::new(dep(name), score).with_revision(revision).to_bytes())
}

fn web_rev(image: &str, revision: u64) -> Bytes {
    payload_rev("web", serde_json::json!([{"name": "web", "image": image}]), revision)
}

fn view(entries: &[(&str, Bytes)]) -> DesiredView {
    DesiredView {
        entries: entries
            .iter()
            .map(|(n, b)| (dep(n), b.clone()))
            .collect::<BTreeMap<_, _>>(),
        synced: true,
        ..Default::default()
    }
}

fn setup_with(rt: MemoryRuntime) -> (Reconciler<MemoryRuntime>, MemoryRuntime, watch::Receiver<Report>) {
    let (tx, rx) = watch::channel(Report::default());
    let config = ReconcilerConfig {
        device: Id::new("dev1").expect("id"),
        event_capacity: 16,
        settle: Duration::from_secs(1),
        runtime_name: "memory".into(),
    };
    (Reconciler::new(rt.clone(), config, tx), rt, rx)
}

fn setup(images: &[&str]) -> (Reconciler<MemoryRuntime>, MemoryRuntime, watch::Receiver<Report>) {
    setup_with(MemoryRuntime::with_images(images))
}

fn phase(rx: &watch::Receiver<Report>, name: &str) -> DeploymentPhase {
    rx.borrow().deployments[&dep(name)].clone()
}

/// Runs passes, feeding each finished pull back, until a pass starts no pull.
async fn settle_pulls(rec: &mut Reconciler<MemoryRuntime>, v: &DesiredView) {
    for _ in 0..10 {
        if rec.reconcile(v).await.pulls_started == 0 {
            return;
        }
        let outcome = rec.next_pull().await.expect("pull outcome");
        rec.pull_finished(outcome);
    }
    panic!("pulls never settled");
}

#[test]
fn backoffs_grow_and_cap() {
    let secs: Vec<u64> = (1..=9).map(|n| failure_backoff(n).as_secs()).collect();
    assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    let secs: Vec<u64> = (1..=7).map(|n| rollback_backoff(n).as_secs()).collect();
    assert_eq!(secs, [30, 60, 120, 240, 480, 600, 600]);
}

#[tokio::test(start_paused = true)]
async fn a_missing_image_is_pulled_in_the_background_and_a_failed_pull_is_reported() {
    let (mut rec, rt, rx) = setup(&[]);
    let v = view(&[("web", payload("web", "missing:1"))]);
    let first = rec.reconcile(&v).await;
    assert_eq!(first.pulls_started, 1);
    assert_eq!(phase(&rx, "web").phase, Phase::Pending);
    assert!(
        phase(&rx, "web")
            .detail
            .is_some_and(|d| d.contains("pulling image missing:1"))
    );

    let outcome = rec.next_pull().await.expect("pull outcome");
    rec.pull_finished(outcome);
    rec.reconcile(&v).await;
    let p = phase(&rx, "web");
    assert_eq!(p.phase, Phase::Failed);
    let err = p.last_error.expect("error");
    assert!(
        err.contains("image missing:1 not found in registry (from registries.conf): missing:1: manifest unknown"),
        "{err}"
    );

    // Within the pull backoff nothing is pulled again; after it, it is. An image
    // the registry does not have waits a minute, not a second.
    let pulls = |rt: &MemoryRuntime| rt.calls().iter().filter(|c| c.starts_with("pull")).count();
    rec.reconcile(&v).await;
    assert_eq!(pulls(&rt), 1);
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(rec.reconcile(&v).await.pulls_started, 0);
    tokio::time::advance(Duration::from_secs(31)).await;
    let again = rec.reconcile(&v).await;
    assert_eq!(again.pulls_started, 1);
    let errors = rx
        .borrow()
        .events
        .iter()
        .filter(|e| e.severity == Severity::Error)
        .count();
    assert_eq!(errors, 1, "the same error is reported once: {:?}", rx.borrow().events);
}

#[tokio::test(start_paused = true)]
async fn a_slow_pull_does_not_hold_up_other_deployments() {
    let rt = MemoryRuntime::with_images(&["here:1"]).with_pullable(&["far:1"], Duration::from_secs(300));
    let (mut rec, rt, rx) = setup_with(rt);
    let v = view(&[
        ("slow", payload("slow", "far:1")),
        ("quick", payload("quick", "here:1")),
    ]);
    rec.reconcile(&v).await;
    assert_eq!(phase(&rx, "quick").phase, Phase::Running, "created while the pull runs");
    assert_eq!(phase(&rx, "slow").phase, Phase::Pending);
    assert_eq!(rt.containers().len(), 1);
    let outcome = rec.next_pull().await.expect("pull outcome");
    assert!(outcome.result.is_ok());
    rec.pull_finished(outcome);
    rec.reconcile(&v).await;
    assert_eq!(phase(&rx, "slow").phase, Phase::Running);
    assert_eq!(rt.containers().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_upgrade_to_a_missing_image_keeps_the_old_container_running() {
    let (mut rec, rt, rx) = setup(&["img:1"]);
    rec.reconcile(&view(&[("web", payload("web", "img:1"))])).await;
    let old = rt.containers();
    assert_eq!(old.len(), 1);

    let v2 = view(&[("web", payload("web", "img:typo"))]);
    settle_pulls(&mut rec, &v2).await;
    assert_eq!(rt.containers(), old, "the working container was touched");
    let p = phase(&rx, "web");
    assert_eq!(p.phase, Phase::Failed);
    assert!(p.last_error.is_some_and(|e| e.contains("img:typo")));
}

/// Podman 4.3.1's answer to a pull with a wrong password (docker-registry 2.8.2).
const REFUSED: &str = "initializing source docker://registry.example:5000/web:2: reading manifest 2 in registry.example:5000/web: unauthorized: authentication required";

#[tokio::test(start_paused = true)]
async fn a_refused_pull_keeps_the_old_container_says_why_and_waits_a_minute_before_trying_again() {
    let rt = MemoryRuntime::with_images(&["registry.example:5000/web:1"]);
    rt.set_pull_failure("registry.example:5000/web:2", Some(REFUSED));
    let (mut rec, rt, rx) = setup_with(rt);
    rec.reconcile(&view(&[("web", payload("web", "registry.example:5000/web:1"))]))
        .await;
    let old = rt.containers();
    assert_eq!(old.len(), 1);

    let v2 = view(&[("web", payload("web", "registry.example:5000/web:2"))]);
    settle_pulls(&mut rec, &v2).await;
    assert_eq!(rt.containers(), old, "the working container was touched");
    assert!(
        !rt.calls()
            .iter()
            .any(|c| c.starts_with("stop") || c.starts_with("remove")),
        "{:?}",
        rt.calls()
    );
    let p = phase(&rx, "web");
    assert_eq!(p.phase, Phase::Failed);
    assert_eq!(
        p.last_error.as_deref(),
        Some(
            "service web: registry registry.example:5000 refused the credentials for registry.example:5000/web:2: \
             reading manifest 2 in registry.example:5000/web: unauthorized: authentication required"
        )
    );
    let pull = p.pull.expect("the failed pull is shown");
    assert_eq!(
        (pull.image.as_str(), pull.state),
        ("registry.example:5000/web:2", PullState::Failed)
    );

    // Not again within the minute, once after it.
    let pulls = |rt: &MemoryRuntime| rt.calls().iter().filter(|c| c.starts_with("pull")).count();
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(rec.reconcile(&v2).await.pulls_started, 0);
    assert_eq!(pulls(&rt), 1);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(rec.reconcile(&v2).await.pulls_started, 1);
    assert_eq!(rt.containers(), old);
}

#[tokio::test(start_paused = true)]
async fn a_pull_reports_its_progress_at_most_every_two_seconds_until_the_container_is_created() {
    // Ten reports, one a second, of 10 MB.
    let rt = MemoryRuntime::default()
        .with_pullable(&["registry.example/web:1"], Duration::from_secs(10))
        .with_pull_progress(10, 10_000_000);
    let (mut rec, rt, mut rx) = setup_with(rt);
    let v = view(&[("web", payload("web", "registry.example/web:1"))]);
    assert_eq!(rec.reconcile(&v).await.pulls_started, 1);
    let pull = phase(&rx, "web").pull.expect("pulling");
    assert_eq!(pull.state, PullState::Pulling);
    assert_eq!((pull.bytes_done, pull.layers_total), (0, 0));
    rx.borrow_and_update();

    let mut seen = Vec::new();
    let outcome = loop {
        tokio::select! {
            outcome = rec.next_pull() => break outcome.expect("outcome"),
            changed = rx.changed() => {
                changed.expect("reconciler alive");
                let p = rx.borrow_and_update().deployments[&dep("web")].pull.clone().expect("pull");
                seen.push((tokio::time::Instant::now(), p.bytes_done));
            }
        }
    };
    let bytes: Vec<u64> = seen.iter().map(|(_, b)| *b).collect();
    assert_eq!(
        bytes,
        [1_000_000, 3_000_000, 5_000_000, 7_000_000, 9_000_000],
        "{seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[1].0 - w[0].0 >= Duration::from_secs(2)),
        "{seen:?}"
    );
    assert_eq!(phase(&rx, "web").pull.map(|p| p.bytes_total), Some(Some(10_000_000)));

    rec.pull_finished(outcome);
    rec.reconcile(&v).await;
    let p = phase(&rx, "web");
    assert_eq!(p.phase, Phase::Running);
    assert_eq!(p.pull, None, "cleared once the container is created");
    assert_eq!(rt.containers().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_upgrade_starts_the_new_container_before_removing_the_old() {
    let (mut rec, rt, rx) = setup(&["img:1", "img:2"]);
    rec.reconcile(&view(&[("web", payload("web", "img:1"))])).await;
    let old_id = rt.containers()[0].id.clone();
    rec.reconcile(&view(&[("web", payload("web", "img:2"))])).await;
    let calls = rt.calls();
    let pos = |prefix: &str| calls.iter().position(|c| c.starts_with(prefix)).expect(prefix);
    let created = calls.iter().rposition(|c| c.starts_with("create")).expect("create");
    assert!(created > pos("list"));
    assert!(pos(&format!("remove {old_id}")) > created, "{calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("stop")), "no host ports: no stop");
    let now = rt.containers();
    assert_eq!(now.len(), 1);
    assert_ne!(now[0].id, old_id);
    assert_eq!(phase(&rx, "web").phase, Phase::Running);
}

#[tokio::test(start_paused = true)]
async fn an_upgrade_whose_container_exits_at_once_is_rolled_back() {
    let ports = serde_json::json!([{"host_port": 8080, "container_port": 80}]);
    let rt = MemoryRuntime::with_images(&["img:1", "broken:2"]).with_crashing(&["broken:2"]);
    let (mut rec, rt, rx) = setup_with(rt);
    rec.reconcile(&view(&[(
        "web",
        payload_with(
            "web",
            serde_json::json!({"name": "web", "image": "img:1", "ports": ports}),
        ),
    )]))
    .await;
    let old = rt.containers();
    let v2 = view(&[(
        "web",
        payload_with(
            "web",
            serde_json::json!({"name": "web", "image": "broken:2", "ports": ports}),
        ),
    )]);
    rec.reconcile(&v2).await;
    // Stopped for the port, then started again after the new one died.
    let calls = rt.calls();
    assert!(calls.contains(&format!("stop {}", old[0].id)), "{calls:?}");
    assert_eq!(rt.containers(), old, "the old container runs again, alone");
    let p = phase(&rx, "web");
    assert_eq!(p.phase, Phase::Failed);
    let err = p.last_error.expect("error");
    assert!(err.contains("the new container exited with code 1 within 1s"), "{err}");
    assert!(err.contains("the previous version keeps running"), "{err}");

    // Rolled-back upgrades are retried after the longer backoff only.
    let creates = |rt: &MemoryRuntime| rt.calls().iter().filter(|c| c.starts_with("create")).count();
    let before = creates(&rt);
    tokio::time::advance(Duration::from_secs(20)).await;
    rec.reconcile(&v2).await;
    assert_eq!(creates(&rt), before, "retried within the rollback backoff");
    tokio::time::advance(Duration::from_secs(15)).await;
    rec.reconcile(&v2).await;
    assert_eq!(creates(&rt), before + 1);
}

#[tokio::test(start_paused = true)]
async fn new_spec_skips_the_backoff_of_the_old_one() {
    let (mut rec, _rt, rx) = setup(&["good:1"]);
    settle_pulls(&mut rec, &view(&[("web", payload("web", "missing:1"))])).await;
    assert_eq!(phase(&rx, "web").phase, Phase::Failed);
    let fixed = rec.reconcile(&view(&[("web", payload("web", "good:1"))])).await;
    assert_eq!(fixed.executed, 1);
    assert_eq!(phase(&rx, "web").phase, Phase::Running);
}

#[tokio::test(start_paused = true)]
async fn stopped_container_is_restarted_with_a_warning_event_and_counted() {
    let (mut rec, rt, rx) = setup(&["img:1"]);
    let v = view(&[("web", payload("web", "img:1"))]);
    rec.reconcile(&v).await;
    let id = rt.containers()[0].id.clone();
    rt.set_state(&id, ContainerState::Exited { code: 137 });
    rec.reconcile(&v).await;
    assert_eq!(rt.containers()[0].state, ContainerState::Running);
    let report = rx.borrow().clone();
    assert!(
        report
            .events
            .iter()
            .any(|e| e.severity == Severity::Warning && e.message.contains("exit code 137"))
    );
    let p = &report.deployments[&dep("web")];
    assert_eq!((p.phase, p.restarts, p.recent_restarts), (Phase::Running, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_restored_container_is_reported_missing_before_it_is_restored_and_counted() {
    let (tx, mut rx) = watch::channel(Report::default());
    let (published_tx, published_rx) = watch::channel(0u64);
    let config = ReconcilerConfig {
        device: Id::new("dev1").expect("id"),
        event_capacity: 16,
        settle: Duration::from_secs(1),
        runtime_name: "memory".into(),
    };
    let rt = MemoryRuntime::with_images(&["img:1"]);
    let mut rec = Reconciler::new(rt.clone(), config, tx).with_published(published_rx);
    // A stand-in for the status reporter: records every report it "publishes".
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reporter = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let r = rx.borrow_and_update().clone();
                if let Some(p) = r.deployments.get(&dep("web")) {
                    seen.lock().expect("lock").push(p.clone());
                }
                published_tx.send_replace(r.revision);
            }
        })
    };
    let v = view(&[("web", payload("web", "img:1"))]);
    rec.reconcile(&v).await;
    rt.remove_out_of_band(&rt.containers()[0].id.clone());
    rec.reconcile(&v).await;
    tokio::task::yield_now().await;
    let published = seen.lock().expect("lock").clone();
    let missing = published
        .iter()
        .find(|p| {
            p.phase == Phase::Pending
                && p.detail
                    .as_deref()
                    .is_some_and(|d| d.contains("removed outside the agent"))
        })
        .unwrap_or_else(|| panic!("the missing container was never published: {published:?}"));
    assert_eq!(missing.restores, 0, "counted once it has happened");
    let last = published.last().expect("published");
    assert_eq!(
        (last.phase, last.restores, last.recent_restarts),
        (Phase::Running, 1, 1)
    );
    assert_eq!(rt.containers().len(), 1);
    reporter.abort();
}

#[tokio::test(start_paused = true)]
async fn a_crash_looping_service_is_failed_although_it_runs_right_now() {
    let (mut rec, rt, rx) = setup(&["img:1"]);
    let v = view(&[("web", payload("web", "img:1"))]);
    rec.reconcile(&v).await;
    let id = rt.containers()[0].id.clone();
    let (tx, mut events) = tokio::sync::mpsc::channel(64);
    let watcher = {
        let rt = rt.clone();
        tokio::spawn(async move {
            use iot_agent::runtime::ContainerRuntime;
            rt.watch_events(&Id::new("dev1").expect("id"), tx).await
        })
    };
    tokio::task::yield_now().await;
    for _ in 0..4 {
        rt.crash_and_restart(&id, 3);
    }
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(10), events.recv()).await {
        rec.runtime_event(&ev);
    }
    rec.reconcile(&v).await;
    let p = phase(&rx, "web");
    assert_eq!(p.phase, Phase::Failed);
    assert!(
        p.last_error
            .as_deref()
            .is_some_and(|e| e.contains("crash loop") && e.contains("exit code 3"))
    );
    assert_eq!(p.restarts, 4);
    // Quiet for the crash-loop window: healthy again, the counts remain.
    tokio::time::advance(Duration::from_secs(121)).await;
    rec.reconcile(&v).await;
    let p = phase(&rx, "web");
    assert_eq!((p.phase, p.restarts), (Phase::Running, 4));
    watcher.abort();
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_runtime_is_waited_for_at_start_and_failed_later() {
    let (mut rec, rt, rx) = setup(&["img:1"]);
    let v = view(&[("web", payload("web", "img:1"))]);
    rt.set_available(false);
    rec.reconcile(&v).await;
    let report = rx.borrow().clone();
    assert_eq!(report.runtime.state, RuntimeState::Starting);
    assert_eq!(report.deployments[&dep("web")].phase, Phase::Pending);
    assert!(
        !report.events.iter().any(|e| e.severity == Severity::Error),
        "waiting at boot is not an error: {:?}",
        report.events
    );
    rt.set_available(true);
    rec.reconcile(&v).await;
    assert_eq!(phase(&rx, "web").phase, Phase::Running);
    assert_eq!(rx.borrow().runtime.state, RuntimeState::Available);
    assert!(rx.borrow().last_reconcile_at.is_some());

    rt.set_available(false);
    rec.reconcile(&v).await;
    let report = rx.borrow().clone();
    assert_eq!(report.runtime.state, RuntimeState::Unavailable);
    let p = &report.deployments[&dep("web")];
    assert_eq!(
        p.phase,
        Phase::Failed,
        "a device that cannot see its containers must not say Running"
    );
    assert!(
        p.last_error
            .as_deref()
            .is_some_and(|e| e.contains("container runtime unavailable"))
    );
    assert!(rec.readiness(&v).is_err());
}

#[tokio::test(start_paused = true)]
async fn unsynced_view_never_removes_and_deleted_deployments_leave_the_report() {
    let (mut rec, rt, rx) = setup(&["img:1"]);
    rec.reconcile(&view(&[("web", payload("web", "img:1"))])).await;
    assert_eq!(rt.containers().len(), 1);
    let empty_unsynced = DesiredView::default();
    rec.reconcile(&empty_unsynced).await;
    assert_eq!(rt.containers().len(), 1, "removed before a full read");
    rec.reconcile(&view(&[])).await;
    assert!(rt.containers().is_empty());
    assert!(rx.borrow().deployments.is_empty());
}

#[tokio::test(start_paused = true)]
async fn event_ring_stays_bounded() {
    let (mut rec, rt, rx) = setup(&["img:1"]);
    let v = view(&[("web", payload("web", "img:1"))]);
    for _ in 0..20 {
        rec.reconcile(&v).await;
        let id = rt.containers()[0].id.clone();
        rt.remove_out_of_band(&id);
    }
    assert_eq!(rx.borrow().events.len(), 16);
}

#[tokio::test(start_paused = true)]
async fn malformed_keys_are_reported_once_as_warnings() {
    let (mut rec, _rt, rx) = setup(&["img:1"]);
    let mut v = view(&[("web", payload("web", "img:1"))]);
    v.invalid_keys = vec!["dev1.not-a-deployment".into()];
    rec.reconcile(&v).await;
    rec.reconcile(&v).await;
    let warnings: Vec<_> = rx
        .borrow()
        .events
        .iter()
        .filter(|e| e.message.contains("not-a-deployment"))
        .cloned()
        .collect();
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].severity, Severity::Warning);
    assert_eq!(phase(&rx, "web").phase, Phase::Running, "other deployments unaffected");
}

#[tokio::test(start_paused = true)]
async fn a_restore_that_keeps_failing_is_neither_counted_nor_flapping() {
    let (mut rec, rt, rx) = setup(&["img:1"]);
    let v = view(&[("web", payload("web", "img:1"))]);
    rec.reconcile(&v).await;
    rt.remove_out_of_band(&rt.containers()[0].id.clone());
    rt.set_failing_creates(true);
    rec.reconcile(&v).await;
    let first = phase(&rx, "web");
    assert_eq!(first.phase, Phase::Failed);
    let revision = rx.borrow().revision;
    // Passes within the backoff: nothing is tried, announced or counted.
    for _ in 0..5 {
        tokio::time::advance(Duration::from_millis(150)).await;
        rec.reconcile(&v).await;
    }
    let p = phase(&rx, "web");
    assert_eq!((p.phase, p.restores, p.recent_restarts), (Phase::Failed, 0, 0));
    assert_eq!(rx.borrow().revision, revision, "the status flapped while backing off");
    let errors = rx
        .borrow()
        .events
        .iter()
        .filter(|e| e.severity == Severity::Error)
        .count();
    assert_eq!(errors, 1);
    // Once creates work again, the restore happens and is counted.
    rt.set_failing_creates(false);
    tokio::time::advance(Duration::from_secs(61)).await;
    rec.reconcile(&v).await;
    let p = phase(&rx, "web");
    assert_eq!((p.phase, p.restores), (Phase::Running, 1));
}

#[tokio::test(start_paused = true)]
async fn an_interrupted_upgrade_is_settled_or_rolled_back_on_the_next_pass() {
    // As if the agent had stopped during the settle check: old and new side by side,
    // the old one stopped for its port.
    let ports = serde_json::json!([{"host_port": 8080, "container_port": 80}]);
    let rt = MemoryRuntime::with_images(&["img:1", "img:2", "broken:2"]).with_crashing(&["broken:2"]);
    let (mut rec, rt, rx) = setup_with(rt);
    let v1 = view(&[(
        "web",
        payload_with(
            "web",
            serde_json::json!({"name": "web", "image": "img:1", "ports": ports}),
        ),
    )]);
    rec.reconcile(&v1).await;
    let old = rt.containers()[0].id.clone();
    for (image, healthy) in [("broken:2", false), ("img:2", true)] {
        let v2 = view(&[(
            "web",
            payload_with(
                "web",
                serde_json::json!({"name": "web", "image": image, "ports": ports}),
            ),
        )]);
        // Build the half-done state by hand: old stopped, new created and started.
        use iot_agent::runtime::ContainerRuntime;
        rt.stop(&old).await.expect("stop");
        let spec = {
            let IotScore::PodmanV0(p) = serde_json::from_value::<IotScore>(
                serde_json::json!({"PodmanV0": {"services": [{"name": "web", "image": image, "ports": ports}]}}),
            )
            .expect("score");
            let svc = p.services[0].clone();
            let hash = iot_agent::plan::service_hash(&svc);
            iot_agent::runtime::ContainerSpec {
                device: Id::new("dev1").expect("id"),
                deployment: dep("web"),
                name: format!("half-done-{image}"),
                service: svc,
                service_hash: hash,
                spec_hash: SpecHash::from_reported("h"),
                revision: None,
                previous_image: None,
            }
        };
        let new = rt.create(&spec).await.expect("create");
        rt.start(&new).await.expect("start");
        rec.reconcile(&v2).await;
        let ids: Vec<String> = rt.containers().iter().map(|c| c.id.clone()).collect();
        if healthy {
            assert_eq!(ids, std::slice::from_ref(&new), "settled: the old container goes");
            assert_eq!(phase(&rx, "web").phase, Phase::Running);
        } else {
            assert_eq!(
                ids,
                std::slice::from_ref(&old),
                "rolled back: the new container goes, the old runs"
            );
            assert_eq!(rt.containers()[0].state, ContainerState::Running);
            let p = phase(&rx, "web");
            assert_eq!(p.phase, Phase::Failed);
            assert!(
                p.last_error
                    .is_some_and(|e| e.contains("previous version keeps running"))
            );
        }
    }
}

#[tokio::test]
async fn changes_are_flushed_even_when_podman_goes_away_before_the_pass_ends() {
    let (mut rec, rt, _rx) = setup(&["img:1"]);
    // The first list answers; the one after the create does not.
    rt.go_away_after_lists(1);
    rec.reconcile(&view(&[("web", payload("web", "img:1"))])).await;
    let calls = rt.calls();
    assert!(calls.iter().any(|c| c.starts_with("start")), "{calls:?}");
    assert_eq!(calls.last().map(String::as_str), Some("flush"), "{calls:?}");
}

#[tokio::test]
async fn changes_are_flushed_to_disk_after_the_report_and_before_the_next_change() {
    let (mut rec, rt, rx) = setup(&["img:1"]);
    let flushes = |rt: &MemoryRuntime| rt.calls().iter().filter(|c| *c == "flush").count();
    rec.reconcile(&view(&[("web", payload("web", "img:1"))])).await;
    let calls = rt.calls();
    let start = calls.iter().position(|c| c.starts_with("start")).expect("started");
    let flush = calls.iter().position(|c| c == "flush").expect("flushed");
    assert!(flush > start, "flushed after the container was started: {calls:?}");
    // The flush is the pass's last call: the report (handed to the reporter by
    // then) does not wait for it, and the next pass's changes come after it.
    assert_eq!(flush, calls.len() - 1, "{calls:?}");
    assert_eq!(phase(&rx, "web").phase, Phase::Running);
    let after_create = flushes(&rt);
    rec.reconcile(&view(&[("web", payload("web", "img:1"))])).await;
    assert_eq!(flushes(&rt), after_create, "nothing changed, nothing flushed");
    rec.reconcile(&view(&[])).await;
    assert_eq!(flushes(&rt), after_create + 1, "a removal is flushed too");
}

#[tokio::test(start_paused = true)]
async fn a_runtime_that_stops_answering_fails_every_deployment_with_that_reason_and_recovers() {
    let (mut rec, rt, rx) = setup(&["img:1"]);
    let v = view(&[("web", web_rev("img:1", 3)), ("api", payload("api", "img:1"))]);
    rec.reconcile(&v).await;
    assert_eq!(phase(&rx, "web").phase, Phase::Running);
    let hash = phase(&rx, "web").spec_hash;

    // Frozen behind a 5 s deadline: one pass costs one deadline, not one per call.
    rt.set_unresponsive(Some(Duration::from_secs(5)));
    let started = tokio::time::Instant::now();
    rec.reconcile(&v).await;
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    let report = rx.borrow().clone();
    let reason = "container runtime did not answer within 5s";
    assert_eq!(report.runtime.state, RuntimeState::Unavailable);
    assert_eq!(report.runtime.message.as_deref(), Some(reason));
    for name in ["web", "api"] {
        let p = &report.deployments[&dep(name)];
        assert_eq!(
            p.phase,
            Phase::Failed,
            "{name}: a device that cannot see its containers"
        );
        assert_eq!(p.last_error.as_deref(), Some(reason));
    }
    let web = &report.deployments[&dep("web")];
    assert_eq!(
        (&web.spec_hash, web.revision),
        (&hash, Some(3)),
        "what ran last stays reported"
    );
    assert_eq!(rec.readiness(&v), Err(reason.to_owned()));
    let errors = |rx: &watch::Receiver<Report>| {
        rx.borrow()
            .events
            .iter()
            .filter(|e| e.severity == Severity::Error && e.message == reason)
            .count()
    };
    // One for the device, one per deployment.
    assert_eq!(errors(&rx), 3, "{:?}", rx.borrow().events);
    // Still frozen: the same report, no new events.
    rec.reconcile(&v).await;
    assert_eq!(errors(&rx), 3, "{:?}", rx.borrow().events);
    assert_eq!(rx.borrow().revision, report.revision, "nothing changed while frozen");

    // It answers again: back to Running on the next pass, by itself.
    rt.set_unresponsive(None);
    rec.reconcile(&v).await;
    let report = rx.borrow().clone();
    assert_eq!(report.runtime.state, RuntimeState::Available);
    assert_eq!(report.runtime.message, None);
    assert_eq!(report.deployments[&dep("web")].phase, Phase::Running);
    assert_eq!(report.deployments[&dep("api")].phase, Phase::Running);
    assert!(
        report
            .events
            .iter()
            .any(|e| e.message == "container runtime reachable again"),
        "{:?}",
        report.events
    );
    assert_eq!(rt.containers().len(), 2, "nothing was re-created");
    assert!(rec.readiness(&v).is_ok());
}

#[tokio::test(start_paused = true)]
async fn the_revision_reported_is_the_one_that_runs_through_failed_upgrades_and_agent_restarts() {
    let rt = MemoryRuntime::with_images(&["img:1", "broken:2", "img:2"]).with_crashing(&["broken:2"]);
    let (mut rec, rt, rx) = setup_with(rt);
    let v3 = view(&[("web", web_rev("img:1", 3))]);
    rec.reconcile(&v3).await;
    let p = phase(&rx, "web");
    assert_eq!((p.phase, p.revision), (Phase::Running, Some(3)));
    assert_eq!(rt.containers()[0].revision, Some(3), "stored on the container");
    let h3 = p.spec_hash;

    // Revision 4 does not come up: rolled back, revision 3 is what serves.
    let v4 = view(&[("web", web_rev("broken:2", 4))]);
    rec.reconcile(&v4).await;
    let p = phase(&rx, "web");
    assert_eq!(p.phase, Phase::Failed);
    assert!(
        p.last_error
            .as_deref()
            .is_some_and(|e| e.contains("previous version keeps running"))
    );
    assert_eq!(p.revision, Some(3), "the revision of what runs, not the failed one");
    assert_ne!(p.spec_hash, h3, "the failure is reported against the new spec");

    // A restarted agent knows nothing but the containers' labels.
    let (mut rec, rt, rx) = setup_with(rt);
    rec.reconcile(&v4).await;
    let p = phase(&rx, "web");
    assert_eq!((p.phase, p.revision), (Phase::Failed, Some(3)));

    // Revision 5 goes back to revision 3's score: the container of revision 3 is
    // kept, and it runs revision 5 now.
    let v5 = view(&[("web", web_rev("img:1", 5))]);
    rec.reconcile(&v5).await;
    let p = phase(&rx, "web");
    assert_eq!((p.phase, p.revision, &p.spec_hash), (Phase::Running, Some(5), &h3));
    assert_eq!(rt.containers()[0].revision, Some(3), "not re-created");

    // Revision 6 works: replaced, labelled, reported.
    rec.reconcile(&view(&[("web", web_rev("img:2", 6))])).await;
    let p = phase(&rx, "web");
    assert_eq!((p.phase, p.revision), (Phase::Running, Some(6)));
    assert_eq!(
        rt.containers().iter().map(|c| c.revision).collect::<Vec<_>>(),
        [Some(6)]
    );
    // Restarted again while converged: the payload's revision.
    let (mut rec, _rt, rx) = setup_with(rt);
    rec.reconcile(&view(&[("web", web_rev("img:2", 6))])).await;
    assert_eq!(phase(&rx, "web").revision, Some(6));
}

#[tokio::test(start_paused = true)]
async fn a_service_the_failed_upgrade_left_alone_does_not_hide_the_revision_that_ran() {
    let rt = MemoryRuntime::with_images(&["web:1", "db:1", "db:2", "broken:3"]).with_crashing(&["broken:3"]);
    let (mut rec, rt, rx) = setup_with(rt);
    let two = |web: &str, db: &str, revision| {
        view(&[(
            "web",
            payload_rev(
                "web",
                serde_json::json!([{"name": "web", "image": web}, {"name": "db", "image": db}]),
                revision,
            ),
        )])
    };
    rec.reconcile(&two("web:1", "db:1", 1)).await;
    // Revision 2 changes db only: web keeps its container of revision 1.
    rec.reconcile(&two("web:1", "db:2", 2)).await;
    assert_eq!(phase(&rx, "web").revision, Some(2));
    let mut labels: Vec<_> = rt
        .containers()
        .iter()
        .map(|c| (c.service.clone(), c.revision))
        .collect();
    labels.sort();
    assert_eq!(labels, [("db".into(), Some(2)), ("web".into(), Some(1))]);
    // Revision 3 breaks web: it is rolled back, and the device runs revision 2.
    rec.reconcile(&two("broken:3", "db:2", 3)).await;
    let p = phase(&rx, "web");
    assert_eq!((p.phase, p.revision), (Phase::Failed, Some(2)));
}

#[tokio::test(start_paused = true)]
async fn payloads_without_a_revision_report_none() {
    let (mut rec, rt, rx) = setup(&["img:1"]);
    rec.reconcile(&view(&[("web", payload("web", "img:1"))])).await;
    let p = phase(&rx, "web");
    assert_eq!((p.phase, p.revision), (Phase::Running, None));
    assert_eq!(rt.containers()[0].revision, None, "no label without a revision");
    // An upgrade that waits for its image, from an operator with revisions, over a
    // container from one without: what runs has no known revision.
    rec.reconcile(&view(&[("web", web_rev("missing:2", 2))])).await;
    let p = phase(&rx, "web");
    assert_eq!((p.phase, p.revision), (Phase::Pending, None));
}

#[tokio::test(start_paused = true)]
async fn after_two_upgrades_the_running_and_the_previous_image_stay_and_older_ones_go() {
    use iot_agent::memory_runtime::memory_image_id;
    use iot_agent::runtime::ContainerRuntime;
    let v = |n: u8| format!("r.example:5000/iot/web:{n}");
    let rt = MemoryRuntime::with_images(&[&v(1), "r.example:5000/iot/other:1", "localhost/mine:1"])
        .with_pullable(&[&v(2), &v(3)], Duration::from_millis(10));
    let (mut rec, rt, rx) = setup_with(rt);
    let stored = |rt: &MemoryRuntime| {
        let rt = rt.clone();
        async move {
            let mut tags: Vec<String> = rt
                .images()
                .await
                .expect("images")
                .into_iter()
                .flat_map(|i| i.tags)
                .collect();
            tags.sort();
            tags
        }
    };
    for n in 1..=3 {
        settle_pulls(&mut rec, &view(&[("web", payload("web", &v(n)))])).await;
        assert_eq!(phase(&rx, "web").phase, Phase::Running, "version {n}");
    }
    assert_eq!(
        rt.containers()[0].previous_image.as_deref(),
        Some(memory_image_id(&v(2)).as_str()),
        "the replacement names the image it replaced"
    );
    let expected = [
        "localhost/mine:1".to_owned(),
        "r.example:5000/iot/other:1".to_owned(),
        v(2),
        v(3),
    ];
    assert_eq!(stored(&rt).await, expected);
    // A restarted agent knows the previous version from the label alone.
    let (mut again, _, _) = setup_with(rt.clone());
    again.reconcile(&view(&[("web", payload("web", &v(3)))])).await;
    assert_eq!(stored(&rt).await, expected);
}
