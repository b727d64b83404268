//! A device whose desired state does not fit one batched read: every live deployment
//! is seen and nothing live is ever removed.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use harmony_reconciler_contracts::*;
use iot_agent::agent::reconcile_loop;
use iot_agent::memory_runtime::MemoryRuntime;
use iot_agent::reconciler::{Reconciler, ReconcilerConfig, Report};
use iot_nats::follow::FollowConfig;
use iot_nats::write::DEFAULT_WINDOW;
use iot_nats::{Anonymous, DesiredView, KvOp, connect, follow_desired_state, write_batch};
use iot_testkit::wait_until;
use tokio::sync::watch;

fn ops(device: &str, range: std::ops::Range<usize>, delete: bool) -> anyhow::Result<Vec<KvOp>> {
    let id = Id::new(device)?;
    range
        .map(|i| {
            let d = dep("default", &format!("app-{i}"));
            let key = desired_state_key(&id, &d);
            Ok(if delete {
                KvOp::Purge { key }
            } else {
                let score = service_score(serde_json::json!({"name": "web", "image": "localhost/iot-web:v1"}));
                KvOp::Put {
                    key,
                    value: Bytes::from(DesiredState::new(d, score).to_bytes()),
                }
            })
        })
        .collect()
}

#[tokio::test]
async fn fifteen_hundred_deployments_all_run_and_none_is_removed_by_resyncs() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (_, err) = write_batch(
        &stack.js,
        DESIRED_STATE_BUCKET,
        &ops("big", 0..1500, false)?,
        DEFAULT_WINDOW,
    )
    .await;
    anyhow::ensure!(err.is_none(), "{err:?}");
    let conn = connect(&[stack.nats.url()], &Anonymous, "big", stack.nats.ca_file()).await?;
    let (tx, rx) = watch::channel(DesiredView::default());
    let follow = tokio::spawn(follow_desired_state(
        conn,
        Id::new("big")?,
        FollowConfig {
            resync: Duration::from_secs(1),
            ..Default::default()
        },
        tx,
    ));
    let rt = MemoryRuntime::with_images(&["localhost/iot-web:v1"]);
    let (report_tx, report_rx) = watch::channel(Report::default());
    let rec = Reconciler::new(
        rt.clone(),
        ReconcilerConfig {
            device: Id::new("big")?,
            event_capacity: 8,
            settle: Duration::ZERO,
            runtime_name: "memory".into(),
        },
        report_tx,
    );
    let (_events_tx, events) = tokio::sync::mpsc::channel(1);
    let looping = tokio::spawn(reconcile_loop(rec, rx, events, Duration::from_secs(1), None));
    wait_until(WAIT, "1500 containers", || async {
        (rt.containers().len() == 1500).then_some(())
    })
    .await?;
    // Several full re-reads later: still all there, nothing was ever removed.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(rt.containers().len(), 1500);
    assert!(
        !rt.calls().iter().any(|c| c.starts_with("remove")),
        "a live container was removed"
    );
    assert_eq!(report_rx.borrow().deployments.len(), 1500);
    assert!(
        report_rx
            .borrow()
            .deployments
            .values()
            .all(|p| p.phase == Phase::Running)
    );
    follow.abort();
    looping.abort();
    Ok(())
}

#[tokio::test]
async fn three_thousand_deleted_keys_do_not_cost_the_five_live_containers() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (dev, guard) = device();
    let mut agent = Agent::spawn(&stack, &dev)?;
    let (_, err) = write_batch(
        &stack.js,
        DESIRED_STATE_BUCKET,
        &ops(&dev, 0..5, false)?,
        DEFAULT_WINDOW,
    )
    .await;
    anyhow::ensure!(err.is_none(), "{err:?}");
    wait_until(WAIT, "five containers", || async {
        (guard.running_ids().len() == 5).then_some(())
    })
    .await?;
    let live: BTreeSet<String> = guard.running_ids().into_iter().collect();

    // While the agent is down, 3000 deployments come and go (a long history).
    agent.kill();
    let (_, err) = write_batch(&stack.js, DESIRED_STATE_BUCKET, &ops(&dev, 5..3005, false)?, 1024).await;
    anyhow::ensure!(err.is_none(), "{err:?}");
    let (_, err) = write_batch(&stack.js, DESIRED_STATE_BUCKET, &ops(&dev, 5..3005, true)?, 1024).await;
    anyhow::ensure!(err.is_none(), "{err:?}");
    agent.start(&stack)?;
    let status = stack
        .wait_status(&dev, "the five reported by the restarted agent", |s| {
            s.heartbeat_at > chrono::Utc::now() - chrono::Duration::seconds(2)
                && s.deployments.len() == 5
                && s.deployments.values().all(|p| p.phase == Phase::Running)
        })
        .await?;
    assert_eq!(status.deployments.len(), 5);
    // Resyncs every 2 s re-read all 3005 records; the five stay, untouched.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let now: BTreeSet<String> = guard.ids().into_iter().collect();
    assert_eq!(now, live, "a live container was removed, replaced or added");
    // And a new deployment still arrives through the live subscription.
    let (_, err) = write_batch(&stack.js, DESIRED_STATE_BUCKET, &ops(&dev, 3005..3006, false)?, 1).await;
    anyhow::ensure!(err.is_none(), "{err:?}");
    wait_until(WAIT, "the sixth", || async {
        (guard.running_ids().len() == 6).then_some(())
    })
    .await?;
    Ok(())
}
