//! HTML for each page (maud). Every page is complete without JavaScript; the
//! embedded script only swaps `<main>` in when the server says something changed.
//! Status always carries a text label and a symbol beside its colour.

use maud::{DOCTYPE, Markup, html};

use crate::fleet::Registry;
use crate::rollout::{
    BatchState, RolloutView, batch_views, commands, limit_text, phase_badge_parts, rollout_view, segments,
};
use crate::view::{
    DeploymentRow, DeviceDeployment, DevicePhase, DeviceRow, DeviceState, Mark, Overview, Page, PhaseRow, PullView,
    Registration, age, severity_label,
};

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
        /// The selector, for a deployment that selects its devices by label: it
        /// has no list to edit.
        selector: Option<String>,
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
        selector: dep.spec.selector.as_ref().map(crate::view::selector_text),
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
                Changes::Allowed { csrf, generation, may, services, targets, selector } => {
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
                        @if let Some(sel) = selector {
                            p.muted #selector-note {
                                "This deployment selects devices by label (" span.mono { (sel) } "): "
                                "to add or remove a device, change the Device's labels."
                            }
                        } @else {
                        form.change #add-target method="post" action={ (base) "/targets" } {
                            input type="hidden" name="csrf" value=(csrf);
                            input type="hidden" name="gen" value=(generation);
                            input type="hidden" name="op" value="add";
                            label { "Add target device " input.mono type="text" name="device" required; }
                            button type="submit" { "Add" }
                        }
                        }
                        @if selector.is_none() && targets.len() > 1 {
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

/// Revoked, unregistered, paused: each a badge with a symbol and a word.
pub fn mark_badges(r: &Registration) -> Markup {
    html! {
        @if r.revoked.is_some() { (badge("bad", "⊘", Mark::Revoked.label())) " " }
        @if r.unregistered { (badge("warn", "!", Mark::Unregistered.label())) " " }
        @if r.paused { (badge("info", "⏸", Mark::Paused.label())) " " }
    }
}

fn label_chips(labels: &std::collections::BTreeMap<String, String>) -> Markup {
    html! { @for (k, v) in labels { span.chip.mono { (k) "=" (v) } " " } }
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
            @if let Some(n) = o.revoked {
                (stat("revoked", n, if n > 0 { "bad" } else { "" }, "/devices?mark=revoked"))
            }
            @if let Some(n) = o.unregistered {
                (stat("unregistered", n, if n > 0 { "warn" } else { "" }, "/devices?mark=unregistered"))
            }
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
                th { "Deployment" } th { "State" } th.num { "Targets" } th { "Devices" } th.num { "Succeeded" }
                th.num { "Failed" } th.num { "Pending" } th.num { "Unreported" } th { "Revision" } th { "Last good" }
                th { "Rollout" } th { "Conditions" } th { "Age" }
            } }
            tbody {
                @for r in &page.rows {
                    tr data-deployment={ (r.namespace) "/" (r.name) } {
                        td { a href={ "/deployments/" (r.namespace) "/" (r.name) } { (r.namespace) "/" (r.name) } }
                        td { (deployment_state_badge(r.state.label())) }
                        td.num data-col="targets" { (r.targets) }
                        td data-col="selector" { (targeting(r)) }
                        td.num data-col="succeeded" { (r.succeeded) }
                        td.num.bad-if[r.failed > 0] data-col="failed" { (r.failed) }
                        td.num data-col="pending" { (r.pending) }
                        td.num.warn-if[r.unreported > 0] data-col="unreported" { (r.unreported) }
                        td.nowrap data-col="revision" { (revision_text(r)) }
                        td.nowrap data-col="last-good" { @if let Some(n) = r.last_good_revision { "rev " (n) } }
                        td data-col="rollout" { @if let Some((phase, summary)) = &r.rollout {
                            @let (class, symbol, words) = phase_badge_parts(*phase);
                            (badge(class, symbol, words)) br; span.muted.nowrap { (summary) }
                        } }
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

/// How a deployment picks its devices: its selector, or "listed".
fn targeting(r: &DeploymentRow) -> Markup {
    html! {
        @match &r.selector {
            Some(sel) => { span.muted { "label " } span.mono { (sel) } },
            None => span.muted { "listed" },
        }
    }
}

/// "3/5 on rev 7", or the current revision alone before devices report.
fn revision_text(r: &DeploymentRow) -> String {
    match (&r.revision_summary, r.revision) {
        (Some(s), _) => s.clone(),
        (None, Some(n)) => format!("rev {n}"),
        (None, None) => String::new(),
    }
}

/// The rollout part of a deployment's page: the progressive rollout that
/// `.status.rollout` records (batches, failures, the command that acts on it), or
/// how a new revision reaches the devices when there is none. Read-only: people
/// act with `iotctl`, under their own RBAC.
pub fn rollout_panel(
    r: &DeploymentRow,
    spec: &iot_api::DeploymentSpec,
    status: Option<&iot_api::DeploymentStatus>,
    counts: &std::collections::BTreeMap<DevicePhase, usize>,
    now: chrono::DateTime<chrono::Utc>,
) -> Markup {
    let count = |p| counts.get(&p).copied().unwrap_or_default();
    let rolling_out = count(DevicePhase::Outdated) + count(DevicePhase::Pending) > 0;
    let done = count(DevicePhase::Running);
    let at_once = html! {
        "Rolling out: " strong { (done) " of " (r.targets) } " devices run the current spec."
        progress max=(r.targets.max(1)) value=(done) aria-label="Devices that run the current spec" {}
    };
    match rollout_view(spec.rollout.as_ref(), status.and_then(|s| s.rollout.as_ref())) {
        RolloutView::AllAtOnce => html! {
            @if rolling_out {
                section.rollout #rollout aria-label="Rollout" {
                    (at_once)
                    p.muted #rollout-none { "No progressive rollout (spec.rollout): every matched device gets a new revision at once." }
                }
            } @else {
                p.muted #rollout-none { "No progressive rollout (spec.rollout): every matched device gets a new revision at once." }
            }
        },
        RolloutView::Configured(rs) => html! {
            section.rollout #rollout aria-label="Rollout" {
                p #rollout-plan {
                    "Progressive rollout: a new revision goes out in batches, "
                    @for b in &rs.batches {
                        "up to " (limit_text(&b.limit))
                        @if b.pause.is_some() { " (then waits for promotion)" }
                        @if let Some(t) = &b.bake_time { " (then bakes " (t) ")" }
                        ", "
                    }
                    "then the rest. No rollout is recorded yet."
                }
                @if rolling_out { (at_once) }
            }
        },
        RolloutView::Recorded { spec: rs, status: st } => {
            let (class, symbol, words) = phase_badge_parts(st.phase);
            let total = st.batches.len();
            html! {
                section.rollout.progressive #rollout aria-labelledby="rollout-title" data-phase=(words) {
                    h2 #rollout-title { "Rollout " (badge(class, symbol, words)) }
                    p #rollout-head {
                        span #rollout-revision {
                            "Revision " strong { (st.revision) }
                            @match st.stable_revision {
                                Some(s) => { " from stable revision " strong { (s) } },
                                None => { " (no earlier good revision)" },
                            }
                        }
                        " · " span #rollout-summary { (st.summary) }
                        " · " (st.matched_at_start) " devices matched at the start"
                        @if let Some(n) = rs.and_then(|rs| rs.max_concurrent_pulls) {
                            " · " span #rollout-pulls { "at most " (n) " devices pull at once" }
                        }
                        " · started " span title=(st.started_at.to_rfc3339()) { (age(now - st.started_at)) " ago" }
                        @if let Some(f) = st.finished_at {
                            " · finished " span title=(f.to_rfc3339()) { (age(now - f)) " ago" }
                        }
                    }
                    @if !st.message.is_empty() { p #rollout-message { (st.message) } }
                    @if rs.is_none() {
                        p.muted #rollout-none { "spec.rollout is gone: the next revision goes to every matched device at once. This is the last rollout recorded." }
                    }
                    ol.batches #rollout-batches aria-label="Batches" {
                        @for v in batch_views(rs, st, now) {
                            @let segs = segments(v.status);
                            @let text = counts_text(v.status, &segs);
                            @let sum: u32 = segs.iter().map(|s| s.1).sum::<u32>().max(v.status.selected).max(1);
                            li.batch.current[v.current] data-batch=(v.number) aria-current=[v.current.then_some("step")] {
                                div.batch-head {
                                    strong { "Batch " (v.number) " of " (total) }
                                    @if v.current { " " span.chip { "current" } }
                                    " · " span.batch-state data-col="state" { (batch_state(v.state, now)) }
                                    @if let Some(t) = v.success_threshold { span.muted { " · passes at " (t) " % succeeded" } }
                                    @if v.pause { span.muted { " · then waits for promotion" } }
                                    @if let Some(b) = &v.bake_time { span.muted { " · then bakes " (b) } }
                                }
                                div.bar role="progressbar" aria-label={ "Batch " (v.number) " succeeded" }
                                    aria-valuemin="0" aria-valuemax=(v.status.selected.max(1)) aria-valuenow=(v.status.succeeded)
                                    aria-valuetext=(text) {
                                    @for (c, n, w) in &segs {
                                        span class={ "seg " (c) } style={ "width:" (format!("{:.3}", f64::from(*n) * 100.0 / f64::from(sum))) "%" }
                                            title={ (n) " " (w) } {}
                                    }
                                }
                                p.counts data-col="counts" { (text) }
                            }
                        }
                    }
                    @if !st.failure_clusters.is_empty() {
                        h3 { "Failures, grouped" }
                        table #failure-clusters {
                            thead { tr { th { "Failure" } th.num { "Devices" } th { "Labels they share" } th { "For example" } } }
                            tbody { @for fc in &st.failure_clusters {
                                tr.cluster {
                                    td.error data-col="message" { (fc.message) }
                                    td.num data-col="devices" { (fc.devices) }
                                    td data-col="labels" {
                                        @if fc.shared_labels.is_empty() { span.muted { "none" } } @else { (label_chips(&fc.shared_labels)) }
                                    }
                                    td data-col="examples" { @for dev in &fc.example_devices {
                                        @if harmony_reconciler_contracts::Id::new(dev.as_str()).is_ok() {
                                            a.mono href={ "/devices/" (urlencoding::encode(dev)) } { (dev) }
                                        } @else {
                                            span.mono { (dev) }
                                        }
                                        " "
                                    } }
                                }
                            } }
                        }
                    }
                    div #rollout-commands {
                        p.muted { "To act on it (with your own access):" }
                        ul { @for c in commands(&r.namespace, &r.name, rs, st) {
                            li { code.copy { (c.line) } " " span.muted { "— " (c.does) } }
                        } }
                    }
                }
            }
        }
    }
}

/// A pull in progress under a deployment's phase: a bar when the size is known,
/// and the words either way.
fn pull_line(p: &PullView) -> Markup {
    html! {
        div.pull.failed[p.failed] data-col="pull" {
            @if let Some((done, total)) = p.bytes {
                progress max=(total) value=(done) aria-label="Image pull" {} " "
            }
            span { (p.text) }
        }
    }
}

/// What a batch waits for or did, in words.
fn batch_state(s: BatchState, now: chrono::DateTime<chrono::Utc>) -> Markup {
    let when = |t: chrono::DateTime<chrono::Utc>| html! { span title=(t.to_rfc3339()) { (age(now - t)) " ago" } };
    html! {
        @match s {
            BatchState::NotStarted => span.muted { "not started" },
            BatchState::InProgress => "in progress",
            BatchState::Baking { passed, until } => { "passed " (when(passed)) ", baking: " (age(until - now)) " left" },
            BatchState::WaitingForPromotion { passed } => { "passed " (when(passed)) ", " strong { "waiting for promotion" } },
            BatchState::Passed { at } => { span aria-hidden="true" { "✓ " } "passed " (when(at)) },
            BatchState::DidNotPass => strong.error { span aria-hidden="true" { "✕ " } "did not pass" },
        }
    }
}

/// The text equivalent of a batch's bar: `3 of 5 succeeded · 1 failed · 1 in flight`.
fn counts_text(b: &iot_api::BatchStatus, segs: &[crate::rollout::Segment]) -> String {
    let mut parts = vec![format!("{} of {} succeeded", b.succeeded, b.selected)];
    parts.extend(
        segs.iter()
            .filter(|(_, _, w)| *w != "succeeded")
            .map(|(_, n, w)| format!("{n} {w}")),
    );
    parts.join(" · ")
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
    let now = chrono::Utc::now();
    html! {
        h1 { (r.namespace) "/" (r.name) " " (deployment_state_badge(r.state.label())) }
        p #targeting {
            @match &r.selector {
                Some(sel) => {
                    "Selects devices by label: " span.mono { (sel) }
                    " · " strong { (r.matched.unwrap_or_default()) } " matched now"
                    " · runs on " strong { (r.targets) }
                },
                None => { "Listed devices: " strong { (r.targets) } },
            }
            @if r.revision.is_some() || r.revision_summary.is_some() {
                span #revision {
                    " · revision " @if let Some(n) = r.revision { (n) }
                    @if let Some(sum) = &r.revision_summary { " (" (sum) ")" }
                }
            }
            @if let Some(n) = r.last_good_revision { span #last-good { " · last good revision " (n) } }
        }
        @if let Some(held) = d.status.and_then(|s| s.conditions.iter().find(|c| c.type_ == iot_api::conditions::REMOVALS_HELD && c.status == "True")) {
            p.note.warn #removals-held role="status" { span aria-hidden="true" { "◌ " } "Removals held: " (held.message) }
        }
        (rollout_panel(r, d.spec, d.status, d.counts, now))
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
                                td data-col="phase" { (phase_badge(row.phase)) @if let Some(p) = &row.pull { (pull_line(p)) } }
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
                @if let Some(images) = d.status.map(|s| s.images.as_slice()).filter(|i| !i.is_empty()) {
                    h3 { "Pinned images" }
                    p.muted { "The digest devices pull for each image of the current revision." }
                    table #pinned-images {
                        thead { tr { th { "Image" } th { "Digest" } } }
                        tbody { @for p in images {
                            tr { td.mono data-col="image" { (p.image) } td.mono data-col="digest" { (p.digest) } }
                        } }
                    }
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

/// What the device list is filtered by.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceFilters<'a> {
    pub only: Option<DeviceState>,
    pub mark: Option<Mark>,
    pub query: &'a str,
}

pub fn devices(page: &Page<DeviceRow>, f: &DeviceFilters<'_>, registry: &Registry) -> Markup {
    let (only, query) = (f.only, f.query);
    let extra = format!(
        "{}{}{}",
        only.map(|s| format!("&state={}", filter_name(s))).unwrap_or_default(),
        f.mark.map(|m| format!("&mark={}", m.label())).unwrap_or_default(),
        if query.is_empty() {
            String::new()
        } else {
            format!("&q={}", urlencoding::encode(query))
        }
    );
    html! {
        h1 { "Devices" }
        @match registry {
            Registry::Known => {},
            Registry::Loading => p.muted #registry-note { "Loading the Device objects: labels and marks follow." },
            Registry::Unavailable(why) => p.note.warn #registry-note role="status" {
                span aria-hidden="true" { "◌ " }
                "Device objects are not shown: " (why) ". Labels, paused, revoked and unregistered marks need them; "
                "online and stale come from the devices' reports as always."
            },
        }
        form.filters method="get" action="/devices" {
            label { "Id or label contains " input type="search" name="q" value=(query) placeholder="site=madrid"; }
            label { "State "
                select name="state" {
                    option value="" selected[only.is_none()] { "any" }
                    @for s in [DeviceState::Online, DeviceState::Stale, DeviceState::NeverSeen] {
                        option value=(filter_name(s)) selected[only == Some(s)] { (s.label()) }
                    }
                }
            }
            label { "Mark "
                select name="mark" {
                    option value="" selected[f.mark.is_none()] { "any" }
                    @for m in Mark::ALL {
                        option value=(m.label()) selected[f.mark == Some(m)] { (m.label()) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        table #devices {
            thead { tr {
                th { "Device" } th { "State" } th { "Marks" } th { "Labels" } th { "Last report" } th { "Agent" }
                th { "Arch" } th { "OS" } th.num { "Deployments" } th.num { "Failing" }
            } }
            tbody {
                @for r in &page.rows {
                    tr data-device=(r.id) {
                        td { a href={ "/devices/" (r.id) } { (r.id) } }
                        td data-col="state" { (device_state_badge(r.state)) }
                        td data-col="marks" { (mark_badges(&r.registration)) }
                        td data-col="labels" { (label_chips(&r.registration.labels)) }
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
    /// Every deployment that lists the device or selects it.
    pub deployments: Vec<DeviceDeployment>,
    pub registration: Registration,
    /// Whether the Device objects could be read (otherwise labels are unknown).
    pub registry_known: bool,
}

pub fn device(d: &DeviceDetail<'_>) -> Markup {
    let now = chrono::Utc::now();
    let reg = &d.registration;
    html! {
        h1 { (d.id) " " (device_state_badge(d.state)) " " (mark_badges(reg)) }
        @if let Some(r) = d.record {
            p.muted { "Last report reached NATS " (age(now - r.received_at)) " ago · agent " (r.status.agent_version) }
        } @else {
            p.muted { "This device has never reported." }
        }
        @if let Some(at) = &reg.revoked {
            p.note.bad #revoked-note role="status" {
                span aria-hidden="true" { "⊘ " } strong { "Revoked" } " (" (at) "): its identity was revoked; "
                "no selector picks it any more."
            }
        }
        @if reg.unregistered {
            p.note.warn #unregistered-note role="status" {
                span aria-hidden="true" { "! " } strong { "Unregistered" } ": this device reports, but has no Device object, "
                "so it has no labels and no selector matches it. "
                @if harmony_reconciler_contracts::id::enrollable_device_id_problem(d.id).is_none() {
                    span.mono { "iotctl device enroll " (d.id) " --label KEY=VALUE" } " registers it."
                } @else {
                    "Its id cannot name a Device (not a lowercase DNS-1123 label): re-enroll it under a lowercase id to use selectors."
                }
            }
        }
        @if reg.paused {
            p.note.info #paused-note { span aria-hidden="true" { "⏸ " } strong { "Paused" } ": no rollout reaches it, and it keeps what it runs, until it is resumed." }
        }
        @if d.registry_known {
            p #labels { "Labels: " @if reg.labels.is_empty() { span.muted { "none" } } @else { (label_chips(&reg.labels)) } }
        }
        div.columns {
            section {
                h2 { "Deployments" }
                table #device-deployments {
                    thead { tr { th { "Deployment" } th { "Phase" } th { "Why here" } th { "Last error" } } }
                    tbody { @for dd in &d.deployments {
                        tr data-deployment=(dd.deployment) {
                            td { a href={ "/deployments/" (dd.deployment) } { (dd.deployment) } }
                            td data-col="phase" { (phase_badge(dd.phase)) @if let Some(p) = &dd.pull { (pull_line(p)) } }
                            td data-col="by" { @match &dd.selector {
                                Some(sel) => { span.muted { "label " } span.mono { (sel) } },
                                None => span.muted { "listed" },
                            } }
                            td.error { @if let Some(e) = &dd.error { (e) } }
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
        let filters = DeviceFilters {
            only: Some(DeviceState::Stale),
            mark: Some(Mark::Revoked),
            query,
        };
        let html = devices(&page, &filters, &Registry::Known).into_string();
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
            assert!(pairs.contains(&("mark".into(), "revoked".into())), "{q}: {pairs:?}");
            assert!(pairs.contains(&("q".into(), q.into())), "{q}: {pairs:?}");
            assert_eq!(pairs.iter().filter(|(k, _)| k == "q").count(), 1, "{q}: {pairs:?}");
        }
    }

    fn deployment(spec: serde_json::Value) -> iot_api::Deployment {
        let spec = serde_json::json!({
            "apiVersion": "iot.nationtech.io/v1alpha1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default", "generation": 3},
            "spec": spec,
        });
        serde_json::from_value(spec).unwrap_or_else(|e| panic!("{e}"))
    }

    fn panel_for(dep: &iot_api::Deployment) -> String {
        let chrome = Chrome {
            auth_enabled: true,
            user: Some(SignedIn {
                name: "dave".into(),
                groups: vec![],
                csrf: "t".into(),
            }),
            ..Chrome::default()
        };
        let may = crate::auth::May {
            update: true,
            delete: true,
        };
        let changes = changes_for(&chrome, Some(may), dep).unwrap_or_else(|| panic!("a panel"));
        changes_panel("/deployments/default/web", &changes).into_string()
    }

    #[test]
    fn a_selector_deployment_offers_no_target_edits_and_says_why() {
        let score = serde_json::json!({"PodmanV0": {"services": [{"name": "web", "image": "localhost/iot-web:v1"}]}});
        let selected = panel_for(&deployment(serde_json::json!({
            "selector": {"matchLabels": {"site": "madrid"}, "matchExpressions": [{"key": "ring", "operator": "In", "values": ["canary"]}]},
            "score": score,
        })));
        assert!(
            !selected.contains("add-target") && !selected.contains("remove-target"),
            "{selected}"
        );
        assert!(!selected.contains("/targets"), "{selected}");
        assert!(selected.contains("id=\"selector-note\""), "{selected}");
        assert!(selected.contains("site=madrid, ring in (canary)"), "{selected}");
        assert!(
            selected.contains("id=\"image-web\"") && selected.contains("id=\"delete\""),
            "{selected}"
        );
        let listed = panel_for(&deployment(serde_json::json!({
            "targetDevices": ["dev-1", "dev-2"],
            "score": score,
        })));
        assert!(
            listed.contains("id=\"add-target\"") && listed.contains("id=\"remove-target\""),
            "{listed}"
        );
        assert!(!listed.contains("selector-note"), "{listed}");
    }

    #[test]
    fn the_device_list_marks_revoked_unregistered_and_paused_in_words() {
        let row = |id: &str, registration: Registration| DeviceRow {
            id: harmony_reconciler_contracts::Id::new(id).unwrap_or_else(|e| panic!("{e}")),
            state: DeviceState::Online,
            heartbeat_age: None,
            agent_version: String::new(),
            arch: String::new(),
            os: String::new(),
            deployments: 0,
            failed: 0,
            registration,
        };
        let page = Page {
            rows: vec![
                row(
                    "gone-1",
                    Registration {
                        revoked: Some("2026-01-02T03:04:05Z".into()),
                        ..Registration::default()
                    },
                ),
                row(
                    "stray-1",
                    Registration {
                        unregistered: true,
                        ..Registration::default()
                    },
                ),
                row(
                    "lab-1",
                    Registration {
                        paused: true,
                        labels: [("site".to_owned(), "madrid".to_owned())].into_iter().collect(),
                        ..Registration::default()
                    },
                ),
            ],
            total: 3,
            page: 1,
            pages: 1,
        };
        let html = devices(&page, &DeviceFilters::default(), &Registry::Known).into_string();
        let cell = |id: &str, col: &str| {
            let row = html
                .find(&format!("data-device=\"{id}\""))
                .unwrap_or_else(|| panic!("{id}"));
            let start = html[row..]
                .find(&format!("data-col=\"{col}\""))
                .map(|i| row + i)
                .unwrap_or(row);
            let end = html[start..].find("</td>").map_or(html.len(), |e| start + e);
            html[start..end].to_owned()
        };
        assert!(cell("gone-1", "marks").contains("⊘</span> revoked"), "{html}");
        assert!(cell("stray-1", "marks").contains("!</span> unregistered"), "{html}");
        assert!(cell("lab-1", "marks").contains("paused"), "{html}");
        assert!(!cell("lab-1", "marks").contains("revoked"), "{html}");
        assert!(cell("lab-1", "labels").contains("site=madrid"), "{html}");
        assert!(!html.contains("registry-note"));
        // Without the Device objects, the page says why labels and marks are missing.
        let html = devices(
            &page,
            &DeviceFilters::default(),
            &Registry::Unavailable("this dashboard's Kubernetes identity may not list Devices (403: no)".into()),
        )
        .into_string();
        assert!(
            html.contains("id=\"registry-note\"") && html.contains("may not list Devices"),
            "{html}"
        );
    }

    #[test]
    fn an_unregistered_device_is_told_how_to_register_or_why_it_cannot() {
        let page = |id: &str| {
            device(&DeviceDetail {
                id,
                state: DeviceState::Online,
                record: None,
                deployments: Vec::new(),
                registration: Registration {
                    unregistered: true,
                    ..Registration::default()
                },
                registry_known: true,
            })
            .into_string()
        };
        let html = page("pi-kitchen");
        assert!(html.contains("id=\"unregistered-note\""), "{html}");
        assert!(
            html.contains("iotctl device enroll pi-kitchen --label KEY=VALUE"),
            "{html}"
        );
        let html = page("Pi_Kitchen");
        assert!(html.contains("re-enroll it under a lowercase id"), "{html}");
        assert!(!html.contains("iotctl device enroll"), "{html}");
    }

    /// A deployment with `spec.rollout` and `.status.rollout` as given, rendered
    /// as its page's rollout part at 10:06.
    fn rollout_html(spec: serde_json::Value, status: Option<serde_json::Value>) -> String {
        let mut dep = deployment(spec);
        if let Some(st) = status {
            dep.status = Some(serde_json::from_value(st).unwrap_or_else(|e| panic!("{e}")));
        }
        let row = crate::view::deployment_row(&dep);
        let counts = [(DevicePhase::Running, 1), (DevicePhase::Outdated, 9)]
            .into_iter()
            .collect();
        rollout_panel(
            &row,
            &dep.spec,
            dep.status.as_ref(),
            &counts,
            crate::rollout::tests::at(6),
        )
        .into_string()
    }

    /// The part of `html` from the element with `id` to the end of its tag `tag`.
    fn element<'a>(html: &'a str, id: &str, tag: &str) -> &'a str {
        let start = html
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("no #{id} in {html}"));
        let end = html[start..]
            .find(&format!("</{tag}>"))
            .map_or(html.len(), |e| start + e);
        &html[start..end]
    }

    fn score() -> serde_json::Value {
        serde_json::json!({"PodmanV0": {"services": [{"name": "web", "image": "localhost/iot-web:v2"}]}})
    }

    #[test]
    fn a_rollout_shows_each_batch_as_a_bar_and_the_promote_command() {
        let html = rollout_html(
            serde_json::json!({
                "selector": {"matchLabels": {"site": "madrid"}}, "score": score(),
                "rollout": {"batches": [{"limit": 1}, {"limit": "50%", "pause": {}}]},
            }),
            Some(serde_json::json!({
                "conditions": [], "currentRevision": 5,
                "rollout": {
                    "revision": 5, "stableRevision": 4, "phase": "Paused", "currentBatch": 2,
                    "matchedAtStart": 10, "startedAt": "2026-03-04T10:00:00Z",
                    "batches": [
                        {"selected": 1, "dispatched": 1, "succeeded": 1,
                         "startedAt": "2026-03-04T10:00:00Z", "passedAt": "2026-03-04T10:02:00Z"},
                        {"selected": 4, "dispatched": 3, "succeeded": 3, "pendingOffline": 1,
                         "startedAt": "2026-03-04T10:02:00Z", "passedAt": "2026-03-04T10:05:00Z"},
                        {"selected": 5},
                    ],
                    "message": "batch 2 passed; waiting for promotion",
                    "summary": "batch 2/3, 4/10",
                },
            })),
        );
        assert!(html.contains("data-phase=\"paused\""), "{html}");
        assert!(
            element(&html, "rollout-title", "h2").contains("⏸</span> paused"),
            "{html}"
        );
        let head = element(&html, "rollout-head", "p");
        assert!(
            head.contains("Revision <strong>5</strong> from stable revision <strong>4</strong>"),
            "{head}"
        );
        assert!(head.contains("batch 2/3, 4/10"), "{head}");
        assert!(element(&html, "rollout-message", "p").contains("waiting for promotion"));
        // Three bars, each a progressbar with its numbers and the same words as text.
        assert_eq!(html.matches("role=\"progressbar\"").count(), 3, "{html}");
        for (max, now) in [(1, 1), (4, 3), (5, 0)] {
            assert!(
                html.contains(&format!("aria-valuemax=\"{max}\" aria-valuenow=\"{now}\"")),
                "{max}/{now}: {html}"
            );
        }
        assert!(html.contains("3 of 4 succeeded · 1 pending offline"), "{html}");
        assert!(html.contains("0 of 5 succeeded · 5 not dispatched yet"), "{html}");
        // The second batch is the current one, and waits for a person.
        let current = &html[html.find("aria-current=\"step\"").unwrap_or_else(|| panic!("{html}"))..];
        let current = &current[..current.find("</li>").unwrap_or(current.len())];
        assert!(current.contains("Batch 2 of 3"), "{current}");
        assert!(current.contains("waiting for promotion"), "{current}");
        assert_eq!(html.matches("aria-current").count(), 1, "{html}");
        assert!(html.contains("not started"), "{html}");
        let cmds = element(&html, "rollout-commands", "div");
        assert!(
            cmds.contains("<code class=\"copy\">iotctl rollout promote default/web</code>"),
            "{cmds}"
        );
        assert!(cmds.contains("starts batch 3 of 3"), "{cmds}");
        // Read-only: nothing on it acts.
        for tag in ["<button", "<form", "<input"] {
            assert!(!html.contains(tag), "{tag}: {html}");
        }
        assert!(!html.contains("rollout-none"), "{html}");
    }

    #[test]
    fn a_rolled_back_rollout_shows_its_failure_clusters_escaped() {
        let html = rollout_html(
            serde_json::json!({
                "selector": {"matchLabels": {"site": "madrid"}}, "score": score(),
                "rollout": {"batches": [{"limit": "10%"}], "onFailure": "Rollback"},
            }),
            Some(serde_json::json!({
                "conditions": [],
                "rollout": {
                    "revision": 7, "stableRevision": 6, "phase": "RolledBack", "currentBatch": 1,
                    "matchedAtStart": 30, "startedAt": "2026-03-04T10:00:00Z",
                    "finishedAt": "2026-03-04T10:04:00Z",
                    "batches": [
                        {"selected": 3, "dispatched": 3, "succeeded": 1, "failed": 1, "silent": 1,
                         "startedAt": "2026-03-04T10:00:00Z"},
                        {"selected": 27},
                    ],
                    "message": "batch 1: 1 of 3 succeeded, 100 % needed; rolled back to revision 6",
                    "failureClusters": [{
                        "message": "exec format error <script>alert(1)</script>",
                        "devices": 2,
                        "exampleDevices": ["pi-7", "not an id/../x"],
                        "sharedLabels": {"hw": "rpi3"},
                    }],
                    "summary": "batch 1/2, 1/30",
                },
            })),
        );
        assert!(element(&html, "rollout-title", "h2").contains("rolled back"), "{html}");
        assert!(html.contains("finished"), "{html}");
        assert!(html.contains("1 of 3 succeeded · 1 failed · 1 silent"), "{html}");
        assert!(html.contains("did not pass"), "{html}");
        let clusters = element(&html, "failure-clusters", "table");
        assert!(
            clusters.contains("exec format error &lt;script&gt;alert(1)&lt;/script&gt;"),
            "{clusters}"
        );
        assert!(!html.contains("<script>"), "{html}");
        assert!(
            clusters.contains("<td class=\"num\" data-col=\"devices\">2</td>"),
            "{clusters}"
        );
        assert!(clusters.contains("hw=rpi3"), "{clusters}");
        assert!(clusters.contains("href=\"/devices/pi-7\""), "{clusters}");
        // A string that is no device id is shown, never made a link.
        assert!(
            clusters.contains("<span class=\"mono\">not an id/../x</span>"),
            "{clusters}"
        );
        assert!(!clusters.contains("href=\"/devices/not"), "{clusters}");
        // Finished: the status, not a command that would act.
        let cmds = element(&html, "rollout-commands", "div");
        assert!(cmds.contains("iotctl rollout status default/web<"), "{cmds}");
        assert!(!cmds.contains("abort") && !cmds.contains("promote"), "{cmds}");
    }

    #[test]
    fn a_suspended_rollout_offers_abort_and_undo() {
        let html = rollout_html(
            serde_json::json!({"targetDevices": ["pi-1", "pi-2"], "score": score(), "rollout": {}}),
            Some(serde_json::json!({
                "conditions": [],
                "rollout": {
                    "revision": 3, "stableRevision": 2, "phase": "Suspended", "currentBatch": 1,
                    "matchedAtStart": 2, "startedAt": "2026-03-04T10:00:00Z",
                    "batches": [{"selected": 2, "dispatched": 2, "succeeded": 1, "timedOut": 1, "neverAcknowledged": 0}],
                    "summary": "batch 1/1, 1/2",
                },
            })),
        );
        assert!(
            element(&html, "rollout-title", "h2").contains("✕</span> suspended"),
            "{html}"
        );
        assert!(html.contains("1 of 2 succeeded · 1 timed out"), "{html}");
        let cmds = element(&html, "rollout-commands", "div");
        assert!(cmds.contains("iotctl rollout abort default/web"), "{cmds}");
        assert!(
            cmds.contains("iotctl rollout undo default/web --to-revision 2"),
            "{cmds}"
        );
    }

    #[test]
    fn without_spec_rollout_the_page_says_every_device_gets_it_at_once() {
        let html = rollout_html(serde_json::json!({"targetDevices": ["pi-1"], "score": score()}), None);
        assert!(
            element(&html, "rollout-none", "p").contains("every matched device gets a new revision at once"),
            "{html}"
        );
        assert!(
            !html.contains("progressbar") && !html.contains("rollout-commands"),
            "{html}"
        );
        // Devices still moving to the new spec: the one bar over all of them.
        assert!(html.contains("Rolling out: <strong>1 of 1</strong>"), "{html}");
        // Nothing moving: the line alone, in no box.
        let dep = deployment(serde_json::json!({"targetDevices": ["pi-1"], "score": score()}));
        let row = crate::view::deployment_row(&dep);
        let counts = [(DevicePhase::Running, 1)].into_iter().collect();
        let html = rollout_panel(&row, &dep.spec, None, &counts, crate::rollout::tests::at(6)).into_string();
        assert!(html.starts_with("<p class=\"muted\" id=\"rollout-none\">"), "{html}");
        assert!(!html.contains("<section"), "{html}");
        // spec.rollout, no rollout yet: the plan.
        let html = rollout_html(
            serde_json::json!({"targetDevices": ["pi-1"], "score": score(),
                "rollout": {"batches": [{"limit": 1, "pause": {}}, {"limit": "50%", "bakeTime": "10m"}]}}),
            None,
        );
        let plan = element(&html, "rollout-plan", "p");
        assert!(
            plan.contains("up to 1 device (then waits for promotion), up to 50% (then bakes 10m), then the rest"),
            "{plan}"
        );
        assert!(!html.contains("rollout-none"), "{html}");
    }

    #[test]
    fn the_deployment_list_shows_the_rollout_phase_and_summary() {
        let mut dep = deployment(serde_json::json!({"targetDevices": ["pi-1"], "score": score()}));
        dep.status = Some(
            serde_json::from_value(serde_json::json!({
                "conditions": [],
                "rollout": {
                    "revision": 2, "phase": "Progressing", "currentBatch": 2, "matchedAtStart": 120,
                    "startedAt": "2026-03-04T10:00:00Z", "batches": [], "summary": "batch 2/4, 37/120",
                },
            }))
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let plain = deployment(serde_json::json!({"targetDevices": ["pi-1"], "score": score()}));
        let mut other = crate::view::deployment_row(&plain);
        other.name = "plain".into();
        let page = Page {
            rows: vec![crate::view::deployment_row(&dep), other],
            total: 2,
            page: 1,
            pages: 1,
        };
        let html = deployments(&page).into_string();
        assert!(html.contains("<th>Rollout</th>"), "{html}");
        let cell = element(&html, "deployments", "table");
        let web = &cell[cell
            .find("data-deployment=\"default/web\"")
            .unwrap_or_else(|| panic!("{cell}"))..];
        let web = &web[web.find("data-col=\"rollout\"").unwrap_or(0)..];
        let web = &web[..web.find("</td>").unwrap_or(web.len())];
        assert!(
            web.contains("progressing") && web.contains("batch 2/4, 37/120"),
            "{web}"
        );
        let plain = &cell[cell
            .find("data-deployment=\"default/plain\"")
            .unwrap_or_else(|| panic!("{cell}"))..];
        assert!(plain.contains("data-col=\"rollout\"></td>"), "{plain}");
    }

    #[test]
    fn a_device_shows_the_pull_its_deployment_waits_on_escaped() {
        let at = chrono::Utc::now() - chrono::Duration::seconds(14);
        let mut phase = harmony_reconciler_contracts::DeploymentPhase::new(
            harmony_reconciler_contracts::Phase::Pending,
            None,
            Some("<b>denied</b>".into()),
            at,
        );
        phase.pull = Some(harmony_reconciler_contracts::PullProgress {
            image: "10.77.0.1:5000/iot/<web>".into(),
            state: harmony_reconciler_contracts::PullState::Pulling,
            bytes_done: 12_897_485,
            bytes_total: Some(41_943_040),
            layers_done: 2,
            layers_total: 5,
            started_at: at,
        });
        let pull = crate::view::pull_view(&phase, at + chrono::Duration::seconds(14));
        let html = device(&DeviceDetail {
            id: "pi-kitchen",
            state: DeviceState::Online,
            record: None,
            deployments: vec![DeviceDeployment {
                deployment: "default/web".into(),
                phase: DevicePhase::Pending,
                error: None,
                selector: None,
                pull,
            }],
            registration: Registration::default(),
            registry_known: false,
        })
        .into_string();
        assert!(
            html.contains("pulling 10.77.0.1:5000/iot/&lt;web&gt; 12.3/40.0 MiB (30%), 14s"),
            "{html}"
        );
        assert!(!html.contains("<web>"), "{html}");
        assert!(
            html.contains(r#"<progress max="41943040" value="12897485" aria-label="Image pull">"#),
            "{html}"
        );
        if let Some(p) = phase.pull.as_mut() {
            p.state = harmony_reconciler_contracts::PullState::Failed;
        }
        let failed = crate::view::pull_view(&phase, at).map(|p| p.text);
        assert_eq!(failed.as_deref(), Some("pull failed, retrying: <b>denied</b>"));
    }

    #[test]
    fn the_deployment_page_shows_pinned_digests_and_the_rollout_its_pull_limit() {
        let digest = format!("sha256:{}", "ab12cd34ef56".repeat(5) + "ab12");
        let status = serde_json::json!({
            "observedGeneration": 3, "currentRevision": 4,
            "images": [{"image": "10.77.0.1:5000/iot/web:1.2", "digest": digest}],
            "rollout": {
                "revision": 4, "phase": "Progressing", "currentBatch": 1, "matchedAtStart": 5,
                "startedAt": "2026-01-01T10:00:00Z", "summary": "batch 1/1",
                "batches": [{"selected": 5, "dispatched": 2, "pendingPull": 3}],
            },
        });
        let html = rollout_html(
            serde_json::json!({"targetDevices": ["pi-1"], "score": score(), "rollout": {"maxConcurrentPulls": 2}}),
            Some(status.clone()),
        );
        assert!(
            element(&html, "rollout-pulls", "span").contains("at most 2 devices pull at once"),
            "{html}"
        );
        assert!(html.contains("3 waiting for a pull slot"), "{html}");
        let mut dep = deployment(serde_json::json!({"targetDevices": ["pi-1"], "score": score()}));
        dep.status = Some(serde_json::from_value(status).unwrap_or_else(|e| panic!("{e}")));
        let row = crate::view::deployment_row(&dep);
        let page = super::deployment(&DeploymentDetail {
            row: &row,
            counts: &Default::default(),
            phases: &crate::view::paginate(Vec::new(), 1, 10),
            only: None,
            spec: &dep.spec,
            status: dep.status.as_ref(),
            changes: None,
        })
        .into_string();
        let table = element(&page, "pinned-images", "table");
        assert!(table.contains("10.77.0.1:5000/iot/web:1.2"), "{table}");
        assert!(table.contains(&digest), "{table}");
    }
}
