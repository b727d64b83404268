//! `iot-operator run`: wires NATS, the desired-state index, the status writer, the
//! aggregator and the controller.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::jetstream;
use iot_kv::{CredentialSource, connect};

use crate::aggregator::{AggregatorConfig, DeviceIndex, run_aggregator};
use crate::controller::{Ctx, controller, run_controller};
use crate::kv_index::DesiredIndex;
use crate::status_writer::StatusWriter;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub nats_url: Vec<String>,
    pub resync: Duration,
    pub status_min_interval: Duration,
    pub aggregator: AggregatorConfig,
}

pub async fn run(client: kube::Client, creds: Box<dyn CredentialSource>, opts: RunOptions) -> anyhow::Result<()> {
    tracing::info!(nats = %opts.nats_url.join(","), credentials = %creds.describe(), "starting iot-operator {}", env!("CARGO_PKG_VERSION"));
    let conn = connect(&opts.nats_url, creds.as_ref(), "iot-operator", false).await?;
    let js_cell: Arc<OnceLock<jetstream::Context>> = Arc::new(OnceLock::new());
    let index = Arc::new(DesiredIndex::default());

    let devices = Arc::new(DeviceIndex::default());
    // Buckets: retried until NATS answers; then one watch per bucket feeds the
    // desired-state index and the device index.
    {
        let js = jetstream::new(conn.client.clone());
        let cell = js_cell.clone();
        let index = index.clone();
        let devices = devices.clone();
        tokio::spawn(async move {
            let mut attempt = 0u32;
            let (desired, status) = loop {
                match iot_kv::buckets::ensure_buckets(&js).await {
                    Ok(stores) => break stores,
                    Err(e) => {
                        attempt += 1;
                        let delay = crate::controller::error_backoff(attempt);
                        tracing::warn!(error = %e, retry_in = ?delay, "KV buckets not ready");
                        tokio::time::sleep(delay).await;
                    }
                }
            };
            tracing::info!(buckets = ?[harmony_reconciler_contracts::DESIRED_STATE_BUCKET, harmony_reconciler_contracts::AGENT_STATUS_BUCKET], "KV bucket ready");
            if cell.set(js).is_err() {
                tracing::debug!("jetstream context already set");
            }
            tokio::spawn(async move { devices.follow(status).await });
            index.run(desired).await;
        });
    }

    let (writer, status_tx) = StatusWriter::new(client.clone(), opts.status_min_interval);
    tokio::spawn(writer.run());
    let controller = controller(client.clone());
    tokio::spawn(run_aggregator(
        devices,
        controller.store(),
        status_tx.clone(),
        opts.aggregator.clone(),
    ));
    tokio::spawn(crate::gc::run_gc(
        index.clone(),
        client.clone(),
        js_cell.clone(),
        opts.resync,
    ));
    let ctx = Arc::new(Ctx::new(client, js_cell, index, status_tx, opts.resync));
    run_controller(controller, ctx).await;
    tracing::info!("controller stopped");
    Ok(())
}
