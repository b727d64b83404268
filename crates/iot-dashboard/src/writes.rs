//! Sign-in and the three changes the dashboard offers: a deployment's image, its
//! target devices, and deleting it. Each change is sent to the API server as the
//! signed-in person ([`crate::auth`]), checked against the CSRF token of their
//! session and, for edits, against the spec generation the page showed, so a
//! change made meanwhile by someone else is not overwritten silently.

use std::collections::HashMap;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use harmony_reconciler_contracts::{Id, describe_problems, validate_score};
use iot_api::{Deployment, IotScore};
use kube::Api;
use kube::api::{DeleteParams, PostParams};

use crate::auth::{self, Auth, Flash, LOGIN_COOKIE, SESSION_COOKIE};
use crate::pages;
use crate::server::App;

type FormData = Form<HashMap<String, String>>;

fn message_page(status: StatusCode, title: &str, text: &str, link: Option<(&str, &str)>) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        pages::layout(title, "", pages::message(title, text, link), &pages::Chrome::default()),
    )
        .into_response()
}

fn writes_off() -> Response {
    message_page(
        StatusCode::NOT_FOUND,
        "Changes are off",
        "This dashboard has no OIDC issuer configured (--oidc-issuer), so it is read-only.",
        Some(("/", "Back to the overview")),
    )
}

pub async fn login(State(app): State<App>, Query(q): Query<HashMap<String, String>>) -> Response {
    let Some(auth) = &app.auth else {
        return writes_off();
    };
    let next = q.get("next").map(String::as_str).unwrap_or("/");
    match auth.begin(next).await {
        Ok((url, sealed)) => {
            let cookie = auth.cookie(
                LOGIN_COOKIE,
                &sealed,
                "/callback",
                Some(std::time::Duration::from_secs(600)),
            );
            ([(header::SET_COOKIE, cookie)], Redirect::to(&url)).into_response()
        }
        Err(e) => message_page(
            StatusCode::BAD_GATEWAY,
            "Sign-in is unavailable",
            &format!("The identity provider cannot be used right now: {e}"),
            Some(("/", "Back to the overview")),
        ),
    }
}

pub async fn callback(
    State(app): State<App>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(auth) = &app.auth else {
        return writes_off();
    };
    if let Some(error) = q.get("error") {
        let detail = q.get("error_description").cloned().unwrap_or_default();
        return message_page(
            StatusCode::UNAUTHORIZED,
            "Sign-in failed",
            &format!("The identity provider said: {error} {detail}"),
            Some(("/login", "Try again")),
        );
    }
    let (Some(state), Some(code)) = (q.get("state"), q.get("code")) else {
        return message_page(
            StatusCode::BAD_REQUEST,
            "Sign-in failed",
            "The response lacks its code or state.",
            Some(("/login", "Try again")),
        );
    };
    let bound = auth::cookie_value(&headers, LOGIN_COOKIE);
    match auth.complete(bound.as_deref(), state, code).await {
        Ok((sid, next)) => {
            let session = auth.cookie(SESSION_COOKIE, &sid, "/", None);
            let clear = auth.cookie(LOGIN_COOKIE, "", "/callback", Some(std::time::Duration::ZERO));
            let mut r = Redirect::to(&next).into_response();
            r.headers_mut().append(
                header::SET_COOKIE,
                session.parse().unwrap_or(header::HeaderValue::from_static("")),
            );
            r.headers_mut().append(
                header::SET_COOKIE,
                clear.parse().unwrap_or(header::HeaderValue::from_static("")),
            );
            r
        }
        Err(e) => message_page(
            StatusCode::BAD_REQUEST,
            "Sign-in failed",
            &e.to_string(),
            Some(("/login", "Try again")),
        ),
    }
}

/// The checks every write shares: a session, a same-origin request, the CSRF
/// token. Returns the session or the response that refuses the request.
async fn guard(
    auth: &Auth,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    back: &str,
) -> Result<(String, crate::auth::SharedSession), Response> {
    // Browsers send Origin on POST; a different one is another site's form.
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok())
        && origin != origin_of(auth.public_url())
    {
        return Err(message_page(
            StatusCode::FORBIDDEN,
            "Refused",
            &format!("This change came from another site ({origin}); nothing was changed."),
            Some((back, "Back")),
        ));
    }
    let Some((sid, shared)) = auth.session(headers).await else {
        return Err(message_page(
            StatusCode::UNAUTHORIZED,
            "Sign in to make changes",
            "You are not signed in, or your session has ended. Nothing was changed.",
            Some((&format!("/login?next={}", urlencoding::encode(back)), "Sign in")),
        ));
    };
    let given = form.get("csrf").map(String::as_str).unwrap_or_default();
    let ok = auth::same_secret(given, &shared.lock().await.csrf);
    if !ok {
        return Err(message_page(
            StatusCode::FORBIDDEN,
            "Refused: missing or wrong CSRF token",
            "This form did not carry this session's CSRF token, so it may not come from this dashboard. Nothing was changed. Reload the page and try again.",
            Some((back, "Back")),
        ));
    }
    Ok((sid, shared))
}

/// The person's token for the API server, refreshed if need be. A session whose
/// refresh the provider refused (revoked, expired, logged out elsewhere) is ended,
/// and the person is asked to sign in again. A provider that cannot be reached or
/// answers with anything else ends nothing: the session is kept for when it is back.
async fn token_or_sign_in(
    auth: &Auth,
    sid: &str,
    session: &mut auth::UserSession,
    back: &str,
) -> Result<String, Response> {
    match auth.token(session).await {
        Ok(t) => Ok(t),
        Err(e) if e.needs_login() => {
            // Only the session table is locked here, never this session.
            auth.end(sid);
            Err(message_page(
                StatusCode::UNAUTHORIZED,
                "Sign in again",
                &e.to_string(),
                Some(("/login", "Sign in")),
            ))
        }
        Err(e) => Err(message_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "The identity provider is unavailable",
            &format!(
                "Your sign-in needs a fresh token and the identity provider could not give one right now: {e}. \
                 You are still signed in. Nothing was changed; try again in a moment."
            ),
            Some((back, "Back")),
        )),
    }
}

/// scheme://host[:port] of a URL.
fn origin_of(url: &str) -> &str {
    let host_start = url.find("://").map_or(0, |i| i + 3);
    match url[host_start..].find('/') {
        Some(j) => &url[..host_start + j],
        None => url,
    }
}

/// What the person asked to change.
enum Change {
    Image { service: String, image: String },
    AddTarget(String),
    RemoveTarget(String),
}

pub async fn change_image(
    state: State<App>,
    headers: HeaderMap,
    path: Path<(String, String)>,
    Form(form): FormData,
) -> Response {
    let service = form.get("service").cloned().unwrap_or_default();
    let image = form.get("image").map(|s| s.trim().to_owned()).unwrap_or_default();
    edit(state, headers, path, form, Change::Image { service, image }).await
}

pub async fn change_targets(
    state: State<App>,
    headers: HeaderMap,
    path: Path<(String, String)>,
    Form(form): FormData,
) -> Response {
    let device = form.get("device").map(|s| s.trim().to_owned()).unwrap_or_default();
    let change = match form.get("op").map(String::as_str) {
        Some("remove") => Change::RemoveTarget(device),
        _ => Change::AddTarget(device),
    };
    edit(state, headers, path, form, change).await
}

/// A target edit on a deployment that selects its devices by label: there is no
/// list to edit, and writing one would make the spec name both (the API server
/// refuses that). Labels live on the Devices.
fn refuse_target_edit(dep: &Deployment) -> Result<(), String> {
    match &dep.spec.selector {
        Some(selector) => Err(format!(
            "this deployment selects devices by label ({}); change the Device's labels instead",
            crate::view::selector_text(selector)
        )),
        None => Ok(()),
    }
}

fn apply_change(dep: &mut Deployment, change: &Change) -> Result<String, String> {
    if matches!(change, Change::AddTarget(_) | Change::RemoveTarget(_)) {
        refuse_target_edit(dep)?;
    }
    match change {
        Change::Image { service, image } => {
            if image.is_empty() {
                return Err("the image must not be empty".into());
            }
            let IotScore::PodmanV0(score) = &mut dep.spec.score;
            let svc = score
                .services
                .iter_mut()
                .find(|s| &s.name == service)
                .ok_or_else(|| format!("there is no service {service:?} in this deployment"))?;
            if &svc.image == image {
                return Err(format!("service {service} already runs {image}"));
            }
            svc.image = image.clone();
            let problems = validate_score(&dep.spec.score.to_wire());
            if !problems.is_empty() {
                return Err(describe_problems(&problems));
            }
            Ok(format!("Service {service} now runs {image}; the devices roll it out."))
        }
        Change::AddTarget(device) => {
            Id::new(device.as_str()).map_err(|e| format!("{device:?} is not a device id: {e}"))?;
            if dep.spec.target_devices.iter().any(|d| d == device) {
                return Err(format!("{device} is already a target"));
            }
            dep.spec.target_devices.push(device.clone());
            Ok(format!("Added {device} as a target."))
        }
        Change::RemoveTarget(device) => {
            let before = dep.spec.target_devices.len();
            dep.spec.target_devices.retain(|d| d != device);
            if dep.spec.target_devices.len() == before {
                return Err(format!("{device} is not a target"));
            }
            Ok(format!(
                "Removed {device}; its containers for this deployment are removed."
            ))
        }
    }
}

/// Turns the API server's answer into words for the person. Its own message is
/// kept: it names the user, verb and resource, or the invalid field.
fn refusal(e: kube::Error) -> String {
    match e {
        kube::Error::Api(ae) if ae.code == 403 => format!("Refused by the cluster's RBAC: {}", ae.message),
        kube::Error::Api(ae) if ae.code == 401 => {
            "The API server did not accept your sign-in (401). Sign out and in again.".to_owned()
        }
        kube::Error::Api(ae) if ae.code == 409 => {
            "Someone changed this deployment after you loaded the page. Review it and try again.".to_owned()
        }
        kube::Error::Api(ae) if ae.code == 422 => format!("The API server rejected the change: {}", ae.message),
        kube::Error::Api(ae) => format!("API server error {}: {}", ae.code, ae.message),
        other => format!("Cannot reach the API server: {other}"),
    }
}

async fn edit(
    State(app): State<App>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
    form: HashMap<String, String>,
    change: Change,
) -> Response {
    let Some(auth) = app.auth.clone() else {
        return writes_off();
    };
    let back = format!("/deployments/{ns}/{name}");
    let (sid, shared) = match guard(&auth, &headers, &form, &back).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let mut session = shared.lock().await;
    let token = match token_or_sign_in(&auth, &sid, &mut session, &back).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let outcome = async {
        let client = auth.client_as(&token).map_err(refusal)?;
        let api: Api<Deployment> = Api::namespaced(client, &ns);
        // The spec generation the page showed: a spec change made since then is a
        // conflict. (Not the resourceVersion: the operator's status writes move it
        // every few seconds without changing what the person edits.)
        let seen: Option<i64> = form.get("gen").and_then(|g| g.parse().ok());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut dep = api.get(&name).await.map_err(refusal)?;
            if seen.is_some() && dep.metadata.generation != seen {
                return Err(
                    "Someone changed this deployment after you loaded the page. Review it and try again.".to_owned(),
                );
            }
            let done = apply_change(&mut dep, &change)?;
            // The replace carries the resourceVersion just read; a status write in
            // between makes it 409, and then the check above runs again.
            match api.replace(&name, &PostParams::default(), &dep).await {
                Ok(_) => return Ok(done),
                Err(kube::Error::Api(ae)) if ae.code == 409 && attempt < 5 => continue,
                Err(e) => return Err(refusal(e)),
            }
        }
    }
    .await;
    session.flash = Some(match outcome {
        Ok(text) => Flash { ok: true, text },
        Err(text) => Flash { ok: false, text },
    });
    Redirect::to(&back).into_response()
}

pub async fn delete(
    State(app): State<App>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
    Form(form): FormData,
) -> Response {
    let Some(auth) = app.auth.clone() else {
        return writes_off();
    };
    let back = format!("/deployments/{ns}/{name}");
    let (sid, shared) = match guard(&auth, &headers, &form, &back).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let mut session = shared.lock().await;
    if form.get("confirm").map(String::as_str) != Some("yes") {
        session.flash = Some(Flash {
            ok: false,
            text: "Nothing was deleted: tick the confirmation box first.".into(),
        });
        return Redirect::to(&back).into_response();
    }
    let token = match token_or_sign_in(&auth, &sid, &mut session, &back).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let outcome = match auth.client_as(&token) {
        Ok(client) => Api::<Deployment>::namespaced(client, &ns)
            .delete(&name, &DeleteParams::default())
            .await
            .map_err(refusal),
        Err(e) => Err(refusal(e)),
    };
    match outcome {
        Ok(_) => {
            session.flash = Some(Flash {
                ok: true,
                text: format!("Deleted {ns}/{name}; the operator removes it from its devices."),
            });
            Redirect::to("/deployments").into_response()
        }
        Err(text) => {
            session.flash = Some(Flash { ok: false, text });
            Redirect::to(&back).into_response()
        }
    }
}

pub async fn logout(State(app): State<App>, headers: HeaderMap, Form(form): FormData) -> Response {
    let Some(auth) = app.auth.clone() else {
        return writes_off();
    };
    let (sid, _) = match guard(&auth, &headers, &form, "/").await {
        Ok(s) => s,
        Err(r) => return r,
    };
    auth.end(&sid);
    let clear = auth.cookie(SESSION_COOKIE, "", "/", Some(std::time::Duration::ZERO));
    ([(header::SET_COOKIE, clear)], Redirect::to("/")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use iot_api::{DeploymentSpec, PodmanService, PodmanV0Score};

    fn dep() -> Deployment {
        let svc: PodmanService =
            serde_json::from_value(serde_json::json!({"name": "web", "image": "localhost/iot-web:v1"}))
                .unwrap_or_else(|_| unreachable!("a valid service"));
        Deployment::new(
            "web",
            DeploymentSpec::for_devices(["dev-1"], IotScore::PodmanV0(PodmanV0Score { services: vec![svc] })),
        )
    }

    #[test]
    fn origins_compare_whole() {
        assert_eq!(origin_of("http://127.0.0.1:8090"), "http://127.0.0.1:8090");
        assert_eq!(origin_of("https://fleet.example/dash"), "https://fleet.example");
        assert_ne!(origin_of("http://127.0.0.1:8090"), "http://127.0.0.1:80");
    }

    #[test]
    fn image_changes_touch_only_the_named_service() {
        let mut d = dep();
        let msg = apply_change(
            &mut d,
            &Change::Image {
                service: "web".into(),
                image: "localhost/iot-web:v2".into(),
            },
        );
        assert!(msg.is_ok(), "{msg:?}");
        let IotScore::PodmanV0(s) = &d.spec.score;
        assert_eq!(s.services[0].image, "localhost/iot-web:v2");
        for bad in [
            Change::Image {
                service: "db".into(),
                image: "x:1".into(),
            },
            Change::Image {
                service: "web".into(),
                image: String::new(),
            },
            Change::Image {
                service: "web".into(),
                image: "localhost/iot-web:v2".into(),
            },
        ] {
            assert!(apply_change(&mut d, &bad).is_err());
        }
    }

    #[test]
    fn targets_are_added_once_and_removed_only_if_present() {
        let mut d = dep();
        assert!(apply_change(&mut d, &Change::AddTarget("dev-2".into())).is_ok());
        assert!(apply_change(&mut d, &Change::AddTarget("dev-2".into())).is_err());
        assert!(apply_change(&mut d, &Change::AddTarget("Not A Device!".into())).is_err());
        assert!(apply_change(&mut d, &Change::RemoveTarget("dev-1".into())).is_ok());
        assert!(apply_change(&mut d, &Change::RemoveTarget("dev-1".into())).is_err());
        assert_eq!(d.spec.target_devices, vec!["dev-2"]);
    }

    #[test]
    fn target_edits_are_refused_for_a_selector_deployment_and_its_image_still_changes() {
        let IotScore::PodmanV0(score) = dep().spec.score;
        let selector: iot_api::DeviceSelector =
            serde_json::from_value(serde_json::json!({"matchLabels": {"site": "madrid"}}))
                .unwrap_or_else(|_| unreachable!("a valid selector"));
        let mut d = Deployment::new("web", DeploymentSpec::for_selector(selector, IotScore::PodmanV0(score)));
        let before = d.spec.clone();
        for change in [Change::AddTarget("dev-2".into()), Change::RemoveTarget("dev-2".into())] {
            assert_eq!(
                apply_change(&mut d, &change),
                Err(
                    "this deployment selects devices by label (site=madrid); change the Device's labels instead".into()
                )
            );
        }
        assert_eq!(d.spec, before, "nothing changed");
        assert!(d.spec.target_devices.is_empty());
        let changed = apply_change(
            &mut d,
            &Change::Image {
                service: "web".into(),
                image: "localhost/iot-web:v2".into(),
            },
        );
        assert!(changed.is_ok(), "{changed:?}");
    }
}
