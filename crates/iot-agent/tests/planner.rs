//! The pure planner, case by case.

use std::collections::{BTreeMap, BTreeSet};

use harmony_reconciler_contracts::{DeploymentRef, Id, PodmanService, RestartPolicy, SpecHash};
use iot_agent::plan::{Action, Assessment, DesiredContent, ImageState, PlanInput, plan, service_hash};
use iot_agent::runtime::{ContainerImage, ContainerState, ObservedContainer};

fn dev() -> Id {
    Id::new("dev1").expect("valid")
}

fn dep(name: &str) -> DeploymentRef {
    DeploymentRef::new("default", name).expect("valid")
}

fn svc(name: &str, image: &str) -> PodmanService {
    serde_json::from_value(serde_json::json!({"name": name, "image": image})).expect("service")
}

fn valid(services: Vec<PodmanService>) -> DesiredContent {
    DesiredContent::Valid {
        spec_hash: SpecHash::from_reported("h"),
        services,
        revision: None,
    }
}

fn running(id: &str, d: &str, s: &PodmanService) -> ObservedContainer {
    ObservedContainer {
        id: id.into(),
        name: format!("dev1.default.{d}.{}", s.name),
        deployment: Some(dep(d)),
        service: s.name.clone(),
        service_hash: service_hash(s).to_string(),
        revision: None,
        state: ContainerState::Running,
        image: ContainerImage {
            name: s.image.clone(),
            id: format!("id-{}", s.image),
            ..Default::default()
        },
        previous_image: None,
    }
}

struct Case {
    desired: BTreeMap<DeploymentRef, DesiredContent>,
    observed: Vec<ObservedContainer>,
    synced: bool,
    seen: BTreeSet<(DeploymentRef, String)>,
    /// `None`: every image the case uses is present.
    images: Option<BTreeMap<String, ImageState>>,
    on_hold: BTreeSet<DeploymentRef>,
}

impl Case {
    fn new() -> Self {
        Self {
            desired: BTreeMap::new(),
            observed: vec![],
            synced: true,
            seen: BTreeSet::new(),
            images: None,
            on_hold: BTreeSet::new(),
        }
    }
    fn run(&self) -> iot_agent::plan::Plan {
        let device = dev();
        let all_present: BTreeMap<String, ImageState> = self
            .desired
            .values()
            .filter_map(|c| match c {
                DesiredContent::Valid { services, .. } => {
                    Some(services.iter().map(|s| (s.image.clone(), ImageState::Present)))
                }
                DesiredContent::Invalid { .. } => None,
            })
            .flatten()
            .collect();
        plan(PlanInput {
            device: &device,
            desired: &self.desired,
            observed: &self.observed,
            synced: self.synced,
            seen: &self.seen,
            images: self.images.as_ref().unwrap_or(&all_present),
            on_hold: &self.on_hold,
        })
    }
}

fn kinds(p: &iot_agent::plan::Plan) -> Vec<String> {
    p.actions
        .iter()
        .map(|a| match a {
            Action::Remove {
                container_id, cause, ..
            } => format!("remove {container_id} {cause:?}"),
            Action::Create { spec, cause } => {
                format!("create {}/{} {cause:?}", spec.deployment.name(), spec.service.name)
            }
            Action::Replace { spec, old, stop_first } => format!(
                "replace {}/{} {} stop_first={stop_first}",
                spec.deployment.name(),
                spec.service.name,
                old.iter().map(|o| o.id.as_str()).collect::<Vec<_>>().join(",")
            ),
            Action::FinishReplace { spec, new, old } => format!(
                "finish {}/{} {} over {}",
                spec.deployment.name(),
                spec.service.name,
                new.id,
                old.iter().map(|o| o.id.as_str()).collect::<Vec<_>>().join(",")
            ),
            Action::EnsureImage { image, .. } => format!("ensure {image}"),
            Action::Start { container_id, .. } => format!("start {container_id}"),
            Action::StartPrevious {
                container_id,
                exit_code,
                ..
            } => format!("start previous {container_id} {exit_code:?}"),
            Action::Unpause { container_id, .. } => format!("unpause {container_id}"),
        })
        .collect()
}

#[test]
fn new_deployment_creates_each_service() {
    let mut c = Case::new();
    c.desired
        .insert(dep("web"), valid(vec![svc("web", "img:1"), svc("db", "db:1")]));
    let p = c.run();
    assert_eq!(kinds(&p), ["create web/web New", "create web/db New"]);
    assert_eq!(p.assessments[&dep("web")], Assessment::InProgress(None));
    // Container names carry the service hash, so a replacement can sit next to the old one.
    let Action::Create { spec, .. } = &p.actions[0] else {
        panic!("a create")
    };
    assert_eq!(
        spec.name,
        format!(
            "dev1.default.web.web.{}",
            &service_hash(&svc("web", "img:1")).as_str()[..8]
        )
    );
}

#[test]
fn converged_deployment_plans_nothing() {
    let web = svc("web", "img:1");
    let mut c = Case::new();
    c.desired.insert(dep("web"), valid(vec![web.clone()]));
    c.observed.push(running("c1", "web", &web));
    let p = c.run();
    assert!(p.actions.is_empty(), "{:?}", kinds(&p));
    assert_eq!(p.assessments[&dep("web")], Assessment::Converged);
}

#[test]
fn changed_spec_replaces_and_never_removes_the_old_container_on_its_own() {
    let old = svc("web", "img:1");
    let new = svc("web", "img:2");
    let mut c = Case::new();
    c.desired.insert(dep("web"), valid(vec![new]));
    c.observed.push(running("c1", "web", &old));
    assert_eq!(kinds(&c.run()), ["replace web/web c1 stop_first=false"]);
}

#[test]
fn host_ports_make_a_replacement_stop_the_old_container_first() {
    let mut old = svc("web", "img:1");
    old.ports = serde_json::from_value(serde_json::json!([{"host_port": 8080, "container_port": 80}])).expect("ports");
    let mut new = old.clone();
    new.image = "img:2".into();
    let mut c = Case::new();
    c.desired.insert(dep("web"), valid(vec![new]));
    c.observed.push(running("c1", "web", &old));
    assert_eq!(kinds(&c.run()), ["replace web/web c1 stop_first=true"]);
    // An old container that is not running holds no port.
    c.observed[0].state = ContainerState::Exited { code: 1 };
    assert_eq!(kinds(&c.run()), ["replace web/web c1 stop_first=false"]);
}

#[test]
fn an_image_not_known_to_be_present_is_ensured_first_and_nothing_else_happens() {
    let old = svc("web", "img:1");
    let mut c = Case::new();
    c.desired.insert(dep("web"), valid(vec![svc("web", "img:2")]));
    c.desired.insert(dep("other"), valid(vec![svc("web", "img:2")]));
    c.observed.push(running("c1", "web", &old));
    c.images = Some(BTreeMap::new());
    let p = c.run();
    // One check for the image both deployments need; the old container is untouched.
    assert_eq!(kinds(&p), ["ensure img:2"]);
    assert!(
        matches!(&p.assessments[&dep("web")], Assessment::InProgress(Some(n)) if n.contains("checking image img:2"))
    );
}

#[test]
fn a_pulling_or_failed_image_keeps_the_old_container_and_says_why() {
    let old = svc("web", "img:1");
    let mut c = Case::new();
    c.desired.insert(dep("web"), valid(vec![svc("web", "img:2")]));
    c.observed.push(running("c1", "web", &old));
    c.images = Some(BTreeMap::from([("img:2".to_string(), ImageState::Pulling)]));
    let p = c.run();
    assert!(p.actions.is_empty(), "{:?}", kinds(&p));
    assert!(
        matches!(&p.assessments[&dep("web")], Assessment::InProgress(Some(n)) if n.contains("pulling image img:2"))
    );

    c.images = Some(BTreeMap::from([(
        "img:2".to_string(),
        ImageState::Failed("manifest unknown".into()),
    )]));
    let p = c.run();
    assert!(p.actions.is_empty(), "{:?}", kinds(&p));
    assert_eq!(
        p.assessments[&dep("web")],
        Assessment::ImageUnavailable("service web: manifest unknown".into())
    );
}

#[test]
fn an_interrupted_replacement_is_settled_before_the_old_container_goes() {
    // The agent stopped during the settle check: the new container is not trusted
    // yet, so the old one is not simply removed as a leftover.
    let old = svc("web", "img:1");
    let new = svc("web", "img:2");
    let mut c = Case::new();
    c.desired.insert(dep("web"), valid(vec![new.clone()]));
    c.observed.push(running("c1", "web", &old));
    c.observed.push(running("c2", "web", &new));
    assert_eq!(kinds(&c.run()), ["finish web/web c2 over c1"]);
}

#[test]
fn paused_containers_are_unpaused_and_transitional_ones_are_not_running() {
    let web = svc("web", "img:1");
    let mut c = Case::new();
    c.desired.insert(dep("web"), valid(vec![web.clone()]));
    let mut obs = running("c1", "web", &web);
    obs.state = ContainerState::Paused;
    c.observed.push(obs);
    let p = c.run();
    assert_eq!(kinds(&p), ["unpause c1"]);
    assert!(matches!(&p.assessments[&dep("web")], Assessment::InProgress(Some(n)) if n.contains("paused")));

    c.observed[0].state = ContainerState::Other("stopping".into());
    let p = c.run();
    assert!(p.actions.is_empty());
    assert!(matches!(&p.assessments[&dep("web")], Assessment::InProgress(Some(n)) if n.contains("stopping")));
}

#[test]
fn deleted_deployment_removes_its_containers_only_when_synced() {
    let web = svc("web", "img:1");
    let mut c = Case::new();
    c.observed.push(running("c1", "web", &web));
    assert_eq!(kinds(&c.run()), ["remove c1 DeploymentDeleted"]);
    c.synced = false;
    assert!(c.run().actions.is_empty(), "must not remove before the first full read");
}

#[test]
fn container_removed_out_of_band_is_restored() {
    let mut c = Case::new();
    c.desired.insert(dep("web"), valid(vec![svc("web", "img:1")]));
    c.seen.insert((dep("web"), "web".into()));
    let p = c.run();
    assert_eq!(kinds(&p), ["create web/web Restore"]);
    assert_eq!(p.restoring().collect::<Vec<_>>(), [&dep("web")]);
    // Without having seen it, a missing container is simply new.
    c.seen.clear();
    assert_eq!(kinds(&c.run()), ["create web/web New"]);
}

#[test]
fn stopped_container_is_started_according_to_restart_policy() {
    let mut always = svc("web", "img:1");
    always.restart_policy = RestartPolicy::Always;
    let mut c = Case::new();
    c.desired.insert(dep("web"), valid(vec![always.clone()]));
    let mut obs = running("c1", "web", &always);
    obs.state = ContainerState::Exited { code: 0 };
    c.observed.push(obs.clone());
    assert_eq!(kinds(&c.run()), ["start c1"]);

    let mut never = svc("web", "img:1");
    never.restart_policy = RestartPolicy::Never;
    c.desired.insert(dep("web"), valid(vec![never.clone()]));
    c.observed = vec![ObservedContainer {
        service_hash: service_hash(&never).to_string(),
        ..obs.clone()
    }];
    let p = c.run();
    assert!(p.actions.is_empty());
    assert!(matches!(&p.assessments[&dep("web")], Assessment::Stopped(m) if m.contains("exited with code 0")));

    let mut on_failure = svc("web", "img:1");
    on_failure.restart_policy = RestartPolicy::OnFailure;
    c.desired.insert(dep("web"), valid(vec![on_failure.clone()]));
    c.observed = vec![ObservedContainer {
        service_hash: service_hash(&on_failure).to_string(),
        state: ContainerState::Exited { code: 3 },
        ..obs
    }];
    assert_eq!(kinds(&c.run()), ["start c1"]);
}

#[test]
fn created_but_not_started_container_is_started() {
    let web = svc("web", "img:1");
    let mut c = Case::new();
    c.desired.insert(dep("web"), valid(vec![web.clone()]));
    let mut obs = running("c1", "web", &web);
    obs.state = ContainerState::Created;
    c.observed.push(obs);
    assert_eq!(kinds(&c.run()), ["start c1"]);
}

#[test]
fn invalid_desired_state_keeps_existing_containers_and_touches_nothing_else() {
    let web = svc("web", "img:1");
    let api = svc("api", "api:1");
    let mut c = Case::new();
    c.desired.insert(
        dep("web"),
        DesiredContent::Invalid {
            spec_hash: None,
            error: "does not parse".into(),
            revision: None,
        },
    );
    c.desired.insert(dep("api"), valid(vec![api.clone()]));
    c.observed.push(running("c1", "web", &web));
    c.observed.push(running("c2", "api", &api));
    let p = c.run();
    assert!(p.actions.is_empty(), "{:?}", kinds(&p));
    assert_eq!(p.assessments[&dep("web")], Assessment::Invalid("does not parse".into()));
    assert_eq!(p.assessments[&dep("api")], Assessment::Converged);
}

#[test]
fn duplicates_and_dropped_services_are_removed() {
    let web = svc("web", "img:1");
    let old_sidecar = svc("sidecar", "s:1");
    let mut c = Case::new();
    c.desired.insert(dep("web"), valid(vec![web.clone()]));
    c.observed.push(running("c1", "web", &web));
    c.observed.push(running("c2", "web", &web));
    c.observed.push(running("c3", "web", &old_sidecar));
    let k = kinds(&c.run());
    assert!(k.contains(&"remove c2 Duplicate".to_string()), "{k:?}");
    assert!(k.contains(&"remove c3 SpecChanged".to_string()), "{k:?}");
    assert_eq!(k.len(), 2);
}

#[test]
fn container_with_unreadable_deployment_label_is_removed_when_synced() {
    let web = svc("web", "img:1");
    let mut c = Case::new();
    let mut obs = running("c9", "web", &web);
    obs.deployment = None;
    c.observed.push(obs);
    assert_eq!(kinds(&c.run()), ["remove c9 UnknownDeployment"]);
    c.synced = false;
    assert!(c.run().actions.is_empty());
}

#[test]
fn removals_come_before_creates_and_replacements() {
    let old = svc("web", "img:1");
    let mut c = Case::new();
    c.desired.insert(dep("a"), valid(vec![svc("web", "img:2")]));
    c.desired.insert(dep("b"), valid(vec![svc("web", "img:3")]));
    c.observed.push(running("c1", "a", &old));
    c.observed.push(running("c2", "gone", &old));
    assert_eq!(
        kinds(&c.run()),
        [
            "remove c2 DeploymentDeleted",
            "create b/web New",
            "replace a/web c1 stop_first=false"
        ]
    );
}

#[test]
fn a_stopped_previous_version_is_started_again_while_its_upgrade_waits() {
    // v1 exited (a power cut, an OOM kill) while v2 cannot replace it yet.
    let old = svc("web", "img:1");
    let mut c = Case::new();
    c.desired.insert(dep("web"), valid(vec![svc("web", "img:2")]));
    c.observed.push(running("c1", "web", &old));
    c.observed[0].state = ContainerState::Exited { code: 137 };
    let waits: [(&str, Option<ImageState>); 3] = [
        ("pulling", Some(ImageState::Pulling)),
        ("failed pull", Some(ImageState::Failed("manifest unknown".into()))),
        ("checking", None),
    ];
    for (why, state) in waits {
        c.images = Some(state.map(|s| ("img:2".to_string(), s)).into_iter().collect());
        let k = kinds(&c.run());
        assert!(k.contains(&"start previous c1 Some(137)".to_string()), "{why}: {k:?}");
        assert!(!k.iter().any(|a| a.starts_with("replace")), "{why}: {k:?}");
    }
    // The image is here, but the last attempt was rolled back and waits for its
    // retry: no replacement, and v1 comes back.
    c.images = None;
    c.on_hold.insert(dep("web"));
    let p = c.run();
    assert_eq!(kinds(&p), ["start previous c1 Some(137)"]);
    assert!(
        matches!(&p.assessments[&dep("web")], Assessment::InProgress(Some(n)) if n.contains("waits for its retry")),
        "not converged while the new spec does not run: {:?}",
        p.assessments
    );
    // v1 runs again: nothing to do, and still not converged.
    c.observed[0].state = ContainerState::Running;
    let p = c.run();
    assert!(p.actions.is_empty(), "{:?}", kinds(&p));
    assert_ne!(p.assessments[&dep("web")], Assessment::Converged);
    c.observed[0].state = ContainerState::Exited { code: 137 };
    // Once the retry is due, the upgrade goes ahead (v1 holds no port: no stop).
    c.on_hold.clear();
    assert_eq!(kinds(&c.run()), ["replace web/web c1 stop_first=false"]);
}

#[test]
fn the_previous_version_follows_the_restart_policy_and_is_left_alone_when_up() {
    let old = svc("web", "img:1");
    let mut new = svc("web", "img:2");
    let mut c = Case::new();
    c.images = Some(BTreeMap::from([("img:2".to_string(), ImageState::Pulling)]));
    c.observed.push(running("c1", "web", &old));
    // Running: nothing to do.
    c.desired.insert(dep("web"), valid(vec![new.clone()]));
    assert!(kinds(&c.run()).is_empty());
    // A clean exit under OnFailure is a finished job, as it would be for v2.
    new.restart_policy = RestartPolicy::OnFailure;
    c.desired.insert(dep("web"), valid(vec![new.clone()]));
    c.observed[0].state = ContainerState::Exited { code: 0 };
    assert!(kinds(&c.run()).is_empty());
    c.observed[0].state = ContainerState::Exited { code: 2 };
    assert_eq!(kinds(&c.run()), ["start previous c1 Some(2)"]);
    new.restart_policy = RestartPolicy::Never;
    c.desired.insert(dep("web"), valid(vec![new]));
    assert!(kinds(&c.run()).is_empty());
    // Two outdated containers, one still running: the old version is up.
    c.desired.insert(dep("web"), valid(vec![svc("web", "img:2")]));
    c.observed.push(running("c0", "web", &svc("web", "img:0")));
    assert!(kinds(&c.run()).is_empty());
}

/// Issue 26: the operator pins `reg/iot/web:v1` to `reg/iot/web@sha256:D`. A
/// container created from the tag whose image has digest D is what is desired.
const TAGGED: &str = "10.77.0.1:5000/iot/web:v1";
const D: &str = "sha256:d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1";

fn pinned(digest: &str) -> String {
    format!("10.77.0.1:5000/iot/web@{digest}")
}

/// A running container created from `TAGGED` whose image has digest `D`, as the
/// runtime reports it (`RepoDigests` and `Digest`, or only one of them).
fn created_from_tag(repo_digests: bool, digest: bool) -> ObservedContainer {
    let mut c = running("c1", "web", &svc("web", TAGGED));
    c.image.repo_digests = if repo_digests { vec![pinned(D)] } else { vec![] };
    c.image.digest = digest.then(|| D.to_owned());
    c
}

#[test]
fn a_tag_pinned_to_the_digest_of_the_running_image_changes_nothing() {
    for (repo_digests, digest) in [(true, true), (true, false), (false, true)] {
        let mut c = Case::new();
        c.observed.push(created_from_tag(repo_digests, digest));
        c.desired.insert(dep("web"), valid(vec![svc("web", &pinned(D))]));
        let p = c.run();
        assert_eq!(kinds(&p), Vec::<String>::new(), "{repo_digests} {digest}");
        assert_eq!(p.assessments[&dep("web")], Assessment::Converged);
    }
}

#[test]
fn a_pinned_tag_still_replaces_on_another_digest_or_any_other_change() {
    let other = "sha256:e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2";
    let mut env = svc("web", &pinned(D));
    env.env.insert("MODE".into(), "fast".into());
    let mut policy = svc("web", &pinned(D));
    policy.restart_policy = RestartPolicy::Never;
    for (why, desired) in [
        ("another digest", svc("web", &pinned(other))),
        ("env differs", env),
        ("restart policy differs", policy),
        ("another repository", svc("web", &format!("10.77.0.1:5000/iot/api@{D}"))),
        ("another registry", svc("web", &format!("10.77.0.2:5000/iot/web@{D}"))),
        ("a tag, not a digest", svc("web", "10.77.0.1:5000/iot/web:v2")),
    ] {
        let mut c = Case::new();
        c.observed.push(created_from_tag(true, true));
        c.desired.insert(dep("web"), valid(vec![desired]));
        assert_eq!(kinds(&c.run()), ["replace web/web c1 stop_first=false"], "{why}");
    }
    // The image the container runs has no digest D (a tag that moved since).
    let mut c = Case::new();
    let mut moved = created_from_tag(false, false);
    moved.image.repo_digests = vec![pinned(other)];
    moved.image.digest = Some(other.to_owned());
    c.observed.push(moved);
    c.desired.insert(dep("web"), valid(vec![svc("web", &pinned(D))]));
    assert_eq!(kinds(&c.run()), ["replace web/web c1 stop_first=false"]);
}

#[test]
fn a_replacement_remembers_the_image_it_replaces() {
    let mut c = Case::new();
    c.observed.push(running("c1", "web", &svc("web", "img:1")));
    c.desired.insert(dep("web"), valid(vec![svc("web", "img:2")]));
    let p = c.run();
    let previous = p.actions.iter().find_map(|a| match a {
        Action::Replace { spec, .. } => Some(spec.previous_image.clone()),
        _ => None,
    });
    assert_eq!(previous, Some(Some("id-img:1".to_owned())));
}

#[test]
fn image_references_split_into_repository_tag_and_digest() {
    use iot_agent::plan::ImageRef;
    let r = ImageRef::parse("10.77.0.1:5000/iot/web:v1");
    assert_eq!(
        (r.repository, r.tag, r.digest),
        ("10.77.0.1:5000/iot/web", Some("v1"), None)
    );
    let r = ImageRef::parse("10.77.0.1:5000/iot/web@sha256:ab");
    assert_eq!(
        (r.repository, r.tag, r.digest),
        ("10.77.0.1:5000/iot/web", None, Some("sha256:ab"))
    );
    let r = ImageRef::parse("localhost:5000/web");
    assert_eq!((r.repository, r.tag, r.digest), ("localhost:5000/web", None, None));
    let r = ImageRef::parse("nginx:1@sha256:ab");
    assert_eq!((r.repository, r.tag, r.digest), ("nginx", Some("1"), Some("sha256:ab")));
}
