//! Changes from the dashboard, in real headless Chromium, as the signed-in person:
//! the OIDC stand-in for Zitadel, the full kube-apiserver with `--oidc-*` and the
//! chart's fleet roles, the operator and a device running podman.
//! - a deployer signs in through the provider's own page, changes the image from
//!   the deployment page, and the device serves v2;
//! - a write without the session's CSRF token is refused and changes nothing;
//! - a second device is added as a target from the page, runs it, and is removed;
//! - a deployment that selects devices by label offers no target edits, and one
//!   forced anyway is refused with the reason, changing nothing;
//! - a viewer sees a read-only page, and a write forced anyway is refused by the
//!   API server, whose reason the page shows;
//! - the deployer deletes the deployment from the page;
//! - a sign-in started before a flood of anonymous `GET /login`s still completes
//!   (nothing is kept per started sign-in, so nothing can be pushed out);
//! - the identity provider going away does not sign anyone out: a change that
//!   needs a fresh token is refused with a 503, and the session stays.

mod common;

use common::*;
use fantoccini::{Client, Locator};
use futures::StreamExt as _;
use iot_e2e::sso::install_chart_with_sso_groups;
use iot_e2e::stack::*;
use iot_testkit::{KubeApiServer, OidcOptions, OidcStandIn, free_port, run_captured, wait_until};
use serde_json::json;

/// Chromium trusts exactly the stand-in's key (`--ignore-certificate-errors-spki-list`
/// takes the base64 SHA-256 of its SubjectPublicKeyInfo), not every certificate.
fn trust_key_of(cert: &std::path::Path) -> anyhow::Result<String> {
    let script = format!(
        "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
        cert.display()
    );
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", &script]);
    let (ok, out, err) = run_captured(cmd, None)?;
    anyhow::ensure!(ok, "hashing the stand-in's key: {err}");
    Ok(format!("--ignore-certificate-errors-spki-list={}", out.trim()))
}

/// Signs in from the page's "Sign in" link: through the provider's form, or
/// straight back when the browser still has a session at the provider (signing
/// out of the dashboard does not sign out of the company's identity provider).
async fn sign_in(c: &Client, dashboard: &str, page: &str, user: &str, password: &str) -> anyhow::Result<()> {
    sign_in_with(c, dashboard, page, user, password, 0).await
}

/// [`sign_in`], with `flood` anonymous sign-ins started by someone else while this
/// one waits at the provider's form. The dashboard used to keep started sign-ins
/// in a table of 1,000 and push out the oldest.
async fn sign_in_with(
    c: &Client,
    dashboard: &str,
    page: &str,
    user: &str,
    password: &str,
    flood: usize,
) -> anyhow::Result<()> {
    c.goto(&format!("{dashboard}{page}")).await?;
    c.find(Locator::Css("#signin")).await?.click().await?;
    let landed = wait_until(WAIT, "the provider's form or the signed-in page", || async {
        if text(c, "#user").await.is_some() {
            return Some(false);
        }
        // Chromium aborts a load when the host's interfaces change (the test's
        // devices add veths and podman networks); a person would reload.
        if text(c, "body")
            .await
            .is_some_and(|t| t.contains("network change was detected"))
        {
            let _ = c.refresh().await;
            return None;
        }
        text(c, "#username").await.map(|_| true)
    })
    .await;
    if flood > 0 {
        let port: u16 = dashboard.rsplit(':').next().unwrap_or_default().parse()?;
        let codes: Vec<u16> = futures::stream::iter(0..flood)
            .map(|_| async move {
                iot_testkit::http::get("127.0.0.1", port, "/login?next=/")
                    .await
                    .map(|(code, _)| code)
                    .unwrap_or(0)
            })
            .buffer_unordered(32)
            .collect()
            .await;
        let started = codes.iter().filter(|c| (300..400).contains(*c)).count();
        assert_eq!(started, flood, "every flood request started a sign-in: {codes:?}");
    }
    match landed {
        Ok(true) => {
            c.find(Locator::Css("#username")).await?.send_keys(user).await?;
            c.find(Locator::Css("#password")).await?.send_keys(password).await?;
            c.find(Locator::Css("button[type=submit]")).await?.click().await?;
        }
        Ok(false) => {}
        Err(e) => {
            let url = c.current_url().await.map(|u| u.to_string()).unwrap_or_default();
            let body = text(c, "body").await.unwrap_or_default();
            anyhow::bail!("no sign-in form ({e}) at {url}: {body}");
        }
    }
    wait_text(c, "#user", "the signed-in user in the header", |t| t.starts_with(user)).await?;
    anyhow::ensure!(
        c.current_url().await?.as_str() == format!("{dashboard}{page}"),
        "back on {page} after signing in"
    );
    Ok(())
}

async fn sign_out(c: &Client) -> anyhow::Result<()> {
    c.find(Locator::Css("form.account button")).await?.click().await?;
    wait_until(WAIT, "signed out", || async { text(c, "#signin").await.map(drop) }).await
}

/// POSTs a form from inside the page (same origin, the session cookie included),
/// as a crafted page or a script would; returns (status, final URL, body).
async fn post_from_page(c: &Client, path: &str, body: &str) -> anyhow::Result<(u64, String, String)> {
    let v = c
        .execute_async(
            "const [url, body, done] = arguments;
             fetch(url, {method: 'POST', headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body})
               .then(r => r.text().then(t => done([r.status, r.url, t])))
               .catch(e => done([0, '', String(e)]));",
            vec![json!(path), json!(body)],
        )
        .await?;
    Ok((
        v[0].as_u64().unwrap_or_default(),
        v[1].as_str().unwrap_or_default().to_owned(),
        v[2].as_str().unwrap_or_default().to_owned(),
    ))
}

/// Fills fields of the page's form and submits it as a click would (the form's
/// own hidden fields, CSRF token included, go along).
async fn submit_form(c: &Client, form: &str, fields: &[(&str, &str)]) -> anyhow::Result<()> {
    let values: serde_json::Map<String, serde_json::Value> =
        fields.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect();
    c.execute(
        "const [sel, values] = arguments; const f = document.querySelector(sel);
         for (const [k, v] of Object.entries(values)) { f.elements[k].value = v; }
         f.requestSubmit();",
        vec![json!(form), json!(values)],
    )
    .await?;
    Ok(())
}

async fn dave_csrf(c: &Client) -> anyhow::Result<String> {
    Ok(c.execute(
        "return document.querySelector('form.account input[name=csrf]').value;",
        vec![],
    )
    .await?
    .as_str()
    .unwrap_or_default()
    .to_owned())
}

async fn image_of(stack: &Stack) -> anyhow::Result<String> {
    let dep = stack.deployments("default").get("web").await?;
    let iot_api::IotScore::PodmanV0(score) = &dep.spec.score;
    Ok(score.services.first().map(|s| s.image.clone()).unwrap_or_default())
}

#[tokio::test]
async fn people_change_deployments_as_themselves_and_rbac_decides() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Short ID tokens: the test sees refreshes, and a refresh the provider cannot
    // answer (see the end).
    let mut oidc = OidcStandIn::start_in(
        dir.path(),
        OidcOptions {
            id_token_ttl: std::time::Duration::from_secs(30),
            ..OidcOptions::default()
        },
    )
    .await?;
    let api = KubeApiServer::start_in(dir.path(), Some(oidc.api_server_flags())).await?;
    install_chart_with_sso_groups(&api, "iot-system")?;
    let mut stack = Stack::start_on(Cluster::Full(api), false).await?;
    stack.start_operator()?;
    stack.wait_operator_ready().await?;
    let (dev, guard) = stack.start_agent()?;
    let http = free_port()?;
    let mut cmd = stack.applier()?;
    cmd.args(["--name", "web", "--namespace", "default", "--target-device", &dev])
        .args(["--image", "localhost/iot-web:v1", "--port", &http.to_string()]);
    run_ok(cmd)?;
    wait_http(http, "v1").await?;

    let (_dashboard, port) = spawn_dashboard_with(
        &stack,
        "30s",
        &[
            ("IOT_DASHBOARD_OIDC_ISSUER", oidc.issuer().to_owned()),
            ("IOT_DASHBOARD_OIDC_CA_FILE", oidc.ca_file().display().to_string()),
        ],
    )?;
    wait_dashboard(port).await?;
    let dashboard = format!("http://127.0.0.1:{port}");
    let page = "/deployments/default/web";
    let trust = trust_key_of(&oidc.ca_file().with_file_name("server.crt"))?;
    let b = browser_with(stack.dir.path(), &[trust]).await?;
    let c = &b.client;

    // Nobody signed in: the page offers sign-in, no forms.
    c.goto(&format!("{dashboard}{page}")).await?;
    wait_text(c, "#changes", "the sign-in offer", |t| t.contains("Sign in to change")).await?;

    // A deployer changes the image from the page; the device serves v2. Their
    // sign-in survives 1,500 others started meanwhile.
    sign_in_with(c, &dashboard, page, "dave", "dave-dev", 1_500).await?;
    // kube-apiserver 1.20 fetches the issuer's keys in the background after it
    // starts, and refuses ID tokens until then: reload until it accepts them.
    wait_until(WAIT, "the change forms", || async {
        if text(c, "#image-web").await.is_some() {
            return Some(());
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let _ = c.refresh().await;
        None
    })
    .await?;
    // Typed as a person would. A live update can replace the form before the
    // field has focus (it waits while one has); then the person starts again.
    on_live_page("changing the image", || async {
        let field = c.find(Locator::Css("#image-web input[name=image]")).await?;
        field.clear().await?;
        field.send_keys("localhost/iot-web:v2").await?;
        c.find(Locator::Css("#image-web button[type=submit]"))
            .await?
            .click()
            .await
    })
    .await?;
    wait_text(c, "#flash", "the change's confirmation", |t| {
        t.contains("now runs localhost/iot-web:v2")
    })
    .await?;
    screenshot(c, "dashboard-change-image").await?;
    wait_http(http, "v2").await?;
    assert_eq!(image_of(&stack).await?, "localhost/iot-web:v2");

    // A live update waits while the person types in a form, and comes in once
    // they leave the field (the device here reports every second).
    const FIELD: &str = "return document.querySelector('#image-web input[name=image]').value;";
    const HELD: &str = "return document.getElementById('main').dataset.held || null;";
    on_live_page("typing a draft", || async {
        let field = c.find(Locator::Css("#image-web input[name=image]")).await?;
        field.clear().await?;
        field.send_keys("localhost/iot-web:draft").await
    })
    .await?;
    wait_until(WAIT, "a live update held back while typing", || async {
        eval_string(c, HELD).await.map(drop)
    })
    .await?;
    assert_eq!(
        eval_string(c, FIELD).await.as_deref(),
        Some("localhost/iot-web:draft"),
        "the draft survives the held update"
    );
    c.find(Locator::Css("#user")).await?.click().await?;
    wait_until(WAIT, "the held update, once the field is left", || async {
        let value = eval_string(c, FIELD).await?;
        (eval_string(c, HELD).await.is_none() && value == "localhost/iot-web:v2").then_some(())
    })
    .await?;

    // Without the CSRF token (or with a wrong one): refused, nothing changes.
    let csrf = c
        .execute(
            "return document.querySelector('form.account input[name=csrf]').value;",
            vec![],
        )
        .await?
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(csrf.len() >= 32, "the session has a CSRF token");
    for body in [
        "service=web&image=localhost%2Fiot-web%3Av1".to_owned(),
        "service=web&image=localhost%2Fiot-web%3Av1&csrf=forged".to_owned(),
    ] {
        let (status, _, text) = post_from_page(c, &format!("{page}/image"), &body).await?;
        assert_eq!(status, 403, "{body}: {text}");
        assert!(text.contains("CSRF"), "{text}");
    }
    let (status, _, _) = post_from_page(c, &format!("{page}/delete"), "").await?;
    assert_eq!(status, 403, "a delete without the token");
    // A form from before the image change (generation 1) does not overwrite it.
    let stale = format!(
        "service=web&image=localhost%2Fiot-web%3Av1&gen=1&csrf={}",
        urlencoding::encode(&csrf)
    );
    let (status, _, text) = post_from_page(c, &format!("{page}/image"), &stale).await?;
    assert!(
        status == 200 && text.contains("Someone changed this deployment"),
        "{status}: {text}"
    );
    assert_eq!(image_of(&stack).await?, "localhost/iot-web:v2", "unchanged");
    assert!(
        stack.deployments("default").get_opt("web").await?.is_some(),
        "not deleted"
    );

    // A second device joins from the page, runs the deployment, and leaves again.
    // Its arrival changes the fleet, and a live update may replace the page's
    // forms at any moment, so each form is filled and submitted in one step.
    let (dev2, guard2) = stack.start_agent()?;
    c.goto(&format!("{dashboard}{page}")).await?;
    c.wait().for_element(Locator::Css("#add-target")).await?;
    submit_form(c, "#add-target", &[("device", &dev2)]).await?;
    wait_text(c, "#flash", "the target's confirmation", |t| {
        t.contains(&format!("Added {dev2}"))
    })
    .await?;
    wait_until(WAIT, "the second device runs it", || async {
        (!guard2.ids().is_empty()).then_some(())
    })
    .await?;
    c.wait().for_element(Locator::Css("#remove-target")).await?;
    submit_form(c, "#remove-target", &[("device", &dev2)]).await?;
    wait_text(c, "#flash", "the removal's confirmation", |t| {
        t.contains(&format!("Removed {dev2}"))
    })
    .await?;
    wait_until(WAIT, "the second device's container gone", || async {
        guard2.ids().is_empty().then_some(())
    })
    .await?;
    let targets = stack.deployments("default").get("web").await?.spec.target_devices;
    assert_eq!(targets, vec![dev.clone()]);

    // A deployment that selects its devices by label has no list to edit: the
    // page offers no target forms, and a forced edit is refused with the reason.
    let mut cmd = stack.applier()?;
    cmd.args([
        "--name",
        "web-sel",
        "--namespace",
        "default",
        "--selector",
        "site=madrid",
    ])
    .args(["--image", "localhost/iot-web:v1"]);
    run_ok(cmd)?;
    let sel_page = "/deployments/default/web-sel";
    c.goto(&format!("{dashboard}{sel_page}")).await?;
    wait_text(c, "#selector-note", "the selector note", |t| t.contains("site=madrid")).await?;
    assert!(
        c.find_all(Locator::Css("#add-target, #remove-target"))
            .await?
            .is_empty(),
        "no target forms for a selector deployment"
    );
    let body = format!(
        "op=add&device={dev2}&csrf={}",
        urlencoding::encode(&dave_csrf(c).await?)
    );
    let (status, _, text) = post_from_page(c, &format!("{sel_page}/targets"), &body).await?;
    assert!(
        status == 200
            && text.contains("this deployment selects devices by label (site=madrid); change the Device")
            && text.contains("labels instead"),
        "{status}: {text}"
    );
    let sel = stack.deployments("default").get("web-sel").await?;
    assert!(
        sel.spec.target_devices.is_empty() && sel.spec.selector.is_some(),
        "unchanged"
    );
    sign_out(c).await?;

    // A viewer, in her own browser: the page is read-only, and a write forced
    // with a valid token is refused by the API server, whose reason is shown.
    let trust = trust_key_of(&oidc.ca_file().with_file_name("server.crt"))?;
    let vera_browser = browser_with(stack.dir.path(), &[trust]).await?;
    let c = &vera_browser.client;
    sign_in(c, &dashboard, page, "vera", "vera-dev").await?;
    wait_text(c, "#readonly", "the read-only note", |t| {
        t.contains("allows you no changes")
    })
    .await?;
    let forms = c.find_all(Locator::Css("#changes form")).await?;
    assert!(forms.is_empty(), "no change forms for a viewer");
    screenshot(c, "dashboard-viewer-read-only").await?;
    let csrf = c
        .execute(
            "return document.querySelector('form.account input[name=csrf]').value;",
            vec![],
        )
        .await?
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let body = format!(
        "service=web&image=localhost%2Fiot-web%3Av1&csrf={}",
        urlencoding::encode(&csrf)
    );
    let (status, url, text) = post_from_page(c, &format!("{page}/image"), &body).await?;
    assert_eq!(
        (status, url.as_str()),
        (200, format!("{dashboard}{page}").as_str()),
        "{text}"
    );
    for want in [
        "Refused by the cluster",
        "oidc:vera@fleet.example",
        "cannot update resource",
    ] {
        assert!(text.contains(want), "the page should say {want:?}");
    }
    assert_eq!(
        image_of(&stack).await?,
        "localhost/iot-web:v2",
        "the viewer changed nothing"
    );

    // The deployer deletes it from the page; the device stops serving.
    let c = &b.client;
    sign_in(c, &dashboard, page, "dave", "dave-dev").await?;
    // Unconfirmed: nothing happens.
    let (status, _, text) = post_from_page(
        c,
        &format!("{page}/delete"),
        &format!("csrf={}", urlencoding::encode(&dave_csrf(c).await?)),
    )
    .await?;
    assert!(
        status == 200 && text.contains("Nothing was deleted"),
        "{status}: {text}"
    );
    assert!(
        stack.deployments("default").get_opt("web").await?.is_some(),
        "still there"
    );
    c.goto(&format!("{dashboard}{page}")).await?;
    c.wait()
        .for_element(Locator::Css("#delete input[name=confirm]"))
        .await?;
    // A device's report can swap the page between finding the box and clicking
    // it. Once the box has focus the page holds still, so a retry starts from a
    // fresh, unticked box.
    on_live_page("confirming the delete", || async {
        c.find(Locator::Css("#delete input[name=confirm]"))
            .await?
            .click()
            .await?;
        c.find(Locator::Css("#delete button")).await?.click().await
    })
    .await?;
    wait_text(c, "#flash", "the delete's confirmation", |t| {
        t.contains("Deleted default/web")
    })
    .await?;
    wait_until(WAIT, "the container gone", || async {
        guard.ids().is_empty().then_some(())
    })
    .await?;

    // The identity provider goes away. Once dave's ID token needs refreshing, a
    // change is refused with a 503 that says why, and he stays signed in.
    oidc.stop();
    tokio::time::sleep(std::time::Duration::from_secs(31)).await;
    let body = format!(
        "service=web&image=localhost%2Fiot-web%3Av3&csrf={}",
        urlencoding::encode(&dave_csrf(c).await?)
    );
    let (status, _, text) = post_from_page(c, &format!("{page}/image"), &body).await?;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("You are still signed in"), "{text}");
    c.goto(&format!("{dashboard}/")).await?;
    wait_text(c, "#user", "still signed in", |t| t.starts_with("dave")).await?;
    Ok(())
}
