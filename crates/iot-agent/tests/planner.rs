//! The pure planner, case by case.

use std::collections::{BTreeMap, BTreeSet};

use harmony_reconciler_contracts::{DeploymentRef, Id, PodmanService, RestartPolicy, SpecHash};
use iot_agent::plan::{Action, Assessment, CreateCause, DesiredContent, PlanInput, RemoveCause, plan, service_hash};
use iot_agent::runtime::{ContainerState, ObservedContainer};

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
    }
}

fn running(id: &str, d: &str, s: &PodmanService) -> ObservedContainer {
    ObservedContainer {
        id: id.into(),
        name: format!("dev1.default.{d}.{}", s.name),
        deployment: Some(dep(d)),
        service: s.name.clone(),
        service_hash: service_hash(s).to_string(),
        state: ContainerState::Running,
    }
}

struct Case {
    desired: BTreeMap<DeploymentRef, DesiredContent>,
    observed: Vec<ObservedContainer>,
    synced: bool,
    seen: BTreeSet<(DeploymentRef, String)>,
}

impl Case {
    fn new() -> Self {
        Self {
            desired: BTreeMap::new(),
            observed: vec![],
            synced: true,
            seen: BTreeSet::new(),
        }
    }
    fn run(&self) -> iot_agent::plan::Plan {
        let device = dev();
        plan(PlanInput {
            device: &device,
            desired: &self.desired,
            observed: &self.observed,
            synced: self.synced,
            seen: &self.seen,
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
            Action::Create { spec, cause } => format!("create {} {cause:?}", spec.name),
            Action::Start { container_id, .. } => format!("start {container_id}"),
        })
        .collect()
}

#[test]
fn new_deployment_creates_each_service() {
    let mut c = Case::new();
    c.desired
        .insert(dep("web"), valid(vec![svc("web", "img:1"), svc("db", "db:1")]));
    let p = c.run();
    assert_eq!(
        kinds(&p),
        ["create dev1.default.web.web New", "create dev1.default.web.db New"]
    );
    assert_eq!(p.assessments[&dep("web")], Assessment::InProgress);
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
fn changed_spec_removes_then_recreates() {
    let old = svc("web", "img:1");
    let new = svc("web", "img:2");
    let mut c = Case::new();
    c.desired.insert(dep("web"), valid(vec![new]));
    c.observed.push(running("c1", "web", &old));
    assert_eq!(
        kinds(&c.run()),
        ["remove c1 SpecChanged", "create dev1.default.web.web Upgrade"]
    );
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
    assert_eq!(kinds(&c.run()), ["create dev1.default.web.web Restore"]);
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
fn removals_come_before_creates() {
    let old = svc("web", "img:1");
    let mut c = Case::new();
    c.desired.insert(dep("a"), valid(vec![svc("web", "img:2")]));
    c.observed.push(running("c1", "a", &old));
    c.observed.push(running("c2", "gone", &old));
    let p = c.run();
    let first_create = p
        .actions
        .iter()
        .position(|a| matches!(a, Action::Create { .. }))
        .expect("a create");
    assert!(
        p.actions[..first_create]
            .iter()
            .all(|a| matches!(a, Action::Remove { .. }))
    );
    assert!(p.actions.iter().any(|a| matches!(
        a,
        Action::Remove {
            cause: RemoveCause::DeploymentDeleted,
            ..
        }
    )));
    assert!(p.actions.iter().any(|a| matches!(
        a,
        Action::Create {
            cause: CreateCause::Upgrade,
            ..
        }
    )));
}
