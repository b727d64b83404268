//! The agent's Prometheus metrics. Always counted (a few atomics); served only with
//! `--metrics-addr`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: &'static str,
    pub result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

pub fn action(action: &'static str, result: &'static str) -> ActionLabels {
    ActionLabels { action, result }
}

pub fn result(result: &'static str) -> ResultLabels {
    ResultLabels { result }
}

#[derive(Debug, Default)]
pub struct AgentMetrics {
    /// Reconcile passes started.
    pub passes: Counter,
    /// Runtime actions by kind and result.
    pub actions: Family<ActionLabels, Counter>,
    /// Finished background pulls by result.
    pub pulls: Family<ResultLabels, Counter>,
    /// Containers started again after they stopped (runtime policy or agent).
    pub restarts: Counter,
    /// Containers re-created after an out-of-band removal.
    pub restores: Counter,
    /// NATS (re)connections, the first one included.
    pub nats_connects: Counter,
    /// Status publishes by result.
    pub status_publishes: Family<ResultLabels, Counter>,
    /// Deployments this device has desired state for.
    pub deployments: Gauge,
}

impl AgentMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("iot_agent");
        r.register("reconcile_passes", "Reconcile passes started", self.passes.clone());
        r.register(
            "actions",
            "Container runtime actions by kind and result",
            self.actions.clone(),
        );
        r.register(
            "image_pulls",
            "Finished background image pulls by result",
            self.pulls.clone(),
        );
        r.register(
            "container_restarts",
            "Containers started again after they stopped",
            self.restarts.clone(),
        );
        r.register(
            "container_restores",
            "Containers re-created after a removal outside the agent",
            self.restores.clone(),
        );
        r.register(
            "nats_connects",
            "NATS connections made, reconnects included",
            self.nats_connects.clone(),
        );
        r.register(
            "status_publishes",
            "Status reports published, by result",
            self.status_publishes.clone(),
        );
        r.register(
            "deployments",
            "Deployments this device has desired state for",
            self.deployments.clone(),
        );
    }
}
