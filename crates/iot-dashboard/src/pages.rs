//! HTML for each page (maud). Every page is complete without JavaScript; the
//! embedded script only swaps `<main>` in when the server says something changed.
//! Status always carries a text label and a symbol beside its colour.

use maud::{DOCTYPE, Markup, html};

use crate::view::{DeploymentRow, DevicePhase, DeviceRow, DeviceState, Overview, Page, PhaseRow, age, severity_label};

pub const STYLE: &str = include_str!("../assets/style.css");
pub const SCRIPT: &str = include_str!("../assets/live.js");

/// Who is signed in, as the page header shows them.
#[derive(Debug, Clone, Default)]
pub struct SignedIn {
    pub name: String,
    pub groups: Vec<String>,
    pub csrf: String,
}

/// The frame around every page: sign-in state and a one-time message.
#[derive(Debug, Clone, Default)]
pub struct Chrome {
    pub auth_enabled: bool,
    pub user: Option<SignedIn>,
    pub flash: Option<crate::auth::Flash>,
    /// This page's path, to come back to after signing in.
    pub here: String,
}

/// The whole page around `main`.
pub fn layout(title: &str, nav: &str, main: Markup, chrome: &Chrome) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · harmony-iot fleet" }
                link rel="stylesheet" href="/assets/style.css";
                script src="/assets/live.js" defer {}
            }
            body {
                header {
                    a.brand href="/" { "harmony-iot" }
                    nav {
                        @for (href, label) in [("/", "Overview"), ("/deployments", "Deployments"), ("/devices", "Devices")] {
                            a href=(href) aria-current=[(label == nav).then_some("page")] { (label) }
                        }
                    }
                    span #live title="Live updates" { "static" }
                    @if let Some(u) = &chrome.user {
                        form.account method="post" action="/logout" {
                            span #user title={ "groups: " (u.groups.join(", ")) } { (u.name) }
                            input type="hidden" name="csrf" value=(u.csrf);
                            button type="submit" { "Sign out" }
                        }
                    } @else if chrome.auth_enabled {
                        a.account #signin href={ "/login?next=" (urlencoding::encode(&chrome.here)) } { "Sign in to make changes" }
                    }
                }
                @if let Some(f) = &chrome.flash {
                    @if f.ok {
                        p.flash.ok #flash role="status" { span aria-hidden="true" { "✓ " } (f.text) }
                    } @else {
                        p.flash.bad #flash role="alert" { span aria-hidden="true" { "✕ " } (f.text) }
                    }
                }
                main #main { (main) }
            }
        }
    }
}

/// A page that only says something (refusals, sign-in problems).
pub fn message(title: &str, text: &str, link: Option<(&str, &str)>) -> Markup {
    html! {
        h1 { (title) }
        p #message { (text) }
        @if let Some((href, label)) = link { p { a href=(href) { (label) } } }
    }
}

/// The change panel of a deployment page, for whoever is signed in.
#[derive(Debug, Clone)]
pub enum Changes {
    /// Sign-in is possible but nobody is signed in.
    SignInFirst { here: String },
    /// Signed in; the API server allows no changes here.
    ReadOnly { who: String, groups: Vec<String> },
    /// Signed in and allowed (update and/or delete).
    Allowed {
        csrf: String,
        /// The spec generation shown, for the conflict check.
        generation: i64,
        may: crate::auth::May,
        services: Vec<(String, String)>,
        targets: Vec<String>,
    },
}

pub fn changes_for(chrome: &Chrome, may: Option<crate::auth::May>, dep: &iot_api::Deployment) -> Option<Changes> {
    if !chrome.auth_enabled {
        return None;
    }
    let (Some(user), Some(may)) = (&chrome.user, may) else {
        return Some(Changes::SignInFirst {
            here: chrome.here.clone(),
        });
    };
    if !may.update && !may.delete {
        return Some(Changes::ReadOnly {
            who: user.name.clone(),
            groups: user.groups.clone(),
        });
    }
    let iot_api::score::IotScore::PodmanV0(score) = &dep.spec.score;
    Some(Changes::Allowed {
        csrf: user.csrf.clone(),
        generation: dep.metadata.generation.unwrap_or_default(),
        may,
        services: score
            .services
            .iter()
            .map(|s| (s.name.clone(), s.image.clone()))
            .collect(),
        targets: dep.spec.target_devices.clone(),
    })
}

fn changes_panel(base: &str, c: &Changes) -> Markup {
    html! {
        section.changes #changes aria-label="Change this deployment" {
            h2 { "Change" }
            @match c {
                Changes::SignInFirst { here } => p { a href={ "/login?next=" (urlencoding::encode(here)) } { "Sign in" } " to change this deployment." },
                Changes::ReadOnly { who, groups } => p.muted #readonly {
                    "Read-only for " (who) " (groups: " (if groups.is_empty() { "none".to_owned() } else { groups.join(", ") }) "): "
                    "the cluster's RBAC allows you no changes to Deployments here."
                },
                Changes::Allowed { csrf, generation, may, services, targets } => {
                    @if may.update {
                        @for (svc, image) in services {
                            form.change #{ "image-" (svc) } method="post" action={ (base) "/image" } {
                                input type="hidden" name="csrf" value=(csrf);
                                input type="hidden" name="gen" value=(generation);
                                input type="hidden" name="service" value=(svc);
                                label { "Image of " strong { (svc) } " " input.mono type="text" name="image" value=(image) required size="40"; }
                                button type="submit" { "Change image" }
                            }
                        }
                        form.change #add-target method="post" action={ (base) "/targets" } {
                            input type="hidden" name="csrf" value=(csrf);
                            input type="hidden" name="gen" value=(generation);
                            input type="hidden" name="op" value="add";
                            label { "Add target device " input.mono type="text" name="device" required; }
                            button type="submit" { "Add" }
                        }
                        @if targets.len() > 1 {
                            form.change #remove-target method="post" action={ (base) "/targets" } {
                                input type="hidden" name="csrf" value=(csrf);
                                input type="hidden" name="gen" value=(generation);
                                input type="hidden" name="op" value="remove";
                                label { "Remove target "
                                    select name="device" { @for t in targets { option value=(t) { (t) } } }
                                }
                                button type="submit" { "Remove" }
                            }
                        }
                    }
                    @if may.delete {
                        form.change.danger #delete method="post" action={ (base) "/delete" } {
                            input type="hidden" name="csrf" value=(csrf);
                            label { input type="checkbox" name="confirm" value="yes" required; " Yes, remove it from every device" }
                            button type="submit" { "Delete this deployment" }
                        }
                    }
                }
            }
        }
    }
}

fn badge(class: &str, symbol: &str, label: &str) -> Markup {
    html! { span class={ "badge " (class) } { span aria-hidden="true" { (symbol) } " " (label) } }
}

pub fn device_state_badge(s: DeviceState) -> Markup {
    match s {
        DeviceState::Online => badge("ok", "●", s.label()),
        DeviceState::Stale => badge("warn", "◌", s.label()),
        DeviceState::NeverSeen => badge("bad", "?", s.label()),
    }
}

pub fn phase_badge(p: DevicePhase) -> Markup {
    match p {
        DevicePhase::Running => badge("ok", "✓", p.label()),
        DevicePhase::Failed => badge("bad", "✕", p.label()),
        DevicePhase::Unreported => badge("warn", "◌", p.label()),
        DevicePhase::Pending | DevicePhase::Outdated => badge("info", "…", p.label()),
    }
}

pub fn deployment_state_badge(label: &str) -> Markup {
    match label {
        "ready" => badge("ok", "✓", label),
        "degraded" => badge("bad", "✕", label),
        _ => badge("info", "…", label),
    }
}

fn stat(label: &str, value: usize, class: &str, href: &str) -> Markup {
    html! {
        a class={ "stat " (class) } href=(href) data-stat=(label) {
            span.value { (value) }
            span.label { (label) }
        }
    }
}

pub fn overview(o: &Overview) -> Markup {
    html! {
        h1 { "Fleet" }
        section.stats aria-label="Devices" {
            (stat("online", o.online, "ok", "/devices?state=online"))
            (stat("stale", o.stale, if o.stale > 0 { "warn" } else { "" }, "/devices?state=stale"))
            (stat("never seen", o.never_seen, if o.never_seen > 0 { "bad" } else { "" }, "/devices?state=never"))
        }
        section.stats aria-label="Deployments" {
            @for state in ["ready", "progressing", "pending", "degraded"] {
                @let n = o.deployments_by_state.get(state).copied().unwrap_or_default();
                (stat(state, n, match (state, n) { ("degraded", 1..) => "bad", ("ready", _) => "ok", _ => "" }, "/deployments"))
            }
        }
        div.columns {
            section {
                h2 { "Top errors" }
                @if o.top_errors.is_empty() {
                    p.muted { "No device reports an error." }
                } @else {
                    table {
                        thead { tr { th { "Error" } th.num { "Devices" } th { "For example" } } }
                        tbody {
                            @for (message, n, examples) in &o.top_errors {
                                tr {
                                    td.error { (message) }
                                    td.num { (n) }
                                    td { @for d in examples { a href={ "/devices/" (d) } { (d) } " " } }
                                }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Recent changes" }
                (events(&o.recent.iter().map(|(d, e)| (Some(d.as_str()), e)).collect::<Vec<_>>()))
            }
        }
    }
}

fn events(list: &[(Option<&str>, &harmony_reconciler_contracts::EventEntry)]) -> Markup {
    let now = chrono::Utc::now();
    html! {
        @if list.is_empty() {
            p.muted { "Nothing yet." }
        } @else {
            ol.events {
                @for (device, e) in list {
                    li class={ "sev-" (severity_label(e.severity)) } {
                        span.when title=(e.at.to_rfc3339()) { (age(now - e.at)) " ago" }
                        " "
                        @if let Some(d) = device { a href={ "/devices/" (d) } { (d) } " " }
                        @if let Some(dep) = &e.deployment {
                            a href={ "/deployments/" (dep.namespace()) "/" (dep.name()) } { (dep) } " "
                        }
                        span.msg { (e.message) }
                    }
                }
            }
        }
    }
}

pub fn pager(base: &str, extra: &str, page: usize, pages: usize, total: usize) -> Markup {
    html! {
        nav.pager aria-label="Pages" {
            span { (total) " in all · page " (page) " of " (pages) }
            @if page > 1 { a href={ (base) "?page=" (page - 1) (extra) } rel="prev" { "← previous" } }
            @if page < pages { a href={ (base) "?page=" (page + 1) (extra) } rel="next" { "next →" } }
        }
    }
}

pub fn deployments(page: &Page<DeploymentRow>) -> Markup {
    let now = chrono::Utc::now();
    html! {
        h1 { "Deployments" }
        table #deployments {
            thead { tr {
                th { "Deployment" } th { "State" } th.num { "Targets" } th.num { "Succeeded" }
                th.num { "Failed" } th.num { "Pending" } th.num { "Unreported" } th { "Conditions" } th { "Age" }
            } }
            tbody {
                @for r in &page.rows {
                    tr data-deployment={ (r.namespace) "/" (r.name) } {
                        td { a href={ "/deployments/" (r.namespace) "/" (r.name) } { (r.namespace) "/" (r.name) } }
                        td { (deployment_state_badge(r.state.label())) }
                        td.num data-col="targets" { (r.targets) }
                        td.num data-col="succeeded" { (r.succeeded) }
                        td.num.bad-if[r.failed > 0] data-col="failed" { (r.failed) }
                        td.num data-col="pending" { (r.pending) }
                        td.num.warn-if[r.unreported > 0] data-col="unreported" { (r.unreported) }
                        td.conds { @for (t, s, reason) in &r.conditions {
                            span.cond class={ "c-" (s.to_lowercase()) } title=(reason) { (t) "=" (s) } " "
                        } }
                        td { @if let Some(c) = r.created { (age(now - c)) } }
                    }
                }
            }
        }
        (pager("/deployments", "", page.page, page.pages, page.total))
    }
}

pub struct DeploymentDetail<'a> {
    pub row: &'a DeploymentRow,
    pub counts: &'a std::collections::BTreeMap<DevicePhase, usize>,
    pub phases: &'a Page<PhaseRow>,
    pub only: Option<DevicePhase>,
    pub spec: &'a iot_api::DeploymentSpec,
    pub status: Option<&'a iot_api::DeploymentStatus>,
    pub changes: Option<Changes>,
}

pub fn deployment(d: &DeploymentDetail<'_>) -> Markup {
    let r = d.row;
    let base = format!("/deployments/{}/{}", r.namespace, r.name);
    let agg = d.status.and_then(|s| s.aggregate.as_ref());
    let rolling_out = d.counts.get(&DevicePhase::Outdated).copied().unwrap_or_default()
        + d.counts.get(&DevicePhase::Pending).copied().unwrap_or_default()
        > 0;
    let now = chrono::Utc::now();
    html! {
        h1 { (r.namespace) "/" (r.name) " " (deployment_state_badge(r.state.label())) }
        @if rolling_out {
            @let done = d.counts.get(&DevicePhase::Running).copied().unwrap_or_default();
            section.rollout aria-label="Rollout" {
                "Rolling out: " strong { (done) " of " (r.targets) } " devices run the current spec."
                progress max=(r.targets) value=(done) {}
            }
        }
        section.stats aria-label="Phases" {
            @for p in [DevicePhase::Running, DevicePhase::Failed, DevicePhase::Pending, DevicePhase::Outdated, DevicePhase::Unreported] {
                @let n = d.counts.get(&p).copied().unwrap_or_default();
                a class={ "stat " (match (p, n) { (DevicePhase::Failed, 1..) => "bad", (DevicePhase::Unreported, 1..) => "warn", (DevicePhase::Running, _) => "ok", _ => "" }) }
                    href={ (base) "?phase=" (p.label()) } data-stat=(p.label()) aria-current=[(d.only == Some(p)).then_some("true")] {
                    span.value { (n) } span.label { (p.label()) }
                }
            }
        }
        div.columns {
            section {
                h2 { "Devices" @if let Some(p) = d.only { " · " (p.label()) " only · " a href=(base) { "show all" } } }
                table #phases {
                    thead { tr { th { "Device" } th { "Phase" } th { "Last error" } } }
                    tbody {
                        @for row in &d.phases.rows {
                            tr data-device=(row.device) {
                                td { a href={ "/devices/" (row.device) } { (row.device) } }
                                td data-col="phase" { (phase_badge(row.phase)) }
                                td.error { @if let Some(e) = &row.error { (e) } }
                            }
                        }
                    }
                }
                (pager(&base, &d.only.map(|p| format!("&phase={}", p.label())).unwrap_or_default(), d.phases.page, d.phases.pages, d.phases.total))
            }
            section {
                h2 { "Spec" }
                @let iot_api::score::IotScore::PodmanV0(score) = &d.spec.score;
                table {
                    thead { tr { th { "Service" } th { "Image" } th { "Ports" } } }
                    tbody { @for s in &score.services {
                        tr { td { (s.name) } td.mono { (s.image) } td.mono {
                            @for p in &s.ports { (p.host_port) "→" (p.container_port) " " }
                        } }
                    } }
                }
                @if let Some(c) = &d.changes { (changes_panel(&base, c)) }
                h2 { "Top errors" }
                @match agg.map(|a| a.top_errors.as_slice()).unwrap_or_default() {
                    [] => p.muted { "None." },
                    groups => ul { @for g in groups {
                        li { span.error { (g.message) } " · " (g.devices) " devices, e.g. "
                            @for dev in &g.example_devices { a href={ "/devices/" (dev) } { (dev) } " " } }
                    } },
                }
                h2 { "Recent events" }
                @match agg.map(|a| a.recent_events.as_slice()).unwrap_or_default() {
                    [] => p.muted { "None yet." },
                    list => ol.events { @for e in list {
                        li class={ "sev-" (severity_label(e.severity)) } {
                            span.when { (age(now - e.at)) " ago" } " "
                            a href={ "/devices/" (e.device) } { (e.device) } " " span.msg { (e.message) }
                        }
                    } },
                }
            }
        }
    }
}

pub fn devices(page: &Page<DeviceRow>, only: Option<DeviceState>, query: &str) -> Markup {
    let extra = format!(
        "{}{}",
        only.map(|s| format!("&state={}", filter_name(s))).unwrap_or_default(),
        if query.is_empty() {
            String::new()
        } else {
            format!("&q={}", urlencoding::encode(query))
        }
    );
    html! {
        h1 { "Devices" }
        form.filters method="get" action="/devices" {
            label { "Device id contains " input type="search" name="q" value=(query); }
            label { "State "
                select name="state" {
                    option value="" selected[only.is_none()] { "any" }
                    @for s in [DeviceState::Online, DeviceState::Stale, DeviceState::NeverSeen] {
                        option value=(filter_name(s)) selected[only == Some(s)] { (s.label()) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        table #devices {
            thead { tr {
                th { "Device" } th { "State" } th { "Last report" } th { "Agent" } th { "Arch" } th { "OS" }
                th.num { "Deployments" } th.num { "Failing" }
            } }
            tbody {
                @for r in &page.rows {
                    tr data-device=(r.id) {
                        td { a href={ "/devices/" (r.id) } { (r.id) } }
                        td data-col="state" { (device_state_badge(r.state)) }
                        td { @if let Some(a) = r.heartbeat_age { (age(a)) " ago" } @else { "never" } }
                        td.mono { (r.agent_version) }
                        td { (r.arch) }
                        td { (r.os) }
                        td.num { (r.deployments) }
                        td.num.bad-if[r.failed > 0] { (r.failed) }
                    }
                }
            }
        }
        (pager("/devices", &extra, page.page, page.pages, page.total))
    }
}

fn filter_name(s: DeviceState) -> &'static str {
    match s {
        DeviceState::Online => "online",
        DeviceState::Stale => "stale",
        DeviceState::NeverSeen => "never",
    }
}

pub struct DeviceDetail<'a> {
    pub id: &'a str,
    pub state: DeviceState,
    pub record: Option<&'a crate::view::DeviceRecord>,
    /// (deployment, phase, error) for every deployment that targets the device.
    pub phases: Vec<(String, DevicePhase, Option<String>)>,
}

pub fn device(d: &DeviceDetail<'_>) -> Markup {
    let now = chrono::Utc::now();
    html! {
        h1 { (d.id) " " (device_state_badge(d.state)) }
        @if let Some(r) = d.record {
            p.muted { "Last report reached NATS " (age(now - r.received_at)) " ago · agent " (r.status.agent_version) }
        } @else {
            p.muted { "This device has never reported." }
        }
        div.columns {
            section {
                h2 { "Deployments" }
                table #device-deployments {
                    thead { tr { th { "Deployment" } th { "Phase" } th { "Last error" } } }
                    tbody { @for (dep, phase, err) in &d.phases {
                        tr data-deployment=(dep) {
                            td { a href={ "/deployments/" (dep) } { (dep) } }
                            td data-col="phase" { (phase_badge(*phase)) }
                            td.error { @if let Some(e) = err { (e) } }
                        }
                    } }
                }
                h2 { "Events" }
                @let list: Vec<_> = d.record.map(|r| r.status.recent_events.iter().rev().map(|e| (None, e)).collect()).unwrap_or_default();
                (events(&list))
            }
            section {
                h2 { "Inventory" }
                @if let Some(inv) = d.record.and_then(|r| r.status.inventory.as_ref()) {
                    dl.inventory {
                        dt { "Host name" } dd { (inv.hostname) }
                        dt { "Architecture" } dd { (inv.arch) }
                        dt { "OS" } dd { (inv.os) }
                        dt { "Kernel" } dd { (inv.kernel) }
                        dt { "CPU cores" } dd { (inv.cpu_cores) }
                        dt { "Memory" } dd { (inv.memory_bytes / (1024 * 1024)) " MiB" }
                        dt { "Disk free" } dd { (inv.disk_free_bytes / (1024 * 1024 * 1024)) " of " (inv.disk_total_bytes / (1024 * 1024 * 1024)) " GiB" }
                    }
                } @else {
                    p.muted { "No inventory reported." }
                }
            }
        }
    }
}

pub fn not_found(what: &str) -> Markup {
    html! { h1 { "Not found" } p { (what) " does not exist (or not any more)." } p { a href="/" { "Back to the overview" } } }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The next-page link of a device search, read back as a browser reads it.
    fn next_link_query(query: &str) -> Vec<(String, String)> {
        let page = Page::<DeviceRow> {
            rows: Vec::new(),
            total: 120,
            page: 1,
            pages: 3,
        };
        let html = devices(&page, Some(DeviceState::Stale), query).into_string();
        let start = html
            .find("rel=\"next\"")
            .and_then(|i| html[..i].rfind("href=\""))
            .map(|i| i + 6);
        let Some(start) = start else { return Vec::new() };
        let end = html[start..].find('"').map_or(html.len(), |e| start + e);
        // maud escapes attributes as HTML; the browser unescapes them first.
        let href = html[start..end].replace("&amp;", "&");
        url::Url::parse("http://dash.example")
            .and_then(|b| b.join(&href))
            .map(|u| u.query_pairs().into_owned().collect())
            .unwrap_or_default()
    }

    #[test]
    fn pager_links_keep_a_query_with_reserved_characters() {
        for q in ["shop&site=x", "pi#7", "a b+c", "100%", "plain"] {
            let pairs = next_link_query(q);
            assert!(pairs.contains(&("page".into(), "2".into())), "{q}: {pairs:?}");
            assert!(pairs.contains(&("state".into(), "stale".into())), "{q}: {pairs:?}");
            assert!(pairs.contains(&("q".into(), q.into())), "{q}: {pairs:?}");
            assert_eq!(pairs.iter().filter(|(k, _)| k == "q").count(), 1, "{q}: {pairs:?}");
        }
    }
}
