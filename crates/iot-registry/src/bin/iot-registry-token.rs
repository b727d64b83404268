//! `iot-registry-token`: the registry's token service (docker-registry `auth.token`
//! realm). Devices pull with the operator's grants; publishers push with their own
//! credentials. Stateless: run as many as you like behind one address.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use iot_registry::SigningKey;
use iot_registry::realm::{RealmConfig, parse_publishers};
use iot_registry::server::{TokenService, serve, tls_acceptor};

#[derive(Debug, Parser)]
#[command(
    name = "iot-registry-token",
    version,
    about = "Token service for the platform's container registry"
)]
struct Args {
    /// Address to serve HTTPS on.
    #[arg(long, env = "IOT_REGISTRY_TOKEN_LISTEN", default_value = "127.0.0.1:5001")]
    listen: SocketAddr,
    /// The service's TLS certificate chain (PEM).
    #[arg(long, env = "IOT_REGISTRY_TOKEN_TLS_CERT")]
    tls_cert: PathBuf,
    /// The service's TLS key (PEM).
    #[arg(long, env = "IOT_REGISTRY_TOKEN_TLS_KEY")]
    tls_key: PathBuf,
    /// The P-256 key (PKCS#8 PEM) whose certificate is the registry's `rootcertbundle`.
    #[arg(long, env = "IOT_REGISTRY_SIGNING_KEY")]
    signing_key: PathBuf,
    /// The registry's `auth.token.service`.
    #[arg(long, env = "IOT_REGISTRY_SERVICE", default_value = "iot-registry")]
    service: String,
    /// The registry's `auth.token.issuer`.
    #[arg(long, env = "IOT_REGISTRY_ISSUER", default_value = "iot-registry-token")]
    issuer: String,
    /// Lines `NAME SHA256HEX PATTERN[,PATTERN]`: who may push where. Optional.
    #[arg(long, env = "IOT_REGISTRY_PUBLISHERS")]
    publishers: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    iot_observe::process::init_logging(false, "info");
    let args = Args::parse();
    let key = SigningKey::from_pem_file(&args.signing_key)?;
    let publishers = match &args.publishers {
        Some(p) => parse_publishers(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
        None => Vec::new(),
    };
    let config = RealmConfig {
        issuer: args.issuer,
        service: args.service,
        public_key: key.public_key().to_vec(),
    };
    let tls = tls_acceptor(&args.tls_cert, &args.tls_key)?;
    let (addr, task) = serve(
        args.listen,
        tls,
        Arc::new(TokenService {
            key,
            config,
            publishers,
        }),
    )
    .await
    .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(%addr, "serving registry tokens");
    tokio::select! {
        () = iot_observe::process::shutdown_signal() => {}
        r = task => { r.context("token service stopped")?; }
    }
    Ok(())
}
