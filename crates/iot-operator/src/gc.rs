//! Garbage collection of desired state whose resource no longer exists.
//!
//! The finalizer normally removes a resource's keys before it goes. Keys can still be
//! orphaned when someone strips the finalizer by hand, or deletes the CRD. Left
//! alone, devices would run those deployments forever; this loop removes them.
//! Each pass lists the resources from the API server (an authoritative read, not a
//! cache that might still be loading), acts only when the KV index is loaded, and
//! only on deployments found orphaned on two consecutive passes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use harmony_reconciler_contracts::{DESIRED_STATE_BUCKET, DeploymentRef};
use iot_nats::write::{DEFAULT_WINDOW, write_batch};
use kube::api::ListParams;
use kube::{Api, ResourceExt};

use iot_api::Deployment;

use crate::desired_index::DesiredIndex;
use crate::kv_plan::plan_cleanup;
use crate::metrics::OperatorMetrics;

/// Deployments with keys in KV and no resource. Pure.
pub fn orphaned(in_kv: &BTreeSet<DeploymentRef>, resources: &BTreeSet<DeploymentRef>) -> BTreeSet<DeploymentRef> {
    in_kv.difference(resources).cloned().collect()
}

pub async fn run_gc(
    index: Arc<DesiredIndex>,
    client: kube::Client,
    js: jetstream::Context,
    every: Duration,
    metrics: Arc<OperatorMetrics>,
) {
    let api: Api<Deployment> = Api::all(client);
    let mut suspects: BTreeSet<DeploymentRef> = BTreeSet::new();
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if !index.is_ready() {
            suspects.clear();
            continue;
        }
        let resources: BTreeSet<DeploymentRef> = match api.list_metadata(&ListParams::default()).await {
            Ok(list) => list
                .items
                .iter()
                .filter_map(|d| DeploymentRef::new(d.namespace()?, d.name_any()).ok())
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot list deployments; skipping orphan pass");
                suspects.clear();
                continue;
            }
        };
        let now_orphaned = orphaned(&index.deployments(), &resources);
        tracing::debug!(
            resources = resources.len(),
            orphaned = now_orphaned.len(),
            "orphan pass"
        );
        let confirmed: Vec<DeploymentRef> = now_orphaned.intersection(&suspects).cloned().collect();
        suspects = now_orphaned;
        for dep in confirmed {
            let plan = plan_cleanup(&index.existing(&dep));
            let ops = plan.ops(&dep);
            tracing::warn!(deployment = %dep, keys = ops.len(), "removing desired state of a deployment that no longer exists");
            let (acked, err) = write_batch(&js, DESIRED_STATE_BUCKET, &ops, DEFAULT_WINDOW).await;
            crate::controller::record_kv_writes(&metrics, &ops, acked, err.is_none());
            match err {
                None => {
                    for op in &ops {
                        index.record(op.key(), None);
                    }
                }
                Some(e) => tracing::warn!(deployment = %dep, acked, error = %e, "orphan cleanup failed; will retry"),
            }
        }
    }
}
