//! The HTTP side: one handler per page, the SSE change feed, embedded assets and
//! probes. A request with `X-Fragment: main` gets only the page's `<main>` content
//! (what the live script swaps in); every other request gets the whole page.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use harmony_reconciler_contracts::Id;
use maud::Markup;

use crate::auth::{Auth, May};
use crate::fleet::Fleet;
use crate::fleet::Registry;
use crate::pages;
use crate::view::{self, DevicePhase, DeviceState, Mark};
use crate::writes;

#[derive(Clone)]
pub struct App {
    pub fleet: Arc<Fleet>,
    /// Rows per page: the server never sends a whole 10,000-device table.
    pub page_size: usize,
    /// Sign-in for changes; `None`: the dashboard is read-only.
    pub auth: Option<Arc<Auth>>,
}

impl App {
    /// The page frame for this request: who is signed in, and a message left by
    /// the last write (taken only by whole-page loads, not by live refreshes).
    async fn chrome(&self, headers: &HeaderMap, here: &str) -> pages::Chrome {
        let mut chrome = pages::Chrome {
            auth_enabled: self.auth.is_some(),
            here: here.to_owned(),
            ..Default::default()
        };
        let Some(auth) = &self.auth else {
            return chrome;
        };
        if let Some((_, shared)) = auth.session(headers).await {
            let mut s = shared.lock().await;
            chrome.user = Some(pages::SignedIn {
                name: s.display_name(),
                groups: s.groups().to_vec(),
                csrf: s.csrf.clone(),
            });
            if !is_fragment(headers) {
                chrome.flash = s.flash.take();
            }
        }
        chrome
    }

    /// What the signed-in person may do in `namespace` (None: nobody signed in).
    async fn may(&self, headers: &HeaderMap, namespace: &str) -> Option<May> {
        let auth = self.auth.as_ref()?;
        let (_, shared) = auth.session(headers).await?;
        let mut s = shared.lock().await;
        Some(auth.may(&mut s, namespace).await)
    }
}

fn is_fragment(headers: &HeaderMap) -> bool {
    headers
        .get("x-fragment")
        .is_some_and(|v| v == HeaderValue::from_static("main"))
}

pub fn router(app: App) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/deployments", get(deployments))
        .route("/deployments/{ns}/{name}", get(deployment))
        .route("/devices", get(devices))
        .route("/devices/{id}", get(device))
        .route("/events", get(events))
        .route("/login", get(writes::login))
        .route("/callback", get(writes::callback))
        .route("/logout", post(writes::logout))
        .route("/deployments/{ns}/{name}/image", post(writes::change_image))
        .route("/deployments/{ns}/{name}/targets", post(writes::change_targets))
        .route("/deployments/{ns}/{name}/delete", post(writes::delete))
        .route(
            "/assets/style.css",
            get(|| async { asset("text/css; charset=utf-8", pages::STYLE) }),
        )
        .route(
            "/assets/live.js",
            get(|| async { asset("text/javascript; charset=utf-8", pages::SCRIPT) }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(app)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

async fn readyz(State(app): State<App>) -> Response {
    if app.fleet.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "loading deployments and device reports",
        )
            .into_response()
    }
}

/// The whole page, or only its main part for the live script.
fn respond(
    headers: &HeaderMap,
    chrome: &pages::Chrome,
    status: StatusCode,
    title: &str,
    nav: &str,
    main: Markup,
) -> Response {
    let body = if is_fragment(headers) {
        main
    } else {
        pages::layout(title, nav, main, chrome)
    };
    (status, [(header::CACHE_CONTROL, "no-store")], body).into_response()
}

type Params = Query<HashMap<String, String>>;

fn page_of(q: &HashMap<String, String>) -> usize {
    q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1)
}

async fn overview(State(app): State<App>, headers: HeaderMap) -> Response {
    let chrome = app.chrome(&headers, "/").await;
    let o = app.fleet.with_snapshot(|s| view::overview(s, 15));
    respond(
        &headers,
        &chrome,
        StatusCode::OK,
        "Overview",
        "Overview",
        pages::overview(&o),
    )
}

async fn deployments(State(app): State<App>, headers: HeaderMap, Query(q): Params) -> Response {
    let chrome = app.chrome(&headers, "/deployments").await;
    let rows = app.fleet.with_snapshot(view::deployment_rows);
    let page = view::paginate(rows, page_of(&q), app.page_size);
    respond(
        &headers,
        &chrome,
        StatusCode::OK,
        "Deployments",
        "Deployments",
        pages::deployments(&page),
    )
}

async fn deployment(
    State(app): State<App>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Params,
) -> Response {
    let only = q.get("phase").and_then(|p| DevicePhase::parse(p));
    let here = format!("/deployments/{ns}/{name}");
    let chrome = app.chrome(&headers, &here).await;
    let may = app.may(&headers, &ns).await;
    let main = app.fleet.with_snapshot(|s| {
        let dep = s.deployments.iter().find(|d| {
            d.metadata.namespace.as_deref() == Some(ns.as_str()) && d.metadata.name.as_deref() == Some(name.as_str())
        })?;
        let row = view::deployment_row(dep);
        let (counts, rows) = view::phase_table(s, dep, only);
        let phases = view::paginate(rows, page_of(&q), app.page_size);
        Some(pages::deployment(&pages::DeploymentDetail {
            row: &row,
            counts: &counts,
            phases: &phases,
            only,
            spec: &dep.spec,
            status: dep.status.as_ref(),
            changes: pages::changes_for(&chrome, may, dep),
        }))
    });
    match main {
        Some(m) => respond(
            &headers,
            &chrome,
            StatusCode::OK,
            &format!("{ns}/{name}"),
            "Deployments",
            m,
        ),
        None => respond(
            &headers,
            &chrome,
            StatusCode::NOT_FOUND,
            "Not found",
            "Deployments",
            pages::not_found(&format!("Deployment {ns}/{name}")),
        ),
    }
}

async fn devices(State(app): State<App>, headers: HeaderMap, Query(q): Params) -> Response {
    let only = q.get("state").and_then(|s| DeviceState::parse(s));
    let mark = q.get("mark").and_then(|m| Mark::parse(m));
    let query = q.get("q").map(|s| s.trim().to_owned()).unwrap_or_default();
    let chrome = app.chrome(&headers, "/devices").await;
    let rows = app.fleet.with_snapshot(|s| view::device_rows(s, only, mark, &query));
    let page = view::paginate(rows, page_of(&q), app.page_size);
    let registry = app.fleet.registry_state();
    respond(
        &headers,
        &chrome,
        StatusCode::OK,
        "Devices",
        "Devices",
        pages::devices(
            &page,
            &pages::DeviceFilters {
                only,
                mark,
                query: &query,
            },
            &registry,
        ),
    )
}

async fn device(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let chrome = app.chrome(&headers, &format!("/devices/{id}")).await;
    let Ok(id) = Id::new(id.as_str()) else {
        return respond(
            &headers,
            &chrome,
            StatusCode::NOT_FOUND,
            "Not found",
            "Devices",
            pages::not_found("That device id"),
        );
    };
    let registry = app.fleet.registry_state();
    let main = app.fleet.with_snapshot(|s| {
        let record = s.devices.get(&id);
        let deployments = view::device_deployments(s, &id);
        let registered = s.registry.is_some_and(|r| r.contains_key(id.as_str()));
        if record.is_none() && deployments.is_empty() && !registered {
            return None;
        }
        Some(pages::device(&pages::DeviceDetail {
            id: id.as_str(),
            state: s.device_state(&id),
            record,
            deployments,
            registration: s.registration(&id),
            registry_known: registry == Registry::Known,
        }))
    });
    match main {
        Some(m) => respond(&headers, &chrome, StatusCode::OK, id.as_str(), "Devices", m),
        None => respond(
            &headers,
            &chrome,
            StatusCode::NOT_FOUND,
            "Not found",
            "Devices",
            pages::not_found(&format!("Device {id}")),
        ),
    }
}

/// Change notices, at most four a second however busy the fleet is: the page
/// fetches its current state itself, so a notice carries no data. The first
/// change after a quiet spell goes out at once; later ones wait out the spacing
/// and are folded into one.
async fn events(State(app): State<App>) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    const SPACING: Duration = Duration::from_millis(250);
    let rx = app.fleet.changes();
    let stream = futures::stream::unfold((rx, None::<tokio::time::Instant>), |(mut rx, last)| async move {
        rx.changed().await.ok()?;
        if let Some(last) = last {
            tokio::time::sleep_until(last + SPACING).await;
        }
        let n = *rx.borrow_and_update();
        let event = Event::default().event("change").data(n.to_string());
        Some((Ok(event), (rx, Some(tokio::time::Instant::now()))))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
