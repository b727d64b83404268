//! `iotctl device revoke` with the NATS system account's password ends the device's
//! live session at once (not at user expiry, 10 minutes here), and it cannot come
//! back; without it, only new connects are refused.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Secured, try_connect};
use iot_nats::token_credentials::IdentityCredentials;
use iot_testkit::cargo_bin;

fn iotctl(s: &Secured, args: &[&str], system_password: Option<&str>) -> anyhow::Result<String> {
    let mut cmd = Command::new(cargo_bin("iotctl")?);
    cmd.env("BAO_ADDR", s.bao.addr())
        .env("BAO_TOKEN", s.bao.root_token())
        .env("BAO_CACERT", s.ca.cert_file())
        .env("NATS_CA_FILE", s.ca.cert_file())
        .env("NATS_URL", s.nats.url())
        .env_remove("NATS_SYSTEM_PASSWORD")
        .args(args);
    if let Some(p) = system_password {
        cmd.env("NATS_SYSTEM_PASSWORD", p);
    }
    let out = cmd.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    anyhow::ensure!(out.status.success(), "iotctl {args:?}: {stderr}");
    Ok(stderr)
}

#[tokio::test]
async fn revoking_with_the_system_account_ends_the_live_session_at_once() -> anyhow::Result<()> {
    let s = Secured::start(1).await?;
    let kicked = s.credentials(s.enroll_device("dev-kicked").await?)?;
    let lingering = s.credentials(s.enroll_device("dev-lingering").await?)?;
    let bystander = s.credentials(s.enroll_device("dev-bystander").await?)?;
    let kicked_conn = try_connect(&s.nats, &kicked).await.map_err(anyhow::Error::msg)?;
    let lingering_conn = try_connect(&s.nats, &lingering).await.map_err(anyhow::Error::msg)?;
    let bystander_conn = try_connect(&s.nats, &bystander).await.map_err(anyhow::Error::msg)?;

    let said = iotctl(&s, &["device", "revoke", "dev-kicked"], Some(&s.keys.system_password))?;
    assert!(said.contains("1 live session(s) ended"), "{said}");
    let connected = async_nats::connection::State::Connected;
    iot_testkit::wait_until(
        Duration::from_secs(5),
        "the revoked device's session to end",
        || async { (kicked_conn.connection_state() != connected).then_some(()) },
    )
    .await?;
    // Its client reconnects on its own, and is refused every time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_ne!(kicked_conn.connection_state(), connected);

    // Without the system password: refused from the next connect, the session stays
    // until its user expires.
    let said = iotctl(&s, &["device", "revoke", "dev-lingering"], None)?;
    assert!(said.contains("NATS_SYSTEM_PASSWORD"), "{said}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(lingering_conn.connection_state(), connected);
    assert!(try_connect(&s.nats, &lingering).await.is_err());

    // Nobody else was touched.
    assert_eq!(bystander_conn.connection_state(), connected);
    try_connect(&s.nats, &bystander).await.map_err(anyhow::Error::msg)?;
    Ok(())
}

/// The bound of a revocation while OpenBao is down (README "When OpenBao is
/// down"). A device revoked after a callout's last look at OpenBao, whose next
/// connect comes while OpenBao cannot answer, is admitted from the cache: with a
/// NATS user of at most two minutes, and only while the token it presents is
/// valid. It cannot get a new token (OpenBao is down, and its approle is gone), so
/// once that one expires it is refused.
#[tokio::test]
async fn a_device_revoked_just_before_openbao_stops_gets_in_only_until_its_token_expires() -> anyhow::Result<()> {
    const TOKEN_TTL: Duration = Duration::from_secs(20);
    // No list refresh during the test: the callout learns of the revocation only by
    // asking OpenBao at a connect, which it cannot.
    let mut s = Secured::start_with(
        1,
        Duration::from_secs(600),
        &[("IOT_AUTH_LIST_REFRESH", "1h"), ("IOT_AUTH_CLOCK_LEEWAY", "1s")],
    )
    .await?;
    let root = s.bao.root()?;
    root.post(
        &format!("identity/oidc/role/{}", iot_bao::setup::TOKEN_ROLE),
        &serde_json::json!({"key": iot_bao::setup::TOKEN_KEY, "ttl": format!("{}s", TOKEN_TTL.as_secs()), "client_id": iot_bao::setup::TOKEN_AUDIENCE}),
    )
    .await?;
    let enrollment = s.enroll_device("dev-gap").await?;
    let creds = s.credentials(enrollment.clone())?;
    let token = creds.token().await?;
    let minted = std::time::Instant::now();
    try_connect(&s.nats, &creds).await.map_err(anyhow::Error::msg)?;

    iot_bao::enroll::revoke_device(&root, "dev-gap").await?;
    s.bao.stop();
    let file = s.dir.path().join("kept-token");
    std::fs::write(&file, &token)?;
    let kept = IdentityCredentials::from_token_file(file, Some(harmony_reconciler_contracts::Id::new("dev-gap")?));
    // The gap: admitted from the cache while the token lives.
    try_connect(&s.nats, &kept)
        .await
        .map_err(|e| anyhow::anyhow!("expected the documented gap, got a refusal: {e}"))?;
    assert!(
        s.callout_logs().contains("admitting from cache"),
        "{}",
        s.callout_logs()
    );
    // No new token: OpenBao is down.
    assert!(s.credentials(enrollment.clone())?.token().await.is_err());
    // Its end: the token expires, and the same token is refused.
    tokio::time::sleep((TOKEN_TTL + Duration::from_secs(3)).saturating_sub(minted.elapsed())).await;
    let refused = try_connect(&s.nats, &kept).await;
    assert!(refused.is_err(), "admitted after its token expired");
    // OpenBao back: the enrollment is gone for good.
    s.bao.restart().await?;
    assert!(s.credentials(enrollment)?.token().await.is_err());
    let refused = try_connect(&s.nats, &kept).await;
    assert!(refused.is_err());
    Ok(())
}
