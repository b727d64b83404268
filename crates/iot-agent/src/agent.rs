//! Wiring: NATS connection, desired-state follower, reconcile loop, status reporter.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream;
use iot_kv::follow::FollowConfig;
use iot_kv::{DesiredView, connect, follow_desired_state};
use tokio::sync::watch;

use crate::config::AgentConfig;
use crate::podman::PodmanClient;
use crate::reconciler::{Reconciler, Report};
use crate::report::StatusReporter;
use crate::runtime::{ContainerRuntime, PodmanRuntime};

/// Runs the agent until `shutdown` completes. Containers keep running after the
/// agent exits: they belong to the device, not to the agent process.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let creds = config.nats.credentials();
    tracing::info!(
        device = %config.device_id,
        nats = %config.nats.nats_url.join(","),
        credentials = %creds.describe(),
        podman = %config.podman_socket.display(),
        "starting iot-agent {}", crate::interpret::AGENT_VERSION
    );
    let podman = PodmanClient::new(&config.podman_socket);
    if let Err(e) = podman.ping().await {
        tracing::warn!(error = %e, "podman API not reachable yet; will keep retrying");
    }
    let runtime = PodmanRuntime {
        client: podman,
        stop_timeout: config.stop_timeout,
    };

    // Do not wait for NATS: the device keeps running its containers while offline.
    let conn = connect(
        &config.nats.nats_url,
        creds.as_ref(),
        &format!("iot-agent-{}", config.device_id),
        false,
    )
    .await?;
    let js = jetstream::new(conn.client.clone());

    let (desired_tx, desired_rx) = watch::channel(DesiredView::default());
    let follow_cfg = FollowConfig {
        resync: config.resync_interval,
        ..Default::default()
    };
    let follower = tokio::spawn(follow_desired_state(
        conn.clone(),
        config.device_id.clone(),
        follow_cfg,
        desired_tx,
    ));

    let (report_tx, report_rx) = watch::channel(Report::default());
    let reporter = StatusReporter {
        js,
        device: config.device_id.clone(),
        heartbeat: config.heartbeat_interval,
        inventory_refresh: Duration::from_secs(300),
        publish_timeout: Duration::from_secs(5),
    };
    let reporter = tokio::spawn(reporter.run(report_rx));

    let reconciler = Reconciler::new(
        runtime,
        config.device_id.clone(),
        harmony_reconciler_contracts::status::DEFAULT_EVENT_RING_CAPACITY,
        report_tx,
    );
    tokio::select! {
        () = reconcile_loop(reconciler, desired_rx, config.resync_interval) => {}
        () = shutdown => tracing::info!("shutting down; containers keep running"),
    }
    follower.abort();
    reporter.abort();
    if let Err(e) = conn.client.flush().await {
        tracing::debug!(error = %e, "flush on shutdown failed");
    }
    Ok(())
}

/// Level-triggered loop: any desired-state change or the resync timer causes a full
/// pass over everything. No debounce: the watch channel keeps only the latest view,
/// so changes arriving while a pass runs are coalesced into the next pass, and a
/// lone change is acted on at once.
pub async fn reconcile_loop<R: ContainerRuntime>(
    mut reconciler: Reconciler<R>,
    mut desired: watch::Receiver<DesiredView>,
    resync: Duration,
) {
    let mut tick = tokio::time::interval(resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = desired.changed() => {
                if changed.is_err() {
                    tracing::error!("desired-state follower stopped");
                    return;
                }
            }
            _ = tick.tick() => {}
        }
        let view = desired.borrow_and_update().clone();
        let summary = reconciler.reconcile(&view).await;
        if summary.executed > 0 {
            tracing::debug!(?summary, "reconcile pass");
        }
    }
}
