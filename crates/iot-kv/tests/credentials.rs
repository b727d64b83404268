//! Credential sources against a real nats-server with authentication on.

use std::time::Duration;

use iot_kv::{Anonymous, CredentialSource, CredsFile, TokenAuth, UserPassword, connect};
use iot_testkit::NatsServer;

async fn try_connect(url: &str, creds: &dyn CredentialSource) -> Result<(), String> {
    match tokio::time::timeout(
        Duration::from_secs(10),
        connect(&[url.to_owned()], creds, "cred-test", true),
    )
    .await
    {
        Ok(Ok(conn)) => conn.client.flush().await.map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[tokio::test]
async fn token_source_authenticates_and_no_credentials_are_refused() -> anyhow::Result<()> {
    let nats = NatsServer::start_with_args(&["--auth", "s3cret-token"]).await?;
    try_connect(&nats.url(), &TokenAuth("s3cret-token".into()))
        .await
        .map_err(anyhow::Error::msg)?;
    assert!(try_connect(&nats.url(), &TokenAuth("wrong".into())).await.is_err());
    let err = try_connect(&nats.url(), &Anonymous)
        .await
        .expect_err("anonymous must be refused");
    assert!(err.to_lowercase().contains("auth"), "{err}");
    Ok(())
}

#[tokio::test]
async fn user_password_source_authenticates() -> anyhow::Result<()> {
    let nats = NatsServer::start_with_args(&["--user", "device1", "--pass", "pw-1"]).await?;
    let good = UserPassword {
        user: "device1".into(),
        password: "pw-1".into(),
    };
    try_connect(&nats.url(), &good).await.map_err(anyhow::Error::msg)?;
    let bad = UserPassword {
        user: "device1".into(),
        password: "nope".into(),
    };
    assert!(try_connect(&nats.url(), &bad).await.is_err());
    // Secrets never reach logs through Debug or describe().
    assert!(!format!("{good:?}{}", good.describe()).contains("pw-1"));
    assert!(!format!("{:?}", TokenAuth("tok".into())).contains("tok\""));
    Ok(())
}

#[tokio::test]
async fn missing_creds_file_is_a_clear_error() {
    let err = CredsFile("/nonexistent/device.creds".into())
        .connect_options()
        .await
        .expect_err("no file");
    assert!(err.to_string().contains("/nonexistent/device.creds"), "{err}");
}
