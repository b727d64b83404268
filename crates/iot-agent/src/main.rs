use clap::Parser;
use iot_agent::config::AgentConfig;
use iot_observe::process::{init_logging, shutdown_signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = AgentConfig::parse();
    init_logging(config.log_json, "info");
    iot_agent::agent::run(config, shutdown_signal()).await
}
