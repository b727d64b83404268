//! On NATS behind the auth callout, the dashboard logs in with its own OpenBao
//! enrollment as a viewer: it reads every device's reports (a snapshot from the
//! operator, then changes on a plain subscription), and that identity can write
//! nothing (the attack matrix in `iot-e2e/tests/attacks.rs` tries everything else).

use std::process::Command;

use iot_bao::enroll::{Role, enroll_service};
use iot_e2e::stack::*;
use iot_testkit::{LoggedProcess, cargo_bin, free_port, wait_until};

#[tokio::test]
async fn the_dashboard_reads_the_fleet_as_a_viewer_that_cannot_write() -> anyhow::Result<()> {
    let mut stack = Stack::start_secured().await?;
    stack.start_operator()?;
    stack.wait_operator_ready().await?;
    let (dev, _guard) = stack.start_enrolled_agent().await?;
    let root = stack
        .security
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("not secured"))?
        .bao
        .root()?;
    let enrollment = enroll_service(&root, "dashboard", Role::Viewer).await?;
    let file = stack.dir.path().join("dashboard.json");
    iot_testkit::auth::write_private(&file, &serde_json::to_string(&enrollment)?)?;

    let port = free_port()?;
    let mut cmd = Command::new(cargo_bin("iot-dashboard")?);
    stack.trust(&mut cmd);
    cmd.env("KUBECONFIG", stack.kubeconfig())
        .env("NATS_URL", stack.nats.url())
        .env("NATS_IDENTITY", &file)
        .env("IOT_DASHBOARD_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info");
    let dashboard = LoggedProcess::spawn("iot-dashboard", cmd, stack.dir.path().join("dashboard.log"))?;
    let seen = wait_until(WAIT, "the device on the devices page", || async {
        let (code, body) = iot_testkit::http::get("127.0.0.1", port, "/devices").await.ok()?;
        (code == 200 && body.contains(&format!(r#"data-device="{dev}""#)) && body.contains("online")).then_some(())
    })
    .await;
    if seen.is_err() {
        anyhow::bail!("dashboard never showed {dev}; log:\n{}", dashboard.log_text());
    }
    assert!(
        dashboard.log_text().contains("identity dashboard (viewer)"),
        "{}",
        dashboard.log_text()
    );

    // The same identity cannot put a report: a plain publish onto a device's status
    // subject is refused by the server, and the device's report stays its own.
    let before = stack.agent_status(&dev).await;
    let ca = stack
        .security
        .as_ref()
        .and_then(|s| s.bao.ca_file())
        .map(std::path::Path::to_path_buf);
    let creds = iot_nats::token_credentials::IdentityCredentials::from_enrollment_file(&file, ca.as_deref(), false)?;
    let client = stack
        .nats
        .client_with(iot_nats::CredentialSource::connect_options(&creds).await?)
        .await?;
    let mut forged = before.clone().ok_or_else(|| anyhow::anyhow!("no report yet"))?;
    forged.agent_version = "forged-by-the-viewer".into();
    client
        .publish(
            format!("$KV.agent-status.status.{dev}"),
            serde_json::to_vec(&forged)?.into(),
        )
        .await?;
    client.flush().await?;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let after = stack.agent_status(&dev).await;
    assert!(
        after.is_some_and(|s| s.agent_version != "forged-by-the-viewer"),
        "a viewer wrote a device report"
    );
    Ok(())
}
