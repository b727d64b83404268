//! The operator's Prometheus metrics, served on `/metrics` with `/healthz` and
//! `/readyz` (see `iot-observe`).

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use harmony_reconciler_contracts::Id;
use harmony_reconciler_contracts::report::Staleness;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::fleet_aggregate::DeviceReport;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
    pub result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: &'static str,
    pub result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

pub fn result(result: &'static str) -> ResultLabels {
    ResultLabels { result }
}

#[derive(Debug, Default)]
pub struct OperatorMetrics {
    /// Reconciles by result: `ok`, or the error kind (`invalid`, `nats`, `kubernetes`).
    pub reconciles: Family<ResultLabels, Counter>,
    /// KV writes by operation (`put`, `purge`) and result.
    pub kv_writes: Family<OpLabels, Counter>,
    /// Status writes by result (`ok`, `unchanged`, `not_found`, `invalid`, `error`).
    pub status_writes: Family<ResultLabels, Counter>,
    /// Seconds from the oldest report not yet aggregated reaching NATS to the pass
    /// that aggregated it.
    pub aggregator_lag: Gauge<f64, AtomicU64>,
    /// Devices by state: `reporting`, `stale`, and `never_seen` (targeted, no status).
    pub devices: Family<StateLabels, Gauge>,
    /// 1 while this replica is the one writer (it holds the leader lease, or runs
    /// without leader election); 0 on a standby.
    pub leader: Gauge,
    /// Requests to the device and viewer services (status relay, read responder,
    /// status snapshot) by service subject prefix and outcome: `answered`,
    /// `superseded` (a newer request of the same identity replaced it), `busy` (the
    /// line was full), `foreign_reply` (a reply subject outside the asker's inbox).
    pub device_requests: Family<ServiceLabels, Counter>,
    /// `Device.status` writes by kind (`change`: something a person sees changed;
    /// `refresh`: only `lastSeenAt`) and result.
    pub device_status_writes: Family<KindLabels, Counter>,
    /// Devices that report to NATS but have no `Device` object.
    pub unregistered_devices: Gauge,
    /// 1 for the NATS server this replica is connected to (by server name and
    /// cluster); the series of a server it left are removed.
    pub nats_server: Family<ServerLabels, Gauge>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ServerLabels {
    pub server: String,
    pub cluster: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
    pub result: &'static str,
}

impl OperatorMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("iot_operator");
        r.register(
            "reconciles",
            "Write-path reconciles by result or error kind",
            self.reconciles.clone(),
        );
        r.register(
            "kv_writes",
            "Desired-state KV writes by operation and result",
            self.kv_writes.clone(),
        );
        r.register("status_writes", "Status writes by result", self.status_writes.clone());
        r.register(
            "nats_server",
            "The NATS server this replica is connected to (1), by server name and cluster",
            self.nats_server.clone(),
        );
        r.register(
            "aggregator_lag_seconds",
            "From the oldest unaggregated device report reaching NATS to its aggregation",
            self.aggregator_lag.clone(),
        );
        r.register(
            "devices",
            "Devices by state: reporting, stale, never_seen",
            self.devices.clone(),
        );
        r.register(
            "leader",
            "1 while this replica writes KV and status (holds the leader lease), 0 on a standby",
            self.leader.clone(),
        );
        r.register(
            "device_requests",
            "Requests to the status relay, read responder and status snapshot by outcome",
            self.device_requests.clone(),
        );
        r.register(
            "device_status_writes",
            "Device status writes by kind (change, refresh of lastSeenAt) and result",
            self.device_status_writes.clone(),
        );
        r.register(
            "unregistered_devices",
            "Devices that report to NATS but have no Device object",
            self.unregistered_devices.clone(),
        );
    }

    pub fn device_status_write(&self, kind: &'static str, result: &'static str) {
        self.device_status_writes
            .get_or_create(&KindLabels { kind, result })
            .inc();
    }

    /// Counts each device-service request's outcome into `device_requests`.
    pub fn device_request_counts(self: &std::sync::Arc<Self>) -> crate::device_services::ServiceCounts {
        let me = self.clone();
        std::sync::Arc::new(move |service, result| {
            me.device_requests
                .get_or_create(&ServiceLabels { service, result })
                .inc();
        })
    }

    pub fn kv_write(&self, op: &'static str, ok: bool, n: u64) {
        self.kv_writes
            .get_or_create(&OpLabels {
                op,
                result: if ok { "ok" } else { "error" },
            })
            .inc_by(n);
    }

    /// Counts devices by state: every device that reported (fresh or stale) and every
    /// targeted device that never did.
    pub fn record_devices(
        &self,
        reports: &HashMap<Id, DeviceReport>,
        targeted: &BTreeSet<Id>,
        now: DateTime<Utc>,
        staleness: Staleness,
    ) {
        let stale = reports
            .values()
            .filter(|r| staleness.is_stale(r.received_at, now))
            .count();
        let never = targeted.iter().filter(|d| !reports.contains_key(*d)).count();
        self.devices
            .get_or_create(&StateLabels { state: "reporting" })
            .set((reports.len() - stale) as i64);
        self.devices
            .get_or_create(&StateLabels { state: "stale" })
            .set(stale as i64);
        self.devices
            .get_or_create(&StateLabels { state: "never_seen" })
            .set(never as i64);
    }
}
