//! `iotctl device revoke` with the NATS system account's password ends the device's
//! live session at once (not at user expiry, 10 minutes here), and it cannot come
//! back; without it, only new connects are refused.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Secured, try_connect};
use iot_kv::identity::IdentityCredentials;
use iot_testkit::cargo_bin;

fn iotctl(s: &Secured, args: &[&str], system_password: Option<&str>) -> anyhow::Result<String> {
    let mut cmd = Command::new(cargo_bin("iotctl")?);
    cmd.env("BAO_ADDR", s.bao.addr())
        .env("BAO_TOKEN", s.bao.root_token())
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
    let url = s.nats.url();
    let kicked = IdentityCredentials::from_enrollment(s.enroll_device("dev-kicked").await?)?;
    let lingering = IdentityCredentials::from_enrollment(s.enroll_device("dev-lingering").await?)?;
    let bystander = IdentityCredentials::from_enrollment(s.enroll_device("dev-bystander").await?)?;
    let kicked_conn = try_connect(&url, &kicked).await.map_err(anyhow::Error::msg)?;
    let lingering_conn = try_connect(&url, &lingering).await.map_err(anyhow::Error::msg)?;
    let bystander_conn = try_connect(&url, &bystander).await.map_err(anyhow::Error::msg)?;

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
    assert!(try_connect(&url, &lingering).await.is_err());

    // Nobody else was touched.
    assert_eq!(bystander_conn.connection_state(), connected);
    try_connect(&url, &bystander).await.map_err(anyhow::Error::msg)?;
    Ok(())
}
