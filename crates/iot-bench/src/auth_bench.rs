//! The fleet behind the auth callout, against the open server, in one run:
//! - a connect storm of N devices, each with its own identity token, through two
//!   callout replicas that check every device's enrollment in a real OpenBao:
//!   connect latency (p50, p99), callout CPU and RSS, nats-server RSS;
//! - N devices following their desired state with scoped permissions (full reads
//!   through the read responder) against N devices on an open server (batched
//!   direct gets): nats-server RSS and steady-state CPU, JetStream consumers;
//! - a server restart: every device reconnects through the callout; the peak of
//!   JetStream consumers during that storm, and the time until all are back.
//!
//! Tokens come from a small issuer served by this process (Ed25519, discovery and
//! JWKS like any OIDC issuer): minting 10,000 through OpenBao's approle logins would
//! measure OpenBao, not us. Enrollment records are real OpenBao KV entries.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::{ConnectOptions, Event, jetstream};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use futures::StreamExt;
use harmony_reconciler_contracts::read::device_inbox_prefix;
use harmony_reconciler_contracts::*;
use iot_nats::follow::{FollowConfig, ReadPath};
use iot_nats::{DesiredView, NatsConnection, follow_desired_state};
use iot_testkit::auth::{CalloutKeys, CalloutLaunch, CalloutProcess};
use iot_testkit::{NatsServer, OpenBao};
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde_json::json;
use tokio::sync::watch;

use crate::util::{consumer_count, cpu_ticks, rss_kib, sibling_binary};

/// A minimal OIDC issuer: discovery + JWKS over HTTP, tokens signed here.
struct Issuer {
    key: Ed25519KeyPair,
    url: String,
    _server: tokio::task::JoinHandle<()>,
}

impl Issuer {
    async fn start() -> anyhow::Result<Self> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| anyhow::anyhow!("{e}"))?;
        let key = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let discovery = json!({"issuer": url, "jwks_uri": format!("{url}/jwks")}).to_string();
        let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": "bench",
            "x": URL_SAFE_NO_PAD.encode(key.public_key().as_ref())}]})
        .to_string();
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let (discovery, jwks) = (discovery.clone(), jwks.clone());
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 4096];
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]);
                    let body = if req.starts_with("GET /jwks") { jwks } else { discovery };
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(resp.as_bytes()).await;
                });
            }
        });
        Ok(Self {
            key,
            url,
            _server: server,
        })
    }

    fn mint(&self, role: &str, device: &str, name: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = json!({"iss": self.url, "aud": "iot-nats", "sub": subject(role, device, name),
            "iot_role": role, "device_id": device, "iot_name": name, "iat": now, "exp": now + 3600});
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"EdDSA","kid":"bench"}"#),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(self.key.sign(signed.as_bytes())))
    }
}

/// The subject the bench's issuer gives an identity (and its record names).
fn subject(role: &str, device: &str, name: &str) -> String {
    format!("bench-{role}-{device}{name}")
}

/// A client plus a reconnect counter, as `iot_nats::connect` makes them.
async fn client(nats: &NatsServer, mut opts: ConnectOptions) -> anyhow::Result<NatsConnection> {
    let url = nats.url();
    if let Some(ca) = nats.ca_file() {
        opts = opts.add_root_certificates(ca.to_path_buf()).require_tls(true);
    }
    let (tx, rx) = watch::channel(0u64);
    let tx = Arc::new(tx);
    let client = opts
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(iot_timing::reconnect_delay)
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                if matches!(e, Event::Connected) {
                    tx.send_modify(|n| *n += 1);
                }
            }
        })
        .connect(url)
        .await?;
    Ok(NatsConnection { client, connects: rx })
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

struct FollowNumbers {
    setup: Duration,
    rss_kib: u64,
    cpu_pct: f64,
    consumers: usize,
}

/// Starts one follower per connection and measures the server while they run.
async fn follow_all(
    conns: &[NatsConnection],
    read_path: ReadPath,
    nats_pid: u32,
    js: &jetstream::Context,
    steady: Duration,
) -> anyhow::Result<(FollowNumbers, Vec<watch::Receiver<DesiredView>>)> {
    let cfg = FollowConfig {
        read_timeout: Duration::from_secs(30),
        read_path,
        ..Default::default()
    };
    let t = Instant::now();
    let mut views = Vec::with_capacity(conns.len());
    for (i, c) in conns.iter().enumerate() {
        let (tx, rx) = watch::channel(DesiredView::default());
        tokio::spawn(follow_desired_state(
            c.clone(),
            Id::new(format!("dev{i}"))?,
            cfg.clone(),
            tx,
        ));
        views.push(rx);
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let pending = views
            .iter()
            .filter(|v| !(v.borrow().synced && v.borrow().entries.len() == 1))
            .count();
        if pending == 0 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "{pending} followers never synced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let setup = t.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu0 = cpu_ticks(nats_pid)?;
    tokio::time::sleep(steady).await;
    let cpu_pct = (cpu_ticks(nats_pid)? - cpu0) as f64 / steady.as_secs_f64();
    Ok((
        FollowNumbers {
            setup,
            rss_kib: rss_kib(nats_pid)?,
            cpu_pct,
            consumers: consumer_count(js, DESIRED_STATE_BUCKET).await?,
        },
        views,
    ))
}

async fn put_all(js: &jetstream::Context, n: usize) -> anyhow::Result<()> {
    let dep = DeploymentRef::new("default", "web")?;
    let score: IotScore =
        serde_json::from_value(json!({"PodmanV0": {"services": [{"name": "web", "image": "img:1"}]}}))?;
    let value = Bytes::from(DesiredState::new(dep, score).to_bytes());
    let mut acks = Vec::new();
    for i in 0..n {
        acks.push(
            js.publish(format!("$KV.{DESIRED_STATE_BUCKET}.dev{i}.default_web"), value.clone())
                .await?,
        );
        if acks.len() == 256 {
            for a in acks.drain(..) {
                a.await?;
            }
        }
    }
    for a in acks {
        a.await?;
    }
    Ok(())
}

pub async fn run(devices: usize, steady_secs: u64) -> anyhow::Result<()> {
    let steady = Duration::from_secs(steady_secs);
    // ---- Secured ----
    let bao = OpenBao::start().await?;
    let root = bao.root()?;
    let dir = tempfile::tempdir()?;
    let callout_enrollment = iot_bao::enroll::enroll_service(&root, "callout", iot_bao::enroll::Role::Callout).await?;
    let callout_file = dir.path().join("callout.json");
    iot_testkit::auth::write_private(&callout_file, &serde_json::to_string(&callout_enrollment)?)?;
    let t = Instant::now();
    futures::stream::iter(0..devices)
        .map(|i| {
            let root = root.clone();
            async move {
                root.kv_write(
                    "iot",
                    &format!("devices/dev{i}"),
                    &json!({"deviceId": format!("dev{i}"), "subject": subject("device", &format!("dev{i}"), "")}),
                )
                .await
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    root.kv_write(
        "iot",
        "services/operator",
        &json!({"name": "operator", "role": "operator", "subject": subject("operator", "", "operator")}),
    )
    .await?;
    eprintln!(
        "{devices} enrollment records written in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let issuer = Issuer::start().await?;
    let keys = CalloutKeys::generate()?;
    let monitor = iot_testkit::free_port()?;
    let config = format!(
        "{}\nhttp: \"127.0.0.1:{monitor}\"\nmax_payload: 1048576\n",
        keys.nats_config()
    );
    let ca = iot_testkit::Ca::create(&dir.path().join("ca"))?;
    let mut nats = NatsServer::start_custom(
        "127.0.0.1",
        &std::env::temp_dir(),
        Some(&config),
        &[],
        iot_testkit::TlsMode::Ca(&ca),
    )
    .await?;
    let nats_pid = nats.pid().ok_or_else(|| anyhow::anyhow!("no nats pid"))?;
    let binary = sibling_binary("iot-auth-callout")?;
    let mut callouts = Vec::new();
    for i in 0..2 {
        let launch = CalloutLaunch {
            binary: &binary,
            nats_url: &nats.url(),
            ca_file: Some(&ca.cert_file()),
            keys: &keys,
            dir: dir.path(),
            secrets_dir: dir.path(),
            bao_addr: &bao.addr(),
            enrollment_file: &callout_file,
            oidc_issuer: Some(issuer.url.clone()),
            user_ttl: Duration::from_secs(3600),
            // The bench's issuer serves plain HTTP on loopback.
            env: vec![
                ("RUST_LOG".into(), "warn".into()),
                ("NATS_INSECURE".into(), "true".into()),
            ],
        };
        callouts.push(CalloutProcess::spawn(&launch, &format!("callout-{i}")).await?);
    }
    let callout_pids: Vec<u32> = callouts.iter().filter_map(|c| c.process.pid()).collect();
    let admin = nats
        .client_with(ConnectOptions::with_user_and_password(
            "admin".into(),
            keys.admin_password.clone(),
        ))
        .await?;
    let js = jetstream::new(admin);
    iot_nats::buckets::ensure_buckets(&js).await?;
    put_all(&js, devices).await?;
    let operator = client(
        &nats,
        ConnectOptions::with_token(issuer.mint("operator", "", "operator")).custom_inbox_prefix(
            harmony_reconciler_contracts::read::service_inbox_prefix(
                harmony_reconciler_contracts::read::ServiceRole::Operator,
                &Id::new("operator")?,
            ),
        ),
    )
    .await?;
    tokio::spawn(iot_operator::device_services::desired_read::serve_desired_reads(
        operator.client.clone(),
        Duration::from_secs(30),
        None,
        iot_operator::device_services::no_counts(),
    ));
    let rss_idle = rss_kib(nats_pid)?;

    // The connect storm.
    let cpu0: u64 = callout_pids.iter().map(|p| cpu_ticks(*p).unwrap_or(0)).sum();
    let tokens: Vec<String> = (0..devices)
        .map(|i| issuer.mint("device", &format!("dev{i}"), ""))
        .collect();
    let storm = Instant::now();
    let nats_ref = &nats;
    let results: Vec<(usize, Duration, anyhow::Result<NatsConnection>)> =
        futures::stream::iter(tokens.into_iter().enumerate())
            .map(|(i, token)| {
                async move {
                    let t = Instant::now();
                    let dev = Id::new(format!("dev{i}")).unwrap_or_else(|e| panic!("{e}"));
                    let opts = ConnectOptions::with_token(token).custom_inbox_prefix(device_inbox_prefix(&dev));
                    let r = tokio::time::timeout(Duration::from_secs(60), client(nats_ref, opts))
                        .await
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("connect timed out")));
                    // retry_on_initial_connect returns at once; wait for the handshake.
                    let r = match r {
                        Ok(c) => {
                            let mut rx = c.connects.clone();
                            match tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|n| *n > 0)).await {
                                Ok(Ok(_)) => Ok(c),
                                _ => Err(anyhow::anyhow!("dev{i} never connected")),
                            }
                        }
                        Err(e) => Err(e),
                    };
                    (i, t.elapsed(), r)
                }
            })
            .buffer_unordered(256)
            .collect()
            .await;
    let storm_time = storm.elapsed();
    let callout_cpu: u64 = callout_pids.iter().map(|p| cpu_ticks(*p).unwrap_or(0)).sum::<u64>() - cpu0;
    let mut results = results;
    results.sort_by_key(|(i, _, _)| *i);
    let mut latencies: Vec<Duration> = results.iter().map(|(_, d, _)| *d).collect();
    latencies.sort();
    let mut conns = Vec::with_capacity(devices);
    for (i, _, r) in results {
        conns.push(r.map_err(|e| anyhow::anyhow!("dev{i}: {e}"))?);
    }
    let decisions = callout_decisions(&callouts).await;
    let callout_rss: Vec<String> = callout_pids
        .iter()
        .map(|p| rss_kib(*p).map(mib).unwrap_or_default())
        .collect();
    let rss_connected = rss_kib(nats_pid)?;
    println!("| connect storm: {devices} devices, 256 at a time, 2 callout replicas | |");
    println!(
        "| all connected after | {:.2} s ({:.0} connects/s) |",
        storm_time.as_secs_f64(),
        devices as f64 / storm_time.as_secs_f64()
    );
    println!(
        "| connect latency p50 / p99 / max | {} / {} / {} |",
        ms(pct(&latencies, 0.5)),
        ms(pct(&latencies, 0.99)),
        ms(pct(&latencies, 1.0))
    );
    println!(
        "| callout CPU during the storm (both replicas) | {:.2} s ({:.0} µs per connect) |",
        callout_cpu as f64 / 100.0,
        callout_cpu as f64 * 10_000.0 / devices as f64
    );
    println!("| callout RSS after the storm | {} |", callout_rss.join(" / "));
    println!(
        "| nats-server RSS: idle / all connected | {} / {} |",
        mib(rss_idle),
        mib(rss_connected)
    );
    println!("| callout decisions during the storm | {decisions} |");

    let (secured, views) = follow_all(&conns, ReadPath::Responder, nats_pid, &js, steady).await?;

    // The reconnect storm: the server restarts; every device comes back through the
    // callout and re-reads through the responder. Consumers sampled throughout.
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampler = {
        let peak = peak.clone();
        let js = js.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(n) = consumer_count(&js, DESIRED_STATE_BUCKET).await {
                    peak.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let before: Vec<u64> = conns.iter().map(|c| *c.connects.borrow()).collect();
    let restart = Instant::now();
    nats.restart().await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let back = conns
            .iter()
            .zip(&before)
            .filter(|(c, b)| *c.connects.borrow() > **b)
            .count();
        if back == devices {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "only {back}/{devices} devices reconnected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reconnected = restart.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    sampler.abort();
    let synced = views
        .iter()
        .filter(|v| v.borrow().synced && v.borrow().entries.len() == 1)
        .count();
    println!(
        "| after a server restart: every device reconnected through the callout | {:.2} s |",
        reconnected.as_secs_f64()
    );
    println!(
        "| JetStream consumers on desired-state, peak during the reconnect storm | {} |",
        peak.load(std::sync::atomic::Ordering::Relaxed)
    );
    println!("| followers holding their state after the storm | {synced}/{devices} |");
    println!(
        "| callout decisions in total | {} |",
        callout_decisions(&callouts).await
    );
    let log = std::fs::read_to_string(nats.log_path()).unwrap_or_default();
    let refused = log.lines().filter(|l| l.contains("authentication error")).count();
    println!("| connects refused by nats-server (while the callouts themselves reconnected) | {refused} |");
    for l in log
        .lines()
        .filter(|l| l.contains("authentication error") || l.contains("callout"))
        .take(3)
    {
        eprintln!("nats: {l}");
    }
    drop(views);
    drop(conns);
    drop(operator);
    drop(callouts);
    drop(nats);
    drop(bao);

    // ---- Open (today's mode) ----
    let monitor2 = iot_testkit::free_port()?.to_string();
    let open = NatsServer::start_with_args(&["-m", &monitor2]).await?;
    let open_pid = open.pid().ok_or_else(|| anyhow::anyhow!("no nats pid"))?;
    let admin = open.client().await?;
    let js2 = jetstream::new(admin);
    iot_nats::buckets::ensure_buckets(&js2).await?;
    put_all(&js2, devices).await?;
    let mut open_conns = Vec::with_capacity(devices);
    for _ in 0..devices {
        open_conns.push(client(&open, ConnectOptions::new()).await?);
    }
    let (baseline, _views) = follow_all(&open_conns, ReadPath::Direct, open_pid, &js2, steady).await?;

    println!(
        "| follow, {devices} devices on {devices} connections | open (direct get) | scoped (callout + responder) | ratio |"
    );
    println!("| --- | --- | --- | --- |");
    println!(
        "| first full read of every device | {:.2} s | {:.2} s | {:.2}x |",
        baseline.setup.as_secs_f64(),
        secured.setup.as_secs_f64(),
        secured.setup.as_secs_f64() / baseline.setup.as_secs_f64()
    );
    println!(
        "| nats-server RSS | {} | {} | {:.2}x |",
        mib(baseline.rss_kib),
        mib(secured.rss_kib),
        secured.rss_kib as f64 / baseline.rss_kib as f64
    );
    println!(
        "| nats-server CPU, steady state ({steady_secs} s) | {:.1} % | {:.1} % | {:.2}x |",
        baseline.cpu_pct,
        secured.cpu_pct,
        secured.cpu_pct / baseline.cpu_pct.max(0.01)
    );
    println!(
        "| JetStream consumers on desired-state | {} | {} | |",
        baseline.consumers, secured.consumers
    );
    Ok(())
}

/// `result=count` pairs summed over the replicas' `/metrics`.
async fn callout_decisions(callouts: &[CalloutProcess]) -> String {
    let mut totals: std::collections::BTreeMap<String, f64> = Default::default();
    for c in callouts {
        let Ok(text) = iot_testkit::http::get_text("127.0.0.1", c.metrics_port, "/metrics").await else {
            continue;
        };
        for line in text.lines().filter(|l| l.starts_with("iot_auth_decisions_total{")) {
            let (labels, value) = line.rsplit_once(' ').unwrap_or((line, "0"));
            let result = labels.split('"').nth(1).unwrap_or("?").to_owned();
            *totals.entry(result).or_default() += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    totals
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}
