//! The attack matrix: every identity tries to make the platform write where it must
//! not, or to read what is not its own, on one secured stack (NATS behind the auth
//! callout, TLS, the operator and a device agent running). For each role:
//!
//! - **reply-subject injection**: a request whose reply subject is another
//!   identity's subject (a device's desired-state key, a device's inbox). NATS
//!   publishes the answer wherever the reply points, and a stream stores what
//!   lands on its subjects;
//!   The registry grant service is one of those services;
//! - **another device's registry grant**: refused by the permissions; a device's
//!   own grant names only the repositories its deployments name;
//! - **`deliver_subject` injection**: a push consumer that delivers into another
//!   identity's subject;
//! - **reading other replies**: a subscription to `_INBOX.>` or another identity's
//!   inbox (watch deliveries and read answers carry desired state, `env` included);
//! - **consumer delete** and **stream info** on the platform's streams;
//! - **limits**: more subscriptions than the account allows, a status bigger than
//!   the largest an agent sends (and the real agent's own subscriptions fit well
//!   within its limit).
//!
//! An admin watcher records the target subjects throughout, and afterwards nothing
//! landed there, no desired-state key changed its revision, and the device's
//! deployment is still Running. The operator, which may write every bucket, is
//! limited to the platform's streams and its own inbox (README "Identity and
//! trust" says what it can do).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{ConnectOptions, Event};
use bytes::Bytes;
use futures::StreamExt;
use harmony_reconciler_contracts::{DESIRED_STATE_BUCKET, DeploymentRef, Phase};
use iot_bao::enroll::{Role, enroll_device_identity, enroll_service};
use iot_e2e::stack::*;
use iot_nats::CredentialSource;
use iot_nats::token_credentials::IdentityCredentials;
use iot_testkit::{free_port, wait_until};

/// A connection as one identity, recording the server's complaints.
struct Attacker {
    role: &'static str,
    client: async_nats::Client,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Attacker {
    async fn connect(stack: &Stack, role: &'static str, options: ConnectOptions) -> anyhow::Result<Self> {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        let options = options.event_callback(move |event| {
            let sink = sink.clone();
            async move {
                if let Event::ServerError(e) = event {
                    sink.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(e.to_string());
                }
            }
        });
        let client = stack.nats.client_with(options).await?;
        // Admitted (the callout answered) once a round trip to the server works.
        client.flush().await?;
        Ok(Self { role, client, errors })
    }

    fn violations(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|e| e.to_lowercase().contains("permissions violation"))
            .cloned()
            .collect()
    }

    /// Publishes `subject` with `reply`, and expects the server to refuse it.
    async fn publish_denied(&self, attack: &str, subject: &str, reply: &str, body: &str) -> anyhow::Result<()> {
        self.client
            .publish_with_reply(subject.to_owned(), reply.to_owned(), Bytes::from(body.to_owned()))
            .await?;
        self.client.flush().await?;
        self.wait_violation(attack, subject).await
    }

    /// Subscribes to `subject`, and expects the server to refuse it.
    async fn subscribe_denied(&self, attack: &str, subject: &str) -> anyhow::Result<()> {
        let _sub = self.client.subscribe(subject.to_owned()).await?;
        self.client.flush().await?;
        self.wait_violation(attack, subject).await
    }

    async fn wait_violation(&self, attack: &str, subject: &str) -> anyhow::Result<()> {
        wait_until(
            Duration::from_secs(5),
            &format!("{}: {attack} refused ({subject})", self.role),
            || async { self.violations().iter().any(|v| v.contains(subject)).then_some(()) },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}; server said: {:?}", self.violations()))
    }
}

/// Everything seen on the targets an attacker aims at.
struct Watcher {
    seen: Arc<Mutex<Vec<(String, Bytes)>>>,
}

impl Watcher {
    async fn start(admin: &async_nats::Client, subjects: &[String]) -> anyhow::Result<Self> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        for s in subjects {
            let mut sub = admin.subscribe(s.clone()).await?;
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Some(m) = sub.next().await {
                    seen.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((m.subject.to_string(), m.payload));
                }
            });
        }
        admin.flush().await?;
        Ok(Self { seen })
    }

    fn seen(&self) -> Vec<(String, Bytes)> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

#[tokio::test]
async fn no_identity_can_write_where_it_must_not_or_read_others_replies() -> anyhow::Result<()> {
    let mut stack = Stack::start_secured().await?;
    // The operator serves registry pull grants too (no registry is needed for that).
    let registry_keys = iot_launch::RegistryKeys::generate(&stack.dir.path().join("registry-keys"))?;
    stack.operator_env.extend([
        ("IOT_REGISTRIES".to_owned(), "registry.invalid:5000".to_owned()),
        (
            "IOT_REGISTRY_SIGNING_KEY".to_owned(),
            registry_keys.key_pem.display().to_string(),
        ),
    ]);
    stack.start_operator()?;
    stack.wait_operator_ready().await?;
    let (victim, _guard) = stack.start_enrolled_agent().await?;
    let port = free_port()?;
    let mut cmd = stack.applier()?;
    cmd.args(["--name", "web", "--namespace", "default", "--target-device", &victim])
        .args(["--image", "localhost/iot-web:v1", "--port", &port.to_string()]);
    run_ok(cmd)?;
    wait_http(port, "v1").await?;
    let dep = DeploymentRef::new("default", "web")?;
    let key = format!("{victim}.{}", dep.to_token());

    let sec = stack.security.as_ref().ok_or_else(|| anyhow::anyhow!("secured"))?;
    let root = sec.bao.root()?;
    let ca = sec.bao.ca_file().map(std::path::Path::to_path_buf);
    let creds_of = |e: iot_bao::enroll::Enrollment| IdentityCredentials::from_enrollment(e, ca.as_deref(), false);
    let device = creds_of(enroll_device_identity(&root, "attacker").await?)?;
    let viewer = creds_of(enroll_service(&root, "dashboard", Role::Viewer).await?)?;
    let operator = IdentityCredentials::from_enrollment_file(&sec.operator_enrollment, ca.as_deref(), false)?;
    let callout_password = sec.keys.auth_password.clone();
    let sec_system_password = sec.keys.system_password.clone();

    // The targets: a desired-state key of the victim nobody writes, and its inbox.
    let injected_key = format!("$KV.{DESIRED_STATE_BUCKET}.{victim}.default_injected");
    let victim_inbox = format!("_INBOX_{victim}.injected");
    let admin = stack.js.client();
    let watcher = Watcher::start(&admin, &[injected_key.clone(), victim_inbox.clone()]).await?;
    let status_watch = Watcher::start(&admin, &[format!("$KV.agent-status.status.{victim}")]).await?;
    let revision_before = stack.desired.entry(&key).await?.map(|e| e.revision);
    let last_seq_before = stack.desired_last_sequence().await?;
    let foreign_before = foreign_replies(&stack.operator_metrics().await?);

    let consumer_create = |deliver: &str| {
        serde_json::json!({
            "stream_name": "KV_agent-status",
            "config": {"deliver_subject": deliver, "ack_policy": "none", "deliver_policy": "last"}
        })
        .to_string()
    };

    // ---- A device (an attacker holding some device's enrollment) ----
    let d = Attacker::connect(&stack, "device", device.connect_options().await?).await?;
    // Reply injection through the JetStream API: refused (no JetStream API at all).
    d.publish_denied("reply injection", "$JS.API.INFO", &injected_key, "")
        .await?;
    // deliver_subject injection: refused.
    d.publish_denied(
        "deliver_subject injection",
        "$JS.API.CONSUMER.CREATE.KV_agent-status",
        "_INBOX_attacker.x",
        &consumer_create(&injected_key),
    )
    .await?;
    // Reply injection through the operator's services: the publish is its own
    // subject and allowed; the services answer only its own inbox, so they drop it.
    for subject in [
        "iot.desired.read.attacker",
        "iot.status.write.attacker",
        "iot.registry.grant.attacker",
    ] {
        d.client
            .publish_with_reply(subject.to_owned(), injected_key.clone(), Bytes::from_static(b"{}"))
            .await?;
        d.client
            .publish_with_reply(subject.to_owned(), victim_inbox.clone(), Bytes::from_static(b"{}"))
            .await?;
    }
    d.client.flush().await?;
    // Another device's registry grant: refused. Its own names no repository (no
    // deployment of its names one).
    d.publish_denied(
        "asking for another device's registry grant",
        &format!("iot.registry.grant.{victim}"),
        "_INBOX_attacker.g",
        "",
    )
    .await?;
    let own = iot_nats::registry_grant::request_grant(
        &d.client,
        &harmony_reconciler_contracts::Id::new("attacker")?,
        std::time::Duration::from_secs(5),
    )
    .await?
    .ok_or_else(|| anyhow::anyhow!("no registry grant responder"))?;
    anyhow::ensure!(
        own.token.is_some() && own.repositories.is_empty(),
        "the attacker's own grant: {own:?}"
    );
    // Other replies.
    d.subscribe_denied("reading every reply", "_INBOX.>").await?;
    d.subscribe_denied("reading the victim's replies", &format!("_INBOX_{victim}.>"))
        .await?;
    d.subscribe_denied("reading the operator's replies", "_SVC_INBOX.operator.>")
        .await?;
    d.subscribe_denied(
        "reading another device's desired state",
        &format!("$KV.{DESIRED_STATE_BUCKET}.{victim}.>"),
    )
    .await?;
    // The JetStream API itself.
    d.publish_denied(
        "consumer delete",
        "$JS.API.CONSUMER.DELETE.KV_desired-state.any",
        "_INBOX_attacker.y",
        "",
    )
    .await?;
    d.publish_denied(
        "stream info",
        "$JS.API.STREAM.INFO.KV_desired-state",
        "_INBOX_attacker.z",
        "",
    )
    .await?;

    // ---- A viewer (a stolen dashboard credential) ----
    let v = Attacker::connect(&stack, "viewer", viewer.connect_options().await?).await?;
    v.publish_denied("reply injection", "$JS.API.INFO", &injected_key, "")
        .await?;
    v.publish_denied(
        "deliver_subject injection",
        "$JS.API.CONSUMER.CREATE.KV_agent-status",
        "_SVC_INBOX.viewer.dashboard.x",
        &consumer_create(&injected_key),
    )
    .await?;
    v.client
        .publish_with_reply(
            "iot.status.read.dashboard".to_owned(),
            injected_key.clone(),
            Bytes::from_static(b"{}"),
        )
        .await?;
    v.client.flush().await?;
    v.subscribe_denied("reading every reply", "_INBOX.>").await?;
    v.subscribe_denied("reading the victim's replies", &format!("_INBOX_{victim}.>"))
        .await?;
    v.subscribe_denied("reading the operator's replies", "_SVC_INBOX.operator.>")
        .await?;
    v.subscribe_denied("reading desired state", &format!("$KV.{DESIRED_STATE_BUCKET}.>"))
        .await?;
    v.publish_denied(
        "status write",
        &format!("$KV.agent-status.status.{victim}"),
        "_SVC_INBOX.viewer.dashboard.w",
        "{}",
    )
    .await?;
    v.publish_denied(
        "consumer delete",
        "$JS.API.CONSUMER.DELETE.KV_agent-status.any",
        "_SVC_INBOX.viewer.dashboard.y",
        "",
    )
    .await?;
    v.publish_denied(
        "stream info",
        "$JS.API.STREAM.INFO.KV_agent-status",
        "_SVC_INBOX.viewer.dashboard.z",
        "",
    )
    .await?;
    // What it may do still works: the fleet's reports, with the victim among them.
    let snapshot = iot_nats::status_snapshot::read_status_snapshot(
        &v.client,
        &harmony_reconciler_contracts::Id::new("dashboard")?,
        Duration::from_secs(10),
    )
    .await?;
    assert!(snapshot.iter().any(|r| r.device.as_str() == victim), "{snapshot:?}");

    // ---- The operator (a stolen operator credential) ----
    // It writes every platform bucket by design; it is confined to them and to its
    // own inbox. A stream outside the platform (created by an administrator):
    stack
        .js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "OTHER".into(),
            subjects: vec!["other.>".into()],
            ..Default::default()
        })
        .await?;
    let o = Attacker::connect(&stack, "operator", operator.connect_options().await?).await?;
    o.subscribe_denied("reading every reply", "_INBOX.>").await?;
    o.subscribe_denied("reading a device's replies", &format!("_INBOX_{victim}.>"))
        .await?;
    o.subscribe_denied("reading the viewer's replies", "_SVC_INBOX.viewer.>")
        .await?;
    o.publish_denied(
        "stream info outside the platform",
        "$JS.API.STREAM.INFO.OTHER",
        "_SVC_INBOX.operator.operator.a",
        "",
    )
    .await?;
    o.publish_denied(
        "consumer create outside the platform",
        "$JS.API.CONSUMER.CREATE.OTHER",
        "_SVC_INBOX.operator.operator.b",
        "{}",
    )
    .await?;
    o.publish_denied(
        "consumer delete outside the platform",
        "$JS.API.CONSUMER.DELETE.OTHER.any",
        "_SVC_INBOX.operator.operator.c",
        "",
    )
    .await?;
    o.publish_denied(
        "publishing outside the platform",
        "other.x",
        "_SVC_INBOX.operator.operator.d",
        "x",
    )
    .await?;

    // ---- The callout's own user (AUTH account) ----
    let c = Attacker::connect(
        &stack,
        "callout",
        ConnectOptions::with_user_and_password("auth".into(), callout_password)
            .custom_inbox_prefix(iot_auth::permissions::CALLOUT_INBOX_PREFIX),
    )
    .await?;
    c.publish_denied("reply injection", "$JS.API.INFO", &injected_key, "")
        .await?;
    c.publish_denied(
        "publishing a desired-state key",
        &injected_key,
        "_SVC_INBOX.callout.x",
        "{}",
    )
    .await?;
    c.subscribe_denied("reading every reply", "_INBOX.>").await?;
    c.subscribe_denied("reading KV changes", "$KV.>").await?;
    c.publish_denied(
        "consumer delete",
        "$JS.API.CONSUMER.DELETE.KV_desired-state.any",
        "_SVC_INBOX.callout.y",
        "",
    )
    .await?;
    c.publish_denied(
        "stream info",
        "$JS.API.STREAM.INFO.KV_desired-state",
        "_SVC_INBOX.callout.z",
        "",
    )
    .await?;

    // ---- Per-user limits ----
    // What the victim's real agent holds fits its limit with room to spare.
    let sys = stack
        .nats
        .client_with(ConnectOptions::with_user_and_password(
            "sys".into(),
            sec_system_password.clone(),
        ))
        .await?;
    let query = serde_json::json!({"user": format!("device-{victim}"), "subscriptions": true});
    let reply = sys
        .request("$SYS.REQ.SERVER.PING.CONNZ", query.to_string().into())
        .await?;
    let connz: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    let agent_subs = connz
        .pointer("/data/connections/0/subscriptions")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| anyhow::anyhow!("no connection of the victim in {connz}"))?;
    eprintln!("the agent holds {agent_subs} subscriptions");
    assert!(
        (1..=iot_auth::permissions::DEVICE_MAX_SUBS as u64 / 4).contains(&agent_subs),
        "the agent's {agent_subs} subscriptions leave room under the limit"
    );
    // A device may not hold more subscriptions than the account's cap (what
    // nats-server 2.15 enforces for callout users; see permissions.rs).
    let mut held = Vec::new();
    for i in 0..iot_auth::permissions::ACCOUNT_MAX_SUBS + 4 {
        held.push(d.client.subscribe(format!("_INBOX_attacker.s{i}")).await?);
    }
    d.client.flush().await?;
    wait_until(Duration::from_secs(5), "the subscription cap", || async {
        d.errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(|e| e.to_lowercase().contains("maximum subscriptions"))
            .then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}: {:?}", d.errors.lock().map(|v| v.clone()).unwrap_or_default()))?;
    drop(held);
    // Nor store a status bigger than the largest an agent sends: the relay refuses it.
    let refused = iot_nats::status_relay::write_via_relay(
        &d.client,
        &harmony_reconciler_contracts::Id::new("attacker")?,
        Bytes::from(vec![b' '; harmony_reconciler_contracts::read::MAX_STATUS_BYTES + 1]),
        Duration::from_secs(10),
    )
    .await
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(refused.contains("byte cap"), "{refused}");

    // A device's report is information, never authority: what it claims about its
    // labels, its spec or its identity reaches no Device (it has no Kubernetes
    // credentials at all; the operator copies nothing from a report into either).
    stack.register_device("attacker", &[("site", "lab")]).await?;
    stack.register_device(&victim, &[("site", "madrid")]).await?;
    let mut claim = serde_json::to_value(stack.agent_status(&victim).await.expect("report"))?;
    claim["device_id"] = serde_json::json!("attacker");
    claim["labels"] = serde_json::json!({"site": "madrid", "tenant": "victim"});
    claim["spec"] = serde_json::json!({"paused": true});
    claim["metadata"] = serde_json::json!({"name": victim, "labels": {"site": "lab"}});
    for device_id in ["attacker", victim.as_str()] {
        claim["device_id"] = serde_json::json!(device_id);
        // Pass or fail, what the relay stores is the attacker's own key.
        let _ = iot_nats::status_relay::write_via_relay(
            &d.client,
            &harmony_reconciler_contracts::Id::new("attacker")?,
            Bytes::from(serde_json::to_vec(&claim)?),
            Duration::from_secs(10),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (name, site) in [("attacker", "lab"), (victim.as_str(), "madrid")] {
        let now = stack.devices().get(name).await?;
        let labels = now.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("site").map(String::as_str), Some(site), "{name}: {labels:?}");
        assert!(!labels.contains_key("tenant") && !now.spec.paused, "{name}: {now:?}");
    }

    // ---- Nothing landed ----
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(watcher.seen(), Vec::new(), "something landed on a target subject");
    for (subject, body) in status_watch.seen() {
        let report: Result<harmony_reconciler_contracts::AgentStatus, _> = serde_json::from_slice(&body);
        assert!(
            report.is_ok_and(|r| r.device_id.as_str() == victim),
            "{subject} received something that is not the victim's own report: {}",
            String::from_utf8_lossy(&body)
        );
    }
    assert_eq!(stack.desired.entry(&key).await?.map(|e| e.revision), revision_before);
    assert_eq!(
        stack.desired_last_sequence().await?,
        last_seq_before,
        "the desired-state stream stored something"
    );
    // The services saw the foreign replies and refused each.
    let text = stack.operator_metrics().await?;
    assert_eq!(foreign_replies(&text) - foreign_before, 7.0, "{text}");
    // And the victim never noticed.
    let status = stack
        .agent_status(&victim)
        .await
        .ok_or_else(|| anyhow::anyhow!("no report"))?;
    assert_eq!(status.deployments.get(&dep).map(|p| p.phase), Some(Phase::Running));
    wait_http(port, "v1").await?;
    Ok(())
}

/// Requests the operator's services dropped for a reply subject outside the asker's
/// inbox.
fn foreign_replies(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("iot_operator_device_requests_total{") && l.contains("result=\"foreign_reply\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
