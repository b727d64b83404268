//! Credential sources against a real nats-server with authentication on.

use std::time::Duration;

use iot_nats::{
    Anonymous, ClientOptions, CredentialSource, CredsFile, NatsTls, TokenAuth, UserPassword, connect, connect_with,
};
use iot_testkit::NatsServer;

async fn try_connect(nats: &NatsServer, creds: &dyn CredentialSource) -> Result<(), String> {
    match tokio::time::timeout(
        Duration::from_secs(10),
        connect(&[nats.url()], creds, "cred-test", nats.ca_file()),
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
    try_connect(&nats, &TokenAuth("s3cret-token".into()))
        .await
        .map_err(anyhow::Error::msg)?;
    assert!(try_connect(&nats, &TokenAuth("wrong".into())).await.is_err());
    let err = try_connect(&nats, &Anonymous)
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
    try_connect(&nats, &good).await.map_err(anyhow::Error::msg)?;
    let bad = UserPassword {
        user: "device1".into(),
        password: "nope".into(),
    };
    assert!(try_connect(&nats, &bad).await.is_err());
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

/// What a client with the wrong CA sees: the server it tried and the certificate
/// problem, plus what to check. Every connection is TLS, so this is the first thing
/// a misconfigured device or operator meets.
#[tokio::test]
async fn a_wrong_ca_is_refused_naming_the_server_and_the_certificate_problem() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let other = NatsServer::start().await?;
    let wrong = other.ca_file().map(std::path::Path::to_path_buf);
    let err = connect(&[nats.url()], &Anonymous, "wrong-ca", wrong.as_deref())
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    eprintln!("wrong CA: {err}");
    assert!(err.contains(&nats.url()), "names the server: {err}");
    assert!(
        err.contains("UnknownIssuer") || err.contains("certificate"),
        "the problem: {err}"
    );
    assert!(
        err.contains(&other.ca_file().map(|p| p.display().to_string()).unwrap_or_default()),
        "the CA it used: {err}"
    );
    // No CA at all: the system's roots do not know the platform's CA either.
    let err = connect(&[nats.url()], &Anonymous, "no-ca", None)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    eprintln!("no CA: {err}");
    assert!(err.contains("NATS_CA_FILE"), "says what to pass: {err}");
    // The right CA works.
    connect(&[nats.url()], &Anonymous, "right-ca", nats.ca_file()).await?;
    Ok(())
}

/// A client that requires TLS (every daemon, unless --nats-insecure) does not talk
/// to a plain server: its token would cross the network in the clear.
#[tokio::test]
async fn tls_required_refuses_a_plain_server() -> anyhow::Result<()> {
    let plain = NatsServer::start_plain().await?;
    assert!(plain.url().starts_with("nats://"));
    let required = ClientOptions::new("strict").tls(NatsTls {
        ca_file: None,
        required: true,
    });
    let err = connect_with(&[plain.url()], &TokenAuth("secret-token".into()), &required)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    eprintln!("plain server: {err}");
    assert!(
        err.contains("does not speak TLS") && err.contains("NATS_INSECURE"),
        "{err}"
    );
    let relaxed = ClientOptions::new("debug");
    connect_with(&[plain.url()], &Anonymous, &relaxed).await?;
    Ok(())
}
