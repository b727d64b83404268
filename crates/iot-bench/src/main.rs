//! Benchmarks behind BENCHMARKS.md. Each prints markdown table rows.
//! Build first: `cargo build --release --workspace`.

mod agent_bench;
mod auth_bench;
mod cluster_bench;
mod contention_bench;
mod dashboard_bench;
mod fanout_bench;
mod fleet_bench;
mod fleets_bench;
mod follow_bench;
mod leader_bench;
mod rollout_bench;
mod scale_bench;
mod trust_bench;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "IoT platform benchmarks (real nats-server, podman, API server)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Agent RSS with 10 deployments idle, and binary size.
    AgentFootprint,
    /// KV put -> Running, against raw podman create+start.
    ReconcileOverhead {
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// One Deployment targeting N devices: apply -> every key, vs raw puts.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Also print where the time goes: the operator logs every API request
        /// (`RUST_LOG=info,kube_client=debug`), merged into a timeline from the apply
        /// call to the last key. The logging costs a little; time the ratio without.
        #[arg(long)]
        breakdown: bool,
    },
    /// One Deployment over N simulated devices: a new score without `spec.rollout`
    /// (the floor: apply -> every device reported it Running and the status says
    /// so) against one in 10 batches (10 %, 20 % ... 100 %, no bake time: apply ->
    /// `.status.rollout.phase: Complete`), alternating, `--runs` times each. Also the
    /// time per batch step and dispatch order (desired-state KV times), and the
    /// operator's CPU and RSS sampled every 0.5 s. Markdown rows, then one JSON line.
    Rollout {
        #[command(flatten)]
        fleet: RolloutFleet,
    },
    /// Abort latency: 10-batch rollouts with `onFailure: Rollback` in which the
    /// devices of batch `--fail-batch` report the new revision Failed. From the first
    /// failure report stored in `agent-status` to (i) the last dispatch of the new
    /// revision and (ii) the stable revision written back to every device that had
    /// it, all KV times. Markdown rows, then one JSON line with every run.
    RolloutAbort {
        #[command(flatten)]
        fleet: RolloutFleet,
        /// The batch (1-based, 2..10) whose devices fail the new revision.
        #[arg(long, default_value_t = 3)]
        fail_batch: usize,
        /// `spec.rollout.maxUnavailable` (a count or a percentage such as `2%`), so
        /// that a batch is dispatched over several steps; default: no cap.
        #[arg(long)]
        max_unavailable: Option<String>,
    },
    /// Aggregator at scale: N synthetic devices over 20 Deployments.
    FleetStatus {
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        #[arg(long, default_value_t = 30)]
        steady_secs: u64,
    },
    /// N devices behind the auth callout: connect storm, follow with scoped
    /// permissions against the open server, reconnect storm.
    AuthScale {
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Length of the steady-state CPU sample.
        #[arg(long, default_value_t = 30)]
        steady_secs: u64,
    },
    /// The dashboard at N devices: page times and sizes against a static asset,
    /// SSE notice rate and latency.
    DashboardScale {
        #[arg(long, default_value_t = 10000)]
        devices: usize,
    },
    /// Two operator replicas on the full kube-apiserver: kill -9 and SIGTERM the
    /// leader in turn, time until the standby leads.
    LeaderFailover {
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long, default_value_t = 15)]
        lease_secs: u64,
    },
    /// N devices following their desired state without consumers: server RSS,
    /// consumers, change propagation, steady-state CPU, and the re-read herd after a
    /// server restart.
    FollowScale {
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        #[arg(long, default_value_t = 20)]
        connections: usize,
        /// Full re-read period of every simulated device (the agent default is 10 s).
        #[arg(long, default_value_t = 10)]
        resync_secs: u64,
        /// Spread of the full re-read after a reconnect (the agent default is 3 s;
        /// 0 re-reads at once, as agents before the fix did).
        #[arg(long, default_value_t = 3.0)]
        reconnect_read_spread_secs: f64,
    },
    /// A change to each of N devices: the message body applied (before) against a
    /// signal then a read through the responder (now), in one run.
    SignalFollow {
        #[arg(long, default_value_t = 10000)]
        devices: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// How the responder reads: `index` (the operator's index of the bucket,
        /// what it runs) or `stream` (a batched direct get per read).
        #[arg(long, default_value = "index")]
        responder: String,
    },
    /// N devices' status relay latency, without and with one flooding device.
    RelayFlood {
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        #[arg(long, default_value_t = 20)]
        window_secs: u64,
        /// Quiet and flooded windows taking turns, per relay.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// The flood's rate in megabits a second (0: as fast as its connection
        /// takes it). 100 is a device on a fast LAN.
        #[arg(long, default_value_t = 100.0)]
        flood_mbps: f64,
    },
    /// N registered Devices heartbeating: Device status writes per second to fill,
    /// idle, with paced lastSeenAt refreshes, and with a share of devices flapping.
    DeviceStatusWrites {
        #[arg(long, default_value_t = 10000)]
        devices: usize,
        /// Share of devices that go silent past IOT_STALE_AFTER and come back, again
        /// and again (0: none).
        #[arg(long, default_value_t = 1.0)]
        flap_percent: f64,
        /// Length of each measured window (the flapping one is rounded up to whole
        /// flap cycles).
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// The operator's IOT_DEVICE_LAST_SEEN_EVERY, in seconds (its default: 900).
        #[arg(long, default_value_t = 900)]
        last_seen_every_secs: u64,
        /// How often every synthetic device reports (the agent default is 10 s).
        #[arg(long, default_value_t = 10)]
        heartbeat_secs: u64,
        /// The operator's IOT_STALE_AFTER, in seconds (its default: 30).
        #[arg(long, default_value_t = 30)]
        stale_after_secs: u64,
    },
    /// N labelled Devices and M selector Deployments: relabel one device, move one
    /// selector; time until the keys are right and the KV writes it took.
    SelectorTargeting {
        #[arg(long, default_value_t = 10000)]
        devices: usize,
        #[arg(long, default_value_t = 1000)]
        deployments: usize,
        /// Distinct `site` label values; deployment k selects site k mod sites.
        #[arg(long, default_value_t = 40)]
        sites: usize,
        /// Relabels and selector moves measured (medians reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Apply the Deployments one by one to a running operator, at most 8 not yet
        /// written (default: every Deployment exists before the operator starts).
        #[arg(long)]
        paced: bool,
    },
    /// Concurrent pipelined KV writes on one JetStream context (what many
    /// Deployments reconciling at once do): done, or wedged.
    WriteContention {
        #[arg(long, default_value_t = 40)]
        batches: usize,
        #[arg(long, default_value_t = 250)]
        ops: usize,
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// N simulated devices (the agent's follower, reconciler with the in-memory
    /// runtime, and status reporter; each on its own TLS connection with its own
    /// name and inbox) in child processes, on one nats-server or an N-member
    /// cluster: connect storm, steady state, and `--runs` applies to every device
    /// (apply -> every device reported it Running: p50, p99, max), with per-server
    /// memory and CPU. Markdown rows, then one JSON line.
    ScaleE2e {
        #[arg(long, default_value_t = 10000)]
        devices: usize,
        /// 1: one nats-server; more: a JetStream cluster of that many members.
        #[arg(long, default_value_t = 1)]
        servers: usize,
        /// Replicas of both buckets (at most the number of servers).
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Devices (connections) per agents process; a process may hold 20,000 fds.
        #[arg(long, default_value_t = 15000)]
        per_process: usize,
        /// Connects in flight per agents process during the storm.
        #[arg(long, default_value_t = 64)]
        connect_parallel: usize,
        #[arg(long, default_value_t = 10)]
        heartbeat_secs: u64,
        #[arg(long, default_value_t = 10)]
        resync_secs: u64,
        /// The reconciler's settle wait after replacing a container (the agent's
        /// default is 3 s; 0 measures the platform, not the wait).
        #[arg(long, default_value_t = 0)]
        settle_ms: u64,
        #[arg(long, default_value_t = 30)]
        steady_secs: u64,
        /// `sync_interval: always` on every server.
        #[arg(long)]
        sync_always: bool,
        /// async-nats read buffer of each simulated device's client (its default is
        /// 65535; the server side is what is measured).
        #[arg(long, default_value_t = 8192)]
        read_buffer: u16,
        /// Stop everything when the machine's MemAvailable drops below this (MiB).
        #[arg(long, default_value_t = 1500)]
        min_free_mib: u64,
        /// How often each simulated device's client pings its server (the agent's
        /// default is 3 s).
        #[arg(long, default_value_t = 3)]
        ping_secs: u64,
    },
    /// `sync_interval` default against `always` on a cluster with R3 buckets:
    /// KV put throughput and apply-to-every-key time, alternating, medians.
    SyncInterval {
        #[arg(long, default_value_t = 3)]
        servers: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long, default_value_t = 40000)]
        puts: usize,
        #[arg(long, default_value_t = 8)]
        writers: usize,
        #[arg(long, default_value_t = 64)]
        window: usize,
        #[arg(long, default_value_t = 10000)]
        devices: usize,
    },
    /// The simulated devices of `scale-e2e`, run by it as a child process.
    #[command(hide = true)]
    ScaleAgents {
        #[arg(long, value_delimiter = ',')]
        urls: Vec<String>,
        #[arg(long)]
        ca: std::path::PathBuf,
        #[arg(long)]
        from: usize,
        #[arg(long)]
        to: usize,
        #[arg(long)]
        parallel: usize,
        #[arg(long)]
        heartbeat_secs: u64,
        #[arg(long)]
        resync_secs: u64,
        #[arg(long)]
        settle_ms: u64,
        #[arg(long)]
        read_buffer: u16,
        #[arg(long)]
        ping_secs: u64,
    },
    /// As device `flooder`, sends 250 KB statuses to $NATS_URL until killed.
    #[command(hide = true)]
    Flood {
        #[arg(long, default_value_t = 0.0)]
        mbps: f64,
    },
    /// Runs one operator service (read, relay) against $NATS_URL until killed: the
    /// benchmarks above measure it as a process of its own.
    #[command(hide = true)]
    Serve { service: String },
}

/// The simulated fleet of the rollout benchmarks.
#[derive(clap::Args)]
struct RolloutFleet {
    #[arg(long, default_value_t = 10000)]
    devices: usize,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// How long after a simulated device sees its key change it reports the new
    /// payload (Running, or Failed when told to fail it).
    #[arg(long, default_value_t = 200)]
    report_delay_ms: u64,
    /// How often every simulated device re-reports what it runs (the agent's
    /// default is 10 s).
    #[arg(long, default_value_t = 10)]
    heartbeat_secs: u64,
    /// The operator's IOT_ROLLOUT_TICK: how often an unfinished rollout is stepped
    /// (its default is 1s).
    #[arg(long, default_value = "1s")]
    rollout_tick: String,
}

impl RolloutFleet {
    fn args(self, fail_batch: usize, max_unavailable: Option<String>) -> rollout_bench::Args {
        rollout_bench::Args {
            devices: self.devices,
            runs: self.runs,
            report_delay_ms: self.report_delay_ms,
            heartbeat_secs: self.heartbeat_secs,
            rollout_tick: self.rollout_tick,
            fail_batch,
            max_unavailable,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    iot_observe::process::init_logging(false, "error");
    match Cli::parse().cmd {
        Cmd::AgentFootprint => agent_bench::footprint().await,
        Cmd::ReconcileOverhead { runs } => agent_bench::overhead(runs).await,
        Cmd::Fanout { devices, breakdown } => fanout_bench::run(devices, breakdown).await,
        Cmd::Rollout { fleet } => rollout_bench::rollout(fleet.args(0, None)).await,
        Cmd::RolloutAbort {
            fleet,
            fail_batch,
            max_unavailable,
        } => rollout_bench::abort(fleet.args(fail_batch, max_unavailable)).await,
        Cmd::FleetStatus { devices, steady_secs } => fleet_bench::run(devices, steady_secs).await,
        Cmd::AuthScale { devices, steady_secs } => auth_bench::run(devices, steady_secs).await,
        Cmd::LeaderFailover { rounds, lease_secs } => leader_bench::run(rounds, lease_secs).await,
        Cmd::DashboardScale { devices } => dashboard_bench::run(devices).await,
        Cmd::FollowScale {
            devices,
            connections,
            resync_secs,
            reconnect_read_spread_secs,
        } => follow_bench::run(devices, connections, resync_secs, reconnect_read_spread_secs).await,
        Cmd::SignalFollow {
            devices,
            rounds,
            responder,
        } => trust_bench::signal_follow(devices, rounds, &responder).await,
        Cmd::RelayFlood {
            devices,
            window_secs,
            rounds,
            flood_mbps,
        } => trust_bench::relay_flood(devices, window_secs, rounds, flood_mbps).await,
        Cmd::DeviceStatusWrites {
            devices,
            flap_percent,
            secs,
            last_seen_every_secs,
            heartbeat_secs,
            stale_after_secs,
        } => {
            fleets_bench::device_status_writes(fleets_bench::StatusArgs {
                devices,
                flap_percent,
                secs,
                last_seen_every_secs,
                heartbeat_secs,
                stale_after_secs,
            })
            .await
        }
        Cmd::SelectorTargeting {
            devices,
            deployments,
            sites,
            rounds,
            paced,
        } => {
            fleets_bench::selector_targeting(fleets_bench::SelectorArgs {
                devices,
                deployments,
                sites,
                rounds,
                paced,
            })
            .await
        }
        Cmd::WriteContention {
            batches,
            ops,
            timeout_secs,
        } => contention_bench::run(batches, ops, std::time::Duration::from_secs(timeout_secs)).await,
        Cmd::ScaleE2e {
            devices,
            servers,
            replicas,
            runs,
            per_process,
            connect_parallel,
            heartbeat_secs,
            resync_secs,
            settle_ms,
            steady_secs,
            sync_always,
            read_buffer,
            min_free_mib,
            ping_secs,
        } => {
            scale_bench::run(scale_bench::Args {
                devices,
                servers,
                replicas: replicas.min(servers),
                runs,
                per_process,
                connect_parallel,
                heartbeat_secs,
                resync_secs,
                settle_ms,
                steady_secs,
                sync_always,
                read_buffer,
                min_free_mib,
                ping_secs,
            })
            .await
        }
        Cmd::SyncInterval {
            servers,
            runs,
            puts,
            writers,
            window,
            devices,
        } => {
            cluster_bench::run(cluster_bench::Args {
                servers,
                runs,
                puts,
                writers,
                window,
                devices,
            })
            .await
        }
        Cmd::ScaleAgents {
            urls,
            ca,
            from,
            to,
            parallel,
            heartbeat_secs,
            resync_secs,
            settle_ms,
            read_buffer,
            ping_secs,
        } => {
            scale_bench::agents(scale_bench::AgentArgs {
                urls,
                ca,
                from,
                to,
                parallel,
                heartbeat_secs,
                resync_secs,
                settle_ms,
                read_buffer,
                ping_secs,
            })
            .await
        }
        Cmd::Flood { mbps } => trust_bench::flood(mbps).await,
        Cmd::Serve { service } => trust_bench::serve(&service).await,
    }
}
