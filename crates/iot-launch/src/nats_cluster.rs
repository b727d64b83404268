//! A JetStream cluster of real nats-server processes on one host: each member with
//! its own store, client port and route port, routes in mutual TLS with the stack's
//! CA, and the same accounts (and auth callout) on every member.
//!
//! Members are [`NatsServer`]s, so a test kills one with [`NatsServer::stop`]
//! (SIGKILL) and brings it back with [`NatsServer::restart`] on its port and store.

use std::path::Path;
use std::time::Duration;

use crate::nats::NatsServer;
use crate::process::{free_port, wait_until};
use crate::tls::{Ca, TlsMode};

/// The cluster's name in every member's `cluster` block.
pub const CLUSTER_NAME: &str = "iot";

/// Where every member serves its monitoring endpoints (`/varz`, `/connz`,
/// `/jsz`, `/healthz`): loopback only, whatever address it takes clients on. They
/// need no credentials and list every connection's name and address, which a
/// device on the bridge must not read.
pub const MONITOR_HOST: &str = "127.0.0.1";

/// How a cluster is started.
#[derive(Debug, Clone)]
pub struct ClusterOptions<'a> {
    /// Members: 3 tolerates the loss of one (a quorum is two).
    pub size: usize,
    /// Listen address of every port (loopback, or a bridge's gateway).
    pub host: &'a str,
    /// Where the members' directories go.
    pub parent: &'a Path,
    /// Configuration every member shares (accounts, the auth callout).
    pub shared_config: Option<String>,
    /// `jetstream.sync_interval`: `None` keeps the server's default (fsync every
    /// 2 minutes), `Some("always")` fsyncs every write.
    pub sync_interval: Option<String>,
}

/// Running members, in start order; member `i` is named `nats-i`.
pub struct NatsCluster {
    members: Vec<NatsServer>,
    monitor_ports: Vec<u16>,
}

impl NatsCluster {
    /// Starts every member and waits until each says JetStream is healthy (the
    /// cluster elected a meta leader and the member caught up with it).
    pub async fn start(options: &ClusterOptions<'_>, ca: &Ca) -> anyhow::Result<Self> {
        anyhow::ensure!(options.size >= 1, "a cluster needs at least one member");
        let mut ports = Vec::new();
        for _ in 0..options.size {
            ports.push((free_port()?, free_port()?, free_port()?));
        }
        let host = options.host;
        let mut members = Vec::new();
        for (i, (client, route, monitor)) in ports.iter().enumerate() {
            let name = member_name(i);
            let (cert, key) = ca.issue(&format!("{name}-{client}"), &[host, "127.0.0.1", "localhost"])?;
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, r, _))| format!("\"nats-route://{host}:{r}\""))
                .collect();
            let sync = options
                .sync_interval
                .as_deref()
                .map(|s| format!("sync_interval: {s}"))
                .unwrap_or_default();
            let config = format!(
                "server_name: {name}\n\
                 http: \"{MONITOR_HOST}:{monitor}\"\n\
                 jetstream {{ {sync} }}\n\
                 cluster {{\n  name: {CLUSTER_NAME}\n  listen: \"{host}:{route}\"\n  routes: [ {routes} ]\n  \
                 tls {{ cert_file: \"{cert}\", key_file: \"{key}\", ca_file: \"{ca}\", verify: true, timeout: 5 }}\n}}\n\
                 {shared}\n",
                routes = routes.join(", "),
                cert = cert.display(),
                key = key.display(),
                ca = ca.cert_file().display(),
                shared = options.shared_config.as_deref().unwrap_or(""),
            );
            members.push(NatsServer::start_member(host, options.parent, &config, *client, TlsMode::Ca(ca)).await?);
        }
        let me = Self {
            members,
            monitor_ports: ports.iter().map(|(_, _, m)| *m).collect(),
        };
        for i in 0..me.members.len() {
            me.wait_healthy(i).await?;
        }
        Ok(me)
    }

    /// Waits until member `i` answers `/healthz` with 200: it runs, and its JetStream
    /// is current with the cluster.
    pub async fn wait_healthy(&self, i: usize) -> anyhow::Result<()> {
        wait_healthy(self.monitor_ports[i], i).await
    }

    /// Every member's client URL, in member order.
    pub fn urls(&self) -> Vec<String> {
        self.members.iter().map(NatsServer::url).collect()
    }

    /// The URLs as one `NATS_URL` value (comma-separated). Clients shuffle them, so a
    /// fleet spreads over the members.
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }

    pub fn member(&self, i: usize) -> &NatsServer {
        &self.members[i]
    }

    pub fn member_mut(&mut self, i: usize) -> &mut NatsServer {
        &mut self.members[i]
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The member index of a server name (`nats-2` -> 2), as stream info and
    /// `/readyz` report it.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        member_index(name).filter(|i| *i < self.members.len())
    }

    /// The monitoring port (`/varz`, `/jsz`, `/healthz`) of member `i`, on
    /// [`MONITOR_HOST`].
    pub fn monitor_port(&self, i: usize) -> u16 {
        self.monitor_ports[i]
    }

    /// Gives the members up with their monitoring ports (a stack that keeps them
    /// individually).
    pub fn into_parts(self) -> (Vec<NatsServer>, Vec<u16>) {
        (self.members, self.monitor_ports)
    }
}

/// Waits until the member `i` whose monitoring port is `port` answers `/healthz`
/// with 200 (for a caller that keeps the members apart from their cluster).
pub async fn wait_healthy(port: u16, i: usize) -> anyhow::Result<()> {
    wait_until(
        Duration::from_secs(60),
        &format!("{} /healthz", member_name(i)),
        || async move { (crate::http::get_status(MONITOR_HOST, port, "/healthz").await.ok()? == 200).then_some(()) },
    )
    .await
}

/// The member index in a server name (`nats-2` -> 2).
pub fn member_index(name: &str) -> Option<usize> {
    name.strip_prefix("nats-")?.parse().ok()
}

/// The server name of member `i`.
pub fn member_name(i: usize) -> String {
    format!("nats-{i}")
}
