//! Command line and environment configuration. Every flag is also an env variable.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use harmony_reconciler_contracts::Id;
use iot_nats::NatsArgs;

#[derive(Debug, Clone, Parser)]
#[command(name = "iot-agent", version, about = "Runs this device's desired state with podman")]
pub struct AgentConfig {
    /// This device's id: 1-64 characters of A-Z a-z 0-9 _ -.
    #[arg(long, env = "IOT_DEVICE_ID", value_parser = parse_id)]
    pub device_id: Id,

    #[command(flatten)]
    pub nats: NatsArgs,

    /// Podman API socket (`podman system service`).
    #[arg(long, env = "PODMAN_SOCKET", default_value = "/run/podman/podman.sock")]
    pub podman_socket: PathBuf,

    /// How often to publish status even when nothing changed.
    #[arg(long, env = "IOT_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,

    /// How often to re-read desired state and re-check containers.
    #[arg(long, env = "IOT_RESYNC_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub resync_interval: Duration,

    /// Grace period for a container to stop before it is killed.
    #[arg(long, env = "IOT_STOP_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub stop_timeout: Duration,

    /// Longest podman may take to answer a read (list, inspect, image exists, info,
    /// the event stream's connect). A podman that accepts calls but does not
    /// answer in time counts as unavailable: every deployment is reported Failed
    /// until it answers again. Calls that change containers get four times as long
    /// (stop and remove also the stop timeout); pulls have --pull-timeout.
    #[arg(long, env = "IOT_RUNTIME_CALL_TIMEOUT", default_value = "5s", value_parser = parse_timeout)]
    pub runtime_call_timeout: Duration,

    /// Longest an image pull may take (pulls run in the background, one per image).
    #[arg(long, env = "IOT_PULL_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    pub pull_timeout: Duration,

    /// How long a replacement container must stay up, without restarting, before the
    /// container it replaces is removed. 0s disables the check.
    #[arg(long, env = "IOT_UPGRADE_SETTLE", default_value = "3s", value_parser = humantime::parse_duration)]
    pub upgrade_settle: Duration,

    /// Serve Prometheus metrics, /healthz and /readyz on this address (off by default).
    #[arg(long, env = "IOT_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "IOT_LOG_JSON")]
    pub log_json: bool,
}

fn parse_id(s: &str) -> Result<Id, String> {
    Id::new(s).map_err(|e| e.to_string())
}

/// A duration that is not zero (a zero deadline would fail every call).
fn parse_timeout(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be longer than 0s".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<AgentConfig, clap::Error> {
        let mut argv = vec!["iot-agent", "--device-id", "pi-1"];
        argv.extend_from_slice(args);
        AgentConfig::try_parse_from(argv)
    }

    #[test]
    fn the_runtime_call_timeout_is_short_by_default_and_separate_from_pulls() {
        // Not read from the environment of whoever runs the tests.
        if std::env::var_os("IOT_RUNTIME_CALL_TIMEOUT").is_some() || std::env::var_os("IOT_PULL_TIMEOUT").is_some() {
            return;
        }
        let c = parse(&[]).expect("defaults");
        assert_eq!(c.runtime_call_timeout, Duration::from_secs(5));
        assert_eq!(c.pull_timeout, Duration::from_secs(600));
        let c = parse(&["--runtime-call-timeout", "2s500ms"]).expect("flag");
        assert_eq!(c.runtime_call_timeout, Duration::from_millis(2500));
        assert!(parse(&["--runtime-call-timeout", "0s"]).is_err());
    }
}
