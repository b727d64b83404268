//! A secured platform NATS on real servers: OpenBao (initialised, unsealed, on
//! disk), nats-server 2.15 with the auth callout configured, and callout replicas
//! running the real binary.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{ConnectOptions, Event};
use iot_bao::enroll::{self, Enrollment, Role};
use iot_nats::CredentialSource;
use iot_nats::token_credentials::IdentityCredentials;
use iot_testkit::auth::{CalloutKeys, CalloutLaunch, CalloutProcess};
use iot_testkit::{NatsServer, OpenBao, cargo_bin};
use tempfile::TempDir;

pub struct Secured {
    /// The CA of NATS's and OpenBao's certificates.
    pub ca: iot_testkit::Ca,
    pub bao: OpenBao,
    pub nats: NatsServer,
    pub keys: CalloutKeys,
    pub dir: TempDir,
    pub callout_enrollment: PathBuf,
    pub callouts: Vec<CalloutProcess>,
    pub user_ttl: Duration,
    /// The operator's device-facing services (read responder, status relay), run
    /// here with the operator's own identity.
    pub services: Vec<tokio::task::JoinHandle<Result<(), iot_nats::NatsError>>>,
}

impl Drop for Secured {
    fn drop(&mut self) {
        for s in &self.services {
            s.abort();
        }
    }
}

impl Secured {
    pub async fn start(replicas: usize) -> anyhow::Result<Self> {
        Self::start_with(replicas, Duration::from_secs(600), &[]).await
    }

    pub async fn start_with(replicas: usize, user_ttl: Duration, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("iot-auth-test-").tempdir()?;
        let ca = iot_testkit::Ca::create(&dir.path().join("ca"))?;
        let bao = OpenBao::start_temp(iot_testkit::TlsMode::Ca(&ca)).await?;
        let callout = enroll::enroll_service(&bao.root()?, "callout", Role::Callout).await?;
        let callout_enrollment = dir.path().join("callout.json");
        iot_testkit::auth::write_private(&callout_enrollment, &serde_json::to_string(&callout)?)?;
        let keys = CalloutKeys::generate()?;
        let nats = NatsServer::start_custom(
            "127.0.0.1",
            &std::env::temp_dir(),
            Some(&keys.nats_config()),
            &[],
            iot_testkit::TlsMode::Ca(&ca),
        )
        .await?;
        let mut me = Self {
            ca,
            bao,
            nats,
            keys,
            dir,
            callout_enrollment,
            callouts: Vec::new(),
            user_ttl,
            services: Vec::new(),
        };
        for _ in 0..replicas {
            me.add_callout(env).await?;
        }
        // Buckets, as the operator would create them.
        let admin = me.admin().await?;
        iot_nats::buckets::ensure_buckets(&async_nats::jetstream::new(admin)).await?;
        if replicas > 0 {
            let operator = me.credentials(me.enroll_operator().await?)?;
            let conn = iot_nats::connect(&[me.nats.url()], &operator, "operator", me.nats.ca_file()).await?;
            me.services.push(tokio::spawn(
                iot_operator::device_services::desired_read::serve_desired_reads(
                    conn.client.clone(),
                    Duration::from_secs(5),
                    None,
                    iot_operator::device_services::no_counts(),
                ),
            ));
            me.services.push(tokio::spawn(
                iot_operator::device_services::status_relay::serve_status_writes(
                    conn.client.clone(),
                    Duration::from_secs(5),
                    iot_operator::device_services::no_counts(),
                ),
            ));
            conn.client.flush().await?;
        }
        Ok(me)
    }

    pub async fn add_callout(&mut self, env: &[(&str, &str)]) -> anyhow::Result<()> {
        let binary = cargo_bin("iot-auth-callout")?;
        let mut all_env: Vec<(String, String)> = vec![("RUST_LOG".into(), "info,iot_auth=debug".into())];
        all_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let launch = CalloutLaunch {
            binary: &binary,
            nats_url: &self.nats.url(),
            ca_file: Some(&self.ca.cert_file()),
            keys: &self.keys,
            dir: self.dir.path(),
            secrets_dir: self.dir.path(),
            bao_addr: &self.bao.addr(),
            enrollment_file: &self.callout_enrollment,
            oidc_issuer: None,
            user_ttl: self.user_ttl,
            env: all_env,
        };
        let name = format!("callout-{}", self.callouts.len());
        let callout = CalloutProcess::spawn(&launch, &name).await?;
        // Ready means answering; the enrollment list loads beside it. Tests of
        // what a replica admits from its cache need the list loaded.
        let port = callout.metrics_port;
        iot_testkit::wait_until(
            Duration::from_secs(30),
            "the callout's first enrollment list",
            || async move {
                let text = iot_testkit::http::get_text("127.0.0.1", port, "/metrics").await.ok()?;
                text.lines()
                    .any(|l| l.starts_with("iot_auth_enrollment_list_loads_total{result=\"ok\"}"))
                    .then_some(())
            },
        )
        .await?;
        self.callouts.push(callout);
        Ok(())
    }

    /// The logs of every callout replica.
    pub fn callout_logs(&self) -> String {
        self.callouts
            .iter()
            .map(|c| c.process.log_text())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The development admin user, which bypasses the callout (test setup only).
    pub async fn admin(&self) -> anyhow::Result<async_nats::Client> {
        self.nats
            .client_with(ConnectOptions::with_user_and_password(
                "admin".into(),
                self.keys.admin_password.clone(),
            ))
            .await
    }

    /// Identity credentials from an enrollment, trusting this stack's OpenBao.
    pub fn credentials(&self, enrollment: Enrollment) -> anyhow::Result<IdentityCredentials> {
        Ok(IdentityCredentials::from_enrollment(
            enrollment,
            Some(&self.ca.cert_file()),
            false,
        )?)
    }

    pub async fn enroll_device(&self, id: &str) -> anyhow::Result<Enrollment> {
        Ok(enroll::enroll_device_identity(&self.bao.root()?, id).await?)
    }

    pub async fn enroll_operator(&self) -> anyhow::Result<Enrollment> {
        Ok(enroll::enroll_service(&self.bao.root()?, "operator", Role::Operator).await?)
    }
}

/// A client connected with identity credentials, recording the server's errors
/// (permission violations arrive asynchronously, as `-ERR` lines).
pub struct Probe {
    pub client: async_nats::Client,
    pub errors: Arc<Mutex<Vec<String>>>,
}

impl Probe {
    pub async fn connect(nats: &NatsServer, creds: &IdentityCredentials) -> anyhow::Result<Self> {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        let client = creds.connect_options().await?.event_callback(move |event| {
            let sink = sink.clone();
            async move {
                if let Event::ServerError(e) = event {
                    sink.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(e.to_string());
                }
            }
        });
        let client = nats.client_with(client).await?;
        Ok(Self { client, errors })
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Waits until the server reported a permission violation naming `subject`.
    pub async fn wait_violation(&self, subject: &str) -> anyhow::Result<()> {
        iot_testkit::wait_until(
            Duration::from_secs(5),
            &format!("a permissions violation for {subject}"),
            || async {
                self.errors()
                    .iter()
                    .any(|e| e.to_lowercase().contains("permissions violation") && e.contains(subject))
                    .then_some(())
            },
        )
        .await
    }
}

/// Tries to connect; the error text if refused. A round trip that needs the
/// server's verdict is part of it: while nats-server waits for a callout answer the
/// client already believes it is connected (async-nats returns from `connect`),
/// and only a reply proves it was admitted. A device writes its status (a
/// status through the relay (stored and acknowledged); anyone else asks for
/// `$JS.API.INFO`.
pub async fn try_connect(nats: &NatsServer, creds: &IdentityCredentials) -> Result<async_nats::Client, String> {
    let opts = creds.connect_options().await.map_err(|e| e.to_string())?;
    let client = match tokio::time::timeout(Duration::from_secs(10), nats.client_with(opts)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("timed out".into()),
    };
    let round_trip = async {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = match creds.device() {
                Some(device) => iot_nats::status_relay::write_via_relay(
                    &client,
                    device,
                    bytes::Bytes::from_static(b"{}"),
                    Duration::from_secs(3),
                )
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
                None => client
                    .request("$JS.API.INFO", bytes::Bytes::new())
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string()),
            };
            // An admitted client whose request failed met the other side between
            // connections (with a short user TTL the relay's own connection is
            // renewed every few seconds): try again. A refused one is not connected.
            match result {
                Err(_) if attempt < 3 && client.connection_state() == async_nats::connection::State::Connected => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => return other,
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(15), round_trip).await {
        Ok(Ok(())) => Ok(client),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("no round trip within 10 s".into()),
    }
}
