//! `iot-auth-callout`: the NATS auth callout service. Run two or more replicas; they
//! share requests through a queue group.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use iot_auth::callout::{Callout, CalloutConfig, CalloutMetrics};
use iot_auth::claims::ClaimMapping;
use iot_auth::enrollment::{BaoCredentials, Enrollments};
use iot_auth::oidc::Verifier;
use iot_bao::Bao;
use iot_bao::enroll::Enrollment;
use iot_nats::UserPassword;
use iot_observe::Readiness;
use iot_observe::supervise::{Tasks, next_ending};
use nkeys::{KeyPair, XKey};
use prometheus_client::registry::Registry;

#[derive(Debug, Parser)]
#[command(
    name = "iot-auth-callout",
    version,
    about = "NATS auth callout: OIDC identity tokens in, scoped short-lived NATS users out"
)]
struct Args {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        env = "NATS_URL",
        value_delimiter = ',',
        default_value = "tls://127.0.0.1:4222"
    )]
    nats_url: Vec<String>,

    /// PEM file of the CA that signed the NATS server's certificate (the system's
    /// roots without it).
    #[arg(long, env = "NATS_CA_FILE")]
    nats_ca_file: Option<PathBuf>,

    /// Talk to NATS without TLS when the URL is nats://, and to OpenBao or the token
    /// issuer over http://. For debugging only: the callout's password and OpenBao
    /// credentials then cross the network in the clear, and issuer keys fetched
    /// over http:// can be replaced on the way.
    #[arg(long, env = "NATS_INSECURE")]
    nats_insecure: bool,

    /// PEM file of the CA that signed OpenBao's certificate.
    #[arg(long, env = "BAO_CACERT")]
    bao_ca_file: Option<PathBuf>,

    /// PEM file of the CA that signed the token issuer's certificate (default: the
    /// OpenBao CA, as OpenBao is the default issuer).
    #[arg(long, env = "IOT_AUTH_OIDC_CA_FILE")]
    oidc_ca_file: Option<PathBuf>,

    /// The callout's own NATS user: in the auth account, listed in nats-server's
    /// `auth_callout.auth_users`.
    #[arg(long, env = "IOT_AUTH_NATS_USER", default_value = "auth")]
    nats_user: String,

    /// File holding that user's password.
    #[arg(long, env = "IOT_AUTH_NATS_PASSWORD_FILE")]
    nats_password_file: PathBuf,

    /// File holding the issuer account's nkey seed (`SA...`), whose public key is
    /// nats-server's `auth_callout.issuer`.
    #[arg(long, env = "IOT_AUTH_ISSUER_SEED_FILE")]
    issuer_seed_file: PathBuf,

    /// File holding the curve key seed (`SX...`) whose public key is nats-server's
    /// `auth_callout.xkey`. Without it, requests must arrive unsealed.
    #[arg(long, env = "IOT_AUTH_XKEY_SEED_FILE")]
    xkey_seed_file: Option<PathBuf>,

    /// Account that admitted clients are placed in.
    #[arg(long, env = "IOT_AUTH_ACCOUNT", default_value = "IOT")]
    account: String,

    /// Trusted OIDC issuer (OpenBao: `<addr>/v1/identity/oidc`; Zitadel: its domain).
    #[arg(long, env = "IOT_AUTH_OIDC_ISSUER")]
    oidc_issuer: String,

    /// Audience identity tokens must carry.
    #[arg(long, env = "IOT_AUTH_OIDC_AUDIENCE", default_value = "iot-nats")]
    oidc_audience: String,

    /// Claim holding a device's id.
    #[arg(long, env = "IOT_AUTH_DEVICE_ID_CLAIM", default_value = "device_id")]
    device_id_claim: String,

    /// Claim holding a service's name.
    #[arg(long, env = "IOT_AUTH_NAME_CLAIM", default_value = "iot_name")]
    name_claim: String,

    /// OpenBao holding enrollment records.
    #[arg(long, env = "BAO_ADDR")]
    bao_addr: String,

    /// The callout's own enrollment (`iotctl service enroll --role callout`).
    #[arg(long, env = "IOT_AUTH_BAO_ENROLLMENT", conflicts_with = "bao_token_file")]
    bao_enrollment: Option<PathBuf>,

    /// Or an OpenBao token in a file.
    #[arg(long, env = "IOT_AUTH_BAO_TOKEN_FILE")]
    bao_token_file: Option<PathBuf>,

    /// How long OpenBao gets to answer before the cache decides. nats-server waits
    /// about 2 s for the whole decision, so keep this well below.
    #[arg(long, env = "IOT_AUTH_BAO_TIMEOUT", default_value = "500ms", value_parser = humantime::parse_duration)]
    bao_timeout: Duration,

    /// Clock skew tolerated between the token issuer and this service.
    #[arg(long, env = "IOT_AUTH_CLOCK_LEEWAY", default_value = "30s", value_parser = humantime::parse_duration)]
    clock_leeway: Duration,

    /// OpenBao lookups in flight at most; beyond that, and after waiting
    /// --bao-queue-wait, the cache decides.
    #[arg(long, env = "IOT_AUTH_BAO_CONCURRENCY", default_value_t = 32)]
    bao_concurrency: usize,

    /// How long a lookup waits for its turn before the cache decides.
    #[arg(long, env = "IOT_AUTH_BAO_QUEUE_WAIT", default_value = "100ms", value_parser = humantime::parse_duration)]
    bao_queue_wait: Duration,

    /// Requests older than this are dropped unanswered; match nats-server's
    /// `authorization.timeout` (the generated configuration sets 5 s).
    #[arg(long, env = "IOT_AUTH_REQUEST_MAX_AGE", default_value = "5s", value_parser = humantime::parse_duration)]
    request_max_age: Duration,

    /// Longest life of a NATS user (never longer than the presented token).
    #[arg(long, env = "IOT_AUTH_USER_TTL", default_value = "10m", value_parser = humantime::parse_duration)]
    user_ttl: Duration,

    /// While OpenBao is unavailable, identities it vouched for within this long are
    /// still admitted.
    #[arg(long, env = "IOT_AUTH_MAX_STALE", default_value = "24h", value_parser = humantime::parse_duration)]
    max_stale: Duration,

    /// How often the whole list of enrolled identities is loaded (what an OpenBao
    /// outage falls back on).
    #[arg(long, env = "IOT_AUTH_LIST_REFRESH", default_value = "60s", value_parser = humantime::parse_duration)]
    list_refresh: Duration,

    /// Address of /metrics, /healthz and /readyz ("off" for none).
    #[arg(long, env = "IOT_METRICS_ADDR", default_value = "127.0.0.1:9466")]
    metrics_addr: String,
}

fn read_secret(path: &PathBuf) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    iot_observe::process::init_logging(false, "info");
    let args = Args::parse();
    let issuer = KeyPair::from_seed(&read_secret(&args.issuer_seed_file)?)
        .map_err(|e| anyhow::anyhow!("issuer seed in {}: {e}", args.issuer_seed_file.display()))?;
    let xkey = match &args.xkey_seed_file {
        Some(p) => {
            Some(XKey::from_seed(&read_secret(p)?).map_err(|e| anyhow::anyhow!("xkey seed in {}: {e}", p.display()))?)
        }
        None => None,
    };
    let credentials = match (&args.bao_enrollment, &args.bao_token_file) {
        (Some(p), _) => {
            let e: Enrollment =
                serde_json::from_str(&read_secret(p)?).with_context(|| format!("parsing {}", p.display()))?;
            BaoCredentials::AppRole {
                role_id: e.role_id,
                secret_id: e.secret_id,
            }
        }
        (None, Some(p)) => BaoCredentials::Token(read_secret(p)?),
        (None, None) => anyhow::bail!("give --bao-enrollment or --bao-token-file"),
    };
    anyhow::ensure!(
        !args.bao_addr.starts_with("http://") || args.nats_insecure,
        "OpenBao at {} is not TLS: the callout's credentials would cross the network in the clear (use https://, or NATS_INSECURE=true for a debugging stack)",
        args.bao_addr
    );
    anyhow::ensure!(
        !args.oidc_issuer.starts_with("http://") || args.nats_insecure,
        "the token issuer {} is not TLS: its signing keys could be replaced on the way (use https://, or NATS_INSECURE=true for a debugging stack)",
        args.oidc_issuer
    );
    let bao = Bao::with_ca(&args.bao_addr, args.bao_ca_file.as_deref())?.with_timeout(args.bao_timeout);
    let verifier = Verifier::new(
        &args.oidc_issuer,
        &args.oidc_audience,
        args.oidc_ca_file.as_deref().or(args.bao_ca_file.as_deref()),
    )?
    .with_leeway(args.clock_leeway);
    let metrics = Arc::new(CalloutMetrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let readiness = Readiness::default();
    let mut tasks = Tasks::new();
    if args.metrics_addr != "off" {
        let addr: SocketAddr = args.metrics_addr.parse().context("--metrics-addr")?;
        let server = iot_observe::serve(addr, Arc::new(Mutex::new(registry)), readiness.clone()).await?;
        tasks.spawn(async move { ("metrics server", server.await.map_err(Into::into)) });
    }
    // The keys are fetched on demand too; fetching now makes a wrong issuer URL an
    // obvious error at startup rather than a refused connect later.
    match verifier.refresh().await {
        Ok(n) => tracing::info!(issuer = %verifier.issuer(), keys = n, "issuer keys loaded"),
        Err(e) => {
            tracing::warn!(issuer = %verifier.issuer(), error = %e, "issuer keys not loaded yet; will retry on the first connect")
        }
    }
    let callout = Arc::new(Callout {
        config: CalloutConfig {
            issuer,
            xkey,
            account: args.account.clone(),
            user_ttl: args.user_ttl,
            request_max_age: args.request_max_age,
            mapping: ClaimMapping {
                device_id_claim: args.device_id_claim.clone(),
                name_claim: args.name_claim.clone(),
            },
        },
        verifier,
        enrollments: Enrollments::new(bao, credentials, args.max_stale)
            .with_limits(args.bao_concurrency, args.bao_queue_wait),
        metrics,
    });
    let own = UserPassword {
        user: args.nats_user.clone(),
        password: read_secret(&args.nats_password_file)?,
    };
    let options = iot_nats::ClientOptions::new("iot-auth-callout")
        .background()
        .tls(iot_nats::NatsTls {
            ca_file: args.nats_ca_file.clone(),
            required: !args.nats_insecure,
        })
        .inbox_prefix(iot_auth::permissions::CALLOUT_INBOX_PREFIX);
    let conn = iot_nats::connect_with(&args.nats_url, &own, &options).await?;
    {
        let callout = callout.clone();
        let period = args.list_refresh;
        tasks.spawn(async move {
            callout.enrollments.keep_refreshed(period, &callout.metrics).await;
            ("enrollment list refresher", Ok(()))
        });
    }
    let client = conn.client.clone();
    let ready = readiness.clone();
    tasks.spawn(async move {
        (
            "callout",
            callout.run(client, move || ready.set_ready()).await.map_err(Into::into),
        )
    });
    tokio::select! {
        e = next_ending(&mut tasks) => Err(e.into()),
        () = iot_observe::process::shutdown_signal() => Ok(()),
    }
}
