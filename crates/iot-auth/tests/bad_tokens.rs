//! Tokens that must not get in: none, expired, signed by another key, for a device
//! that is not enrolled, for a revoked device (fresh or replayed). Each refusal is
//! logged by the callout with its reason. A revoked device's live session ends
//! within one user TTL.

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Probe, Secured, try_connect};
use harmony_reconciler_contracts::Id;
use iot_bao::setup::{KV_MOUNT, TOKEN_AUDIENCE, TOKEN_KEY, TOKEN_ROLE, issuer_url};
use iot_nats::token_credentials::IdentityCredentials;
use serde_json::json;

const USER_TTL: Duration = Duration::from_secs(5);

async fn wait_log(s: &Secured, needle: &str) -> anyhow::Result<()> {
    iot_testkit::wait_until(
        Duration::from_secs(5),
        &format!("callout log line {needle:?}"),
        || async { s.callout_logs().contains(needle).then_some(()) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}; logs:\n{}", s.callout_logs()))
}

fn token_file(s: &Secured, name: &str, token: &str) -> anyhow::Result<std::path::PathBuf> {
    let p = s.dir.path().join(name);
    std::fs::write(&p, token)?;
    Ok(p)
}

#[tokio::test]
async fn bad_tokens_are_refused_with_a_reason() -> anyhow::Result<()> {
    let s = Secured::start_with(1, USER_TTL, &[("IOT_AUTH_CLOCK_LEEWAY", "1s")]).await?;
    let root = s.bao.root()?;

    // The baseline: an enrolled device gets in, also with its token in a file (so
    // the refusals below are about the tokens, not the file form).
    let good = s.credentials(s.enroll_device("dev-ok").await?)?;
    try_connect(&s.nats, &good).await.map_err(anyhow::Error::msg)?;
    let good_file = token_file(&s, "good", &good.token().await?)?;
    try_connect(
        &s.nats,
        &IdentityCredentials::from_token_file(good_file, Some(Id::new("dev-ok")?)),
    )
    .await
    .map_err(anyhow::Error::msg)?;

    // No token at all.
    let anonymous = s.nats.client().await;
    assert!(anonymous.is_err());
    wait_log(&s, "no identity token presented").await?;

    // Expired: a token from a role with a 2 s lifetime, presented after it ran out.
    root.post(
        &format!("identity/oidc/role/{TOKEN_ROLE}"),
        &json!({"key": TOKEN_KEY, "ttl": "2s", "client_id": TOKEN_AUDIENCE}),
    )
    .await?;
    let short = s.credentials(s.enroll_device("dev-exp").await?)?;
    let expiring = short.token().await?;
    iot_bao::setup::configure(&root).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let creds = IdentityCredentials::from_token_file(token_file(&s, "expired", &expiring)?, Some(Id::new("dev-exp")?));
    assert!(try_connect(&s.nats, &creds).await.is_err());
    wait_log(&s, "token expired").await?;

    // Signed by a key that is not the issuer's, naming the issuer's key id.
    let real = good.token().await?;
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(real.split('.').next().unwrap_or(""))?)?;
    let rng = ring::rand::SystemRandom::new();
    let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| anyhow::anyhow!("{e}"))?;
    let key = ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let claims = json!({
        "iss": issuer_url(&s.bao.addr()), "aud": TOKEN_AUDIENCE, "iot_role": "device", "device_id": "dev-ok",
        "exp": chrono_now() + 600, "iat": chrono_now(),
    });
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(json!({"alg": "EdDSA", "kid": header["kid"]}).to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let forged = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(key.sign(signed.as_bytes())));
    let creds = IdentityCredentials::from_token_file(token_file(&s, "forged", &forged)?, Some(Id::new("dev-ok")?));
    assert!(try_connect(&s.nats, &creds).await.is_err());
    wait_log(&s, "token signature does not verify").await?;

    // A valid token for a device without an enrollment record.
    let unknown = s.credentials(s.enroll_device("dev-unknown").await?)?;
    root.kv_destroy(KV_MOUNT, "devices/dev-unknown").await?;
    assert!(try_connect(&s.nats, &unknown).await.is_err());
    wait_log(&s, "device-dev-unknown is not enrolled").await?;

    // Revoked: connected, then revoked.
    let rev_enrollment = s.enroll_device("dev-rev").await?;
    let revoked = s.credentials(rev_enrollment.clone())?;
    let probe = Probe::connect(&s.nats, &revoked).await?;
    let kept = revoked.token().await?;
    iot_bao::enroll::revoke_device(&root, "dev-rev").await?;
    // The live session ends when its user expires (the callout never issues one
    // longer than USER_TTL), and it cannot come back.
    iot_testkit::wait_until(USER_TTL * 3, "the revoked device's session to end", || async {
        (probe.client.connection_state() != async_nats::connection::State::Connected).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_ne!(
        probe.client.connection_state(),
        async_nats::connection::State::Connected
    );
    // Its enrollment no longer logs in to OpenBao...
    let fresh = s.credentials(rev_enrollment)?;
    assert!(fresh.token().await.is_err());
    // ...and a token it kept from before is refused.
    let creds = IdentityCredentials::from_token_file(token_file(&s, "replayed", &kept)?, Some(Id::new("dev-rev")?));
    assert!(try_connect(&s.nats, &creds).await.is_err());
    wait_log(&s, "device-dev-rev is not enrolled (or was revoked)").await?;

    // Attack: an identity the issuer vouches for, whose claims say device_id=dev-ok
    // (an issuer whose users can influence that claim, or an administrator's
    // mistake): a valid signature, the right audience, an existing record. Only
    // the subject differs, and the record names dev-ok's.
    let rogue = rogue_identity(&root, "dev-ok").await?;
    let creds = IdentityCredentials::from_token_file(token_file(&s, "rogue", &rogue)?, Some(Id::new("dev-ok")?));
    assert!(try_connect(&s.nats, &creds).await.is_err());
    wait_log(&s, "device-dev-ok is enrolled for another subject").await?;

    // Re-enrolled: a token minted with the old enrollment is void at once, even
    // though it has not expired.
    let before = s.enroll_device("dev-again").await?;
    let old = s.credentials(before)?;
    let old_token = old.token().await?;
    try_connect(&s.nats, &old).await.map_err(anyhow::Error::msg)?;
    let after = s.credentials(s.enroll_device("dev-again").await?)?;
    try_connect(&s.nats, &after).await.map_err(anyhow::Error::msg)?;
    let creds = IdentityCredentials::from_token_file(token_file(&s, "old", &old_token)?, Some(Id::new("dev-again")?));
    assert!(try_connect(&s.nats, &creds).await.is_err());
    wait_log(&s, "device-dev-again is enrolled for another subject").await?;

    // The good device is still fine.
    try_connect(&s.nats, &good).await.map_err(anyhow::Error::msg)?;
    Ok(())
}

/// An identity token from OpenBao for an entity that is not `device`'s but whose
/// metadata claims to be: what an issuer that lets its users set claims hands out.
async fn rogue_identity(root: &iot_bao::Bao, device: &str) -> anyhow::Result<String> {
    let name = "rogue-entity";
    root.post(
        &format!("auth/approle/role/{name}"),
        &json!({"token_policies": [iot_bao::setup::IDENTITY_POLICY], "token_type": "service"}),
    )
    .await?;
    let role_id = root
        .get(&format!("auth/approle/role/{name}/role-id"))
        .await?
        .pointer("/data/role_id")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let secret_id = root
        .post(&format!("auth/approle/role/{name}/secret-id"), &json!({}))
        .await?
        .pointer("/data/secret_id")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_owned();
    root.post(
        &format!("identity/entity/name/{name}"),
        &json!({"metadata": {"iot_role": "device", "iot_name": device, "device_id": device}}),
    )
    .await?;
    let entity = root
        .get(&format!("identity/entity/name/{name}"))
        .await?
        .pointer("/data/id")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let auths = root.get("sys/auth").await?;
    let accessor = auths
        .pointer("/data/approle~1/accessor")
        .or_else(|| auths.pointer("/approle~1/accessor"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_owned();
    root.post(
        "identity/entity-alias",
        &json!({"name": role_id, "canonical_id": entity, "mount_accessor": accessor}),
    )
    .await?;
    let login = root.clone().approle_login(&role_id, &secret_id).await?;
    Ok(root
        .clone()
        .with_token(login.token)
        .identity_token(TOKEN_ROLE)
        .await?
        .jwt)
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
