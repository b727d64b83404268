//! The reconciler's bookkeeping (phases, events, backoff) with the in-memory runtime.
//! Podman behaviour itself is covered by agent_e2e against real podman.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use harmony_reconciler_contracts::*;
use iot_agent::memory_runtime::MemoryRuntime;
use iot_agent::reconciler::{Reconciler, Report, failure_backoff};
use iot_agent::runtime::ContainerState;
use iot_kv::DesiredView;
use tokio::sync::watch;

fn dep(name: &str) -> DeploymentRef {
    DeploymentRef::new("default", name).expect("valid")
}

fn payload(name: &str, image: &str) -> Bytes {
    let score: IotScore =
        serde_json::from_value(serde_json::json!({"PodmanV0": {"services": [{"name": "web", "image": image}]}}))
            .expect("score");
    Bytes::from(DesiredState::new(dep(name), 1, score).to_bytes())
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

fn setup(images: &[&str]) -> (Reconciler<MemoryRuntime>, MemoryRuntime, watch::Receiver<Report>) {
    let rt = MemoryRuntime::with_images(images);
    let (tx, rx) = watch::channel(Report::default());
    (Reconciler::new(rt.clone(), Id::new("dev1").expect("id"), 8, tx), rt, rx)
}

#[test]
fn backoff_doubles_from_one_second_and_caps_at_a_minute() {
    let secs: Vec<u64> = (1..=9).map(|n| failure_backoff(n).as_secs()).collect();
    assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
}

#[tokio::test(start_paused = true)]
async fn failing_create_is_retried_with_backoff_and_reported_once() {
    let (mut rec, rt, rx) = setup(&[]);
    let v = view(&[("web", payload("web", "missing:1"))]);
    let first = rec.reconcile(&v).await;
    assert_eq!((first.executed, first.failed), (1, 1));
    let phase = rx.borrow().deployments[&dep("web")].clone();
    assert_eq!(phase.phase, Phase::Failed);
    assert!(phase.last_error.as_deref().is_some_and(|e| e.contains("missing:1")));

    // Within the backoff window nothing is attempted.
    let again = rec.reconcile(&v).await;
    assert_eq!((again.executed, again.skipped_backoff), (0, 1));
    assert_eq!(rt.calls().len(), 1);

    // After it, the create is retried; the same error is not logged twice.
    tokio::time::advance(Duration::from_millis(1100)).await;
    let third = rec.reconcile(&v).await;
    assert_eq!(third.executed, 1);
    let errors = rx
        .borrow()
        .events
        .iter()
        .filter(|e| e.severity == Severity::Error)
        .count();
    assert_eq!(errors, 1, "{:?}", rx.borrow().events);
}

#[tokio::test(start_paused = true)]
async fn new_spec_skips_the_backoff_of_the_old_one() {
    let (mut rec, _rt, rx) = setup(&["good:1"]);
    rec.reconcile(&view(&[("web", payload("web", "missing:1"))])).await;
    assert_eq!(rx.borrow().deployments[&dep("web")].phase, Phase::Failed);
    let fixed = rec.reconcile(&view(&[("web", payload("web", "good:1"))])).await;
    assert_eq!(fixed.executed, 1);
    assert_eq!(rx.borrow().deployments[&dep("web")].phase, Phase::Running);
}

#[tokio::test]
async fn stopped_container_is_restarted_with_a_warning_event() {
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
    assert_eq!(report.deployments[&dep("web")].phase, Phase::Running);
}

#[tokio::test]
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

#[tokio::test]
async fn event_ring_stays_bounded() {
    let (mut rec, rt, rx) = setup(&["img:1"]);
    let v = view(&[("web", payload("web", "img:1"))]);
    for _ in 0..20 {
        rec.reconcile(&v).await;
        let id = rt.containers()[0].id.clone();
        rt.remove_out_of_band(&id);
    }
    assert_eq!(rx.borrow().events.len(), 8);
}

#[tokio::test]
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
    assert_eq!(
        rx.borrow().deployments[&dep("web")].phase,
        Phase::Running,
        "other deployments unaffected"
    );
}
