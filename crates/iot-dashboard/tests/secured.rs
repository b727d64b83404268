//! On NATS behind the auth callout, the dashboard logs in with its own OpenBao
//! enrollment as a viewer: it follows every device's reports, and that identity
//! can write nothing.

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

    // The same identity cannot put a report, its own or a device's.
    let creds = iot_kv::identity::IdentityCredentials::from_enrollment_file(&file)?;
    let conn = iot_kv::connect_with(
        &[stack.nats.url()],
        &creds,
        "viewer-probe",
        false,
        std::time::Duration::from_secs(3),
    )
    .await?;
    let js = async_nats::jetstream::new(conn.client.clone());
    let kv = js
        .get_key_value(harmony_reconciler_contracts::AGENT_STATUS_BUCKET)
        .await?;
    let put = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        kv.put(format!("status.{dev}"), bytes::Bytes::from_static(b"{}")),
    )
    .await;
    assert!(!matches!(put, Ok(Ok(_))), "a viewer wrote a device report");
    let status = stack.agent_status(&dev).await;
    assert!(status.is_some(), "the device's real report is still there");
    Ok(())
}
