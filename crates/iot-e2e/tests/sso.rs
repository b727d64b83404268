//! Single sign-on, end to end: a real OIDC provider (the Zitadel stand-in on
//! `oidc-provider`), the full kube-apiserver 1.20.2 with `--oidc-*` flags and RBAC,
//! the chart's iot-fleet-* roles bound to OIDC groups, and `iotctl login` /
//! `iotctl credential` as kubectl's and kube-rs's exec plugin.

use std::time::Duration;

use harmony_reconciler_contracts::DeploymentRef;
use iot_e2e::chart::*;
use iot_e2e::sso::*;
use iot_e2e::stack::*;
use iot_testkit::{KubeApiServer, OidcOptions, OidcStandIn, free_port, wait_until};

/// An HTTPS GET to the API server with this bearer token (None: no credentials);
/// returns the status code.
fn api_status(api: &KubeApiServer, token: Option<&str>) -> anyhow::Result<u16> {
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
        "--cacert",
    ])
    .arg(api.ca_file());
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    cmd.arg(format!("{}/apis/iot.nationtech.io/v1alpha1/deployments", api.url()));
    let (_, out, _) = iot_testkit::run_captured(cmd, None)?;
    Ok(out.trim().parse()?)
}

#[tokio::test]
async fn oidc_groups_decide_who_may_deploy_and_the_operator_keeps_working() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let oidc = OidcStandIn::start_in(dir.path(), OidcOptions::default()).await?;
    let api = KubeApiServer::start_in(dir.path(), Some(oidc.api_server_flags())).await?;
    let ns = "iot-system";
    install_chart_with_sso_groups(&api, ns)?;

    // The operator runs as the chart's ServiceAccount next to the OIDC users.
    let admin = api.kube_client().await?;
    let sa = "iot-iot-operator";
    let token = service_account_token(&admin, ns, sa).await?;
    let sa_kubeconfig = api.token_kubeconfig("operator", &token)?;
    let dave = login(&oidc, &api, DAVE_DEPLOYER, Flow::Browser, dir.path()).await?;
    let vera = login(&oidc, &api, VERA_VIEWER, Flow::Browser, dir.path()).await?;
    let alice = login(&oidc, &api, ALICE_ADMIN, Flow::Browser, dir.path()).await?;
    let nora = login(&oidc, &api, NORA_NESTED, Flow::Browser, dir.path()).await?;
    let sam = login(&oidc, &api, SAM_NOGROUPS, Flow::Browser, dir.path()).await?;
    let olga = login(&oidc, &api, OLGA_OTHER_PROJECT, Flow::Browser, dir.path()).await?;
    assert!(
        olga.login_messages.contains("(groups: fleet-viewers)"),
        "a role of another project does not reach the cluster: {}",
        olga.login_messages
    );
    assert!(
        dave.login_messages
            .contains("as dave@fleet.example (groups: fleet-deployers)"),
        "{}",
        dave.login_messages
    );
    assert!(
        nora.login_messages.contains("only in Zitadel's nested roles claim")
            && nora.login_messages.contains("flat-groups.js"),
        "nora is told why her role will not work: {}",
        nora.login_messages
    );

    let mut stack = Stack::start_on(Cluster::Full(api), false).await?;
    stack.operator_kubeconfig = Some(sa_kubeconfig);
    for (k, v) in [
        ("IOT_LEADER_ELECT", "true"),
        ("POD_NAMESPACE", ns),
        ("POD_NAME", "iot-iot-operator-0"),
        ("IOT_LEADER_LEASE", "iot-iot-operator"),
    ] {
        stack.operator_env.push((k.into(), v.into()));
    }
    stack.start_operator()?;
    stack.wait_operator_ready().await?;
    let (dev, guard) = stack.start_agent()?;
    let port = free_port()?;
    let applier_as = |who: &Person, image: &str| -> anyhow::Result<(bool, String, String)> {
        let mut cmd = stack.applier()?;
        cmd.env("KUBECONFIG", &who.kubeconfig)
            .env("XDG_CONFIG_HOME", &who.config_home)
            .args([
                "--name",
                "web",
                "--namespace",
                "default",
                "--target-device",
                &dev,
                "--image",
                image,
            ])
            .args(["--port", &port.to_string()]);
        iot_testkit::run_captured(cmd, None)
    };

    // A deployer applies through the typed applier (kube-rs runs `iotctl credential`).
    let (ok, out, err) = applier_as(&dave, "localhost/iot-web:v1")?;
    assert!(ok, "dave applies: {out}{err}");
    wait_http(port, "v1").await?;
    stack
        .wait_resource_status("default", "web", "aggregate.succeeded == 1", |s| {
            s.aggregate.as_ref().is_some_and(|a| a.succeeded == 1 && a.targets == 1)
        })
        .await?;

    // ... and through kubectl with the plugin.
    let port2 = free_port()?;
    let mut print = stack.applier()?;
    print
        .args(["--name", "web2", "--namespace", "default", "--target-device", &dev])
        .args([
            "--image",
            "localhost/iot-web:v2",
            "--port",
            &port2.to_string(),
            "--print",
        ]);
    let manifest = run_ok(print)?;
    let (ok, out, err) = dave.kubectl(&["apply", "-f", "-"], Some(&manifest))?;
    assert!(ok && out.contains("web2"), "kubectl apply as dave: {out}{err}");
    wait_http(port2, "v2").await?;

    // A viewer reads but may not write; the refusal is readable.
    let (ok, out, err) = vera.kubectl(&["get", "deployments.iot.nationtech.io", "-A"], None)?;
    assert!(
        ok && out.contains("web2") && out.contains("web "),
        "vera lists: {out}{err}"
    );
    let (ok, out, err) = vera.kubectl(
        &[
            "get",
            "deployments.iot.nationtech.io",
            "web",
            "-n",
            "default",
            "-o",
            "name",
        ],
        None,
    )?;
    assert!(ok, "vera gets: {out}{err}");
    let (ok, out, err) = applier_as(&vera, "localhost/iot-web:v2")?;
    assert!(!ok, "vera's apply must fail: {out}");
    for want in [
        "not allowed by the cluster's RBAC",
        "oidc:vera@fleet.example",
        "cannot patch resource \"deployments\"",
    ] {
        assert!(err.contains(want), "vera's update refusal should say {want:?}: {err}");
    }
    let mut create = stack.applier()?;
    create
        .env("KUBECONFIG", &vera.kubeconfig)
        .env("XDG_CONFIG_HOME", &vera.config_home)
        .args([
            "--name",
            "vera-new",
            "--namespace",
            "default",
            "--target-device",
            &dev,
            "--image",
            "x:1",
        ]);
    let (ok, _, err) = iot_testkit::run_captured(create, None)?;
    assert!(
        !ok && err.contains("oidc:vera@fleet.example") && err.contains("forbidden"),
        "vera's create: {err}"
    );
    let (ok, _, err) = vera.kubectl(
        &["delete", "deployments.iot.nationtech.io", "web", "-n", "default"],
        None,
    )?;
    assert!(
        !ok && err.contains("Forbidden") && err.contains("cannot delete resource"),
        "vera's delete: {err}"
    );

    // fleet-admins in another project: still only a viewer here.
    let (ok, _, err) = olga.kubectl(
        &["delete", "deployments.iot.nationtech.io", "web", "-n", "default"],
        None,
    )?;
    assert!(!ok && err.contains("oidc:olga@fleet.example"), "olga's delete: {err}");

    // No group, or a role only in Zitadel's nested claim: authenticated, allowed nothing.
    for who in [&sam, &nora] {
        let (ok, _, err) = who.kubectl(&["get", "deployments.iot.nationtech.io", "-A"], None)?;
        let email = format!("oidc:{}@fleet.example", who.user);
        assert!(
            !ok && err.contains(&email) && err.contains("cannot list resource"),
            "{}: {err}",
            who.user
        );
    }

    // An admin deletes; the operator tears down on the device as usual.
    let (ok, out, err) = alice.kubectl(
        &["delete", "deployments.iot.nationtech.io", "web2", "-n", "default"],
        None,
    )?;
    assert!(ok, "alice deletes: {out}{err}");
    wait_until(WAIT, "web2's key gone", || async {
        let dep = DeploymentRef::new("default", "web2").ok()?;
        stack.keys_of(&dep).await.ok()?.is_empty().then_some(())
    })
    .await?;
    let (ok, _, err) = dave.kubectl(
        &["delete", "deployments.iot.nationtech.io", "web", "-n", "default"],
        None,
    )?;
    assert!(ok, "dave deletes his own: {err}");
    wait_until(WAIT, "containers gone", || async {
        guard.ids().is_empty().then_some(())
    })
    .await?;

    // The audit log shows who did what under their own names, and the operator's
    // ServiceAccount was never refused.
    let Cluster::Full(api) = &stack.api else {
        anyhow::bail!("not the full server")
    };
    let audit = api.audit()?;
    let by = |user: &str, verb: &str, decision: &str| {
        audit
            .iter()
            .any(|e| e.user == user && e.verb == verb && e.decision == decision && e.uri.contains("iot.nationtech.io"))
    };
    assert!(
        by("oidc:dave@fleet.example", "patch", "allow"),
        "dave's apply is audited"
    );
    assert!(
        by("oidc:vera@fleet.example", "patch", "forbid"),
        "vera's refused write is audited"
    );
    assert!(
        by("oidc:alice@fleet.example", "delete", "allow"),
        "alice's delete is audited"
    );
    let sa_user = format!("system:serviceaccount:{ns}:{sa}");
    assert!(audit.iter().any(|e| e.user == sa_user && e.uri.contains("/status")));
    let refused: Vec<_> = audit
        .iter()
        .filter(|e| e.user == sa_user && e.decision == "forbid")
        .collect();
    assert!(refused.is_empty(), "operator refused: {refused:#?}");
    Ok(())
}

#[tokio::test]
async fn expired_tokens_are_refreshed_once_and_a_dead_session_asks_for_a_login() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let oidc = OidcStandIn::start_in(
        dir.path(),
        OidcOptions {
            id_token_ttl: Duration::from_secs(12),
            ..OidcOptions::default()
        },
    )
    .await?;
    let api = KubeApiServer::start_in(dir.path(), Some(oidc.api_server_flags())).await?;
    install_chart_with_sso_groups(&api, "iot-system")?;
    let dave = login(&oidc, &api, DAVE_DEPLOYER, Flow::Browser, dir.path()).await?;

    // No credentials, and garbage credentials: 401.
    assert_eq!(api_status(&api, None)?, 401);
    assert_eq!(api_status(&api, Some("not.a.token"))?, 401);
    let first = dave.credential_token(&oidc)?;
    assert_eq!(api_status(&api, Some(&first))?, 200, "a fresh token is accepted");

    // Let it expire: the API server refuses it, and the plugin refreshes it.
    wait_until(Duration::from_secs(40), "the first ID token to be refused", || async {
        (api_status(&api, Some(&first)).ok()? == 401).then_some(())
    })
    .await?;
    let (ok, out, err) = dave.kubectl(&["get", "deployments.iot.nationtech.io", "-A"], None)?;
    assert!(ok, "kubectl after expiry: {out}{err}");
    let second = dave.credential_token(&oidc)?;
    assert_ne!(first, second, "a new ID token was issued");
    assert_eq!(api_status(&api, Some(&second))?, 200);

    // Many plugin runs at once after expiry share one refresh: the stand-in
    // rotates refresh tokens and ends the whole session when one is used twice,
    // so without the lock most of these would fail.
    wait_until(Duration::from_secs(40), "the second ID token to expire", || async {
        (api_status(&api, Some(&second)).ok()? == 401).then_some(())
    })
    .await?;
    let runs: Vec<_> = (0..6)
        .map(|_| {
            let mut cmd = dave.iotctl()?;
            cmd.args(["credential", "--issuer", oidc.issuer(), "--ca-file"])
                .arg(oidc.ca_file());
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            Ok(cmd.spawn()?)
        })
        .collect::<anyhow::Result<_>>()?;
    let mut tokens = std::collections::BTreeSet::new();
    for run in runs {
        let out = run.wait_with_output()?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        tokens.insert(v["status"]["token"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(tokens.len(), 1, "one refresh shared by all");
    let third = tokens.into_iter().next().unwrap_or_default();
    assert_ne!(third, second);
    let (ok, _, err) = dave.kubectl(&["get", "deployments.iot.nationtech.io", "-A"], None)?;
    assert!(ok, "the session survived the concurrent refresh: {err}");

    // A session without a refresh token ends with the ID token.
    let cache_dir = dave.config_home.join("iotctl/sso");
    let cache_file = std::fs::read_dir(&cache_dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .ok_or_else(|| anyhow::anyhow!("no token cache in {}", cache_dir.display()))?;
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&cache_file)?.permissions()) & 0o777;
    assert_eq!(mode, 0o600, "the token cache is private");
    let mut cached: serde_json::Value = serde_json::from_slice(&std::fs::read(&cache_file)?)?;
    let saved_refresh = cached["refreshToken"].clone();
    cached["refreshToken"] = serde_json::Value::Null;
    std::fs::write(&cache_file, serde_json::to_vec(&cached)?)?;
    wait_until(Duration::from_secs(40), "the third ID token to expire", || async {
        (api_status(&api, Some(&third)).ok()? == 401).then_some(())
    })
    .await?;
    let (ok, _, err) = dave.kubectl(&["get", "deployments.iot.nationtech.io", "-A"], None)?;
    assert!(!ok, "no refresh token, expired ID token: kubectl must fail");
    for want in [
        "has ended",
        "no refresh token",
        "Log in again with: iotctl login --issuer",
    ] {
        assert!(err.contains(want), "the message should say {want:?}: {err}");
    }
    let (ok, _, err) = dave.kubectl(&["get", "deployments.iot.nationtech.io", "-A"], None)?;
    assert!(
        !ok && err.contains("not logged in"),
        "the dead session is forgotten: {err}"
    );

    // Logout revokes the refresh token at the provider. Put the old cache back, as
    // a second machine with the same session would still have it: once its ID
    // token expires, the provider refuses the revoked refresh token.
    let dave = login(&oidc, &api, DAVE_DEPLOYER, Flow::Browser, dir.path()).await?;
    let token = dave.credential_token(&oidc)?;
    let kept = std::fs::read(&cache_file)?;
    let mut logout = dave.iotctl()?;
    logout
        .args(["logout", "--issuer", oidc.issuer(), "--ca-file"])
        .arg(oidc.ca_file());
    let (ok, _, err) = iot_testkit::run_captured(logout, None)?;
    assert!(ok && err.contains("refresh token is revoked"), "logout: {err}");
    let (ok, _, err) = dave.kubectl(&["get", "deployments.iot.nationtech.io", "-A"], None)?;
    assert!(!ok && err.contains("not logged in"), "after logout: {err}");
    std::fs::write(&cache_file, &kept)?;
    wait_until(Duration::from_secs(40), "the last ID token to expire", || async {
        (api_status(&api, Some(&token)).ok()? == 401).then_some(())
    })
    .await?;
    let (ok, _, err) = dave.kubectl(&["get", "deployments.iot.nationtech.io", "-A"], None)?;
    assert!(!ok, "a revoked refresh token must not renew the session");
    for want in [
        "refused the refresh token",
        "invalid_grant",
        "Log in again with: iotctl login",
    ] {
        assert!(err.contains(want), "the message should say {want:?}: {err}");
    }
    assert!(saved_refresh.is_string(), "the cache held a refresh token before");
    Ok(())
}

#[tokio::test]
async fn device_code_login_works_for_a_shell_without_a_browser() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let oidc = OidcStandIn::start_in(dir.path(), OidcOptions::default()).await?;
    let api = KubeApiServer::start_in(dir.path(), Some(oidc.api_server_flags())).await?;
    install_chart_with_sso_groups(&api, "iot-system")?;
    let alice = login(&oidc, &api, ALICE_ADMIN, Flow::DeviceCode, dir.path()).await?;
    assert!(
        alice.login_messages.contains("enter the code") && alice.login_messages.contains("groups: fleet-admins"),
        "{}",
        alice.login_messages
    );
    let (ok, out, err) = alice.kubectl(
        &["auth", "can-i", "delete", "deployments.iot.nationtech.io", "-A"],
        None,
    )?;
    assert!(ok && out.trim() == "yes", "alice may delete: {out}{err}");
    let (ok, out, _) = alice.kubectl(
        &[
            "auth",
            "can-i",
            "patch",
            "deployments.iot.nationtech.io",
            "--subresource=status",
            "-A",
        ],
        None,
    )?;
    assert!(!ok && out.trim() == "no", "status has one writer, the operator: {out}");

    // A wrong password is refused at the provider and nothing gets cached.
    let bad = login(&oidc, &api, ("vera", "wrong", ""), Flow::Browser, dir.path()).await;
    let msg = bad.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("401") && msg.contains("Unknown user or wrong password"),
        "{msg}"
    );
    Ok(())
}
