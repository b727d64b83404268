//! Key helpers: NATS token rules, namespace separation, typed errors.

use harmony_reconciler_contracts::keys::{desired_state_device_filter, key_from_subject, kv_subject};
use harmony_reconciler_contracts::{
    DeploymentRef, Id, IdError, agent_status_key, desired_state_key, parse_agent_status_key, parse_desired_state_key,
};

fn dep(ns: &str, name: &str) -> DeploymentRef {
    DeploymentRef::new(ns, name).expect("valid test ref")
}

#[test]
fn desired_state_key_has_device_then_one_deployment_token() {
    let dev = Id::new("pi-kitchen_01").expect("valid");
    assert_eq!(
        desired_state_key(&dev, &dep("default", "web")),
        "pi-kitchen_01.default_web"
    );
}

#[test]
fn same_name_in_two_namespaces_never_collides() {
    let dev = Id::new("dev1").expect("valid");
    let a = desired_state_key(&dev, &dep("a", "web"));
    let b = desired_state_key(&dev, &dep("b", "web"));
    assert_ne!(a, b);
    // Also the classic ambiguity: "a-b"/"c" vs "a"/"b-c".
    assert_ne!(
        desired_state_key(&dev, &dep("a-b", "c")),
        desired_state_key(&dev, &dep("a", "b-c"))
    );
}

#[test]
fn dotted_names_stay_one_token_and_round_trip() {
    let dev = Id::new("dev1").expect("valid");
    let d = dep("prod", "web.v2.eu");
    let key = desired_state_key(&dev, &d);
    assert_eq!(key, "dev1.prod_web=v2=eu");
    assert_eq!(key.matches('.').count(), 1);
    let (dev2, d2) = parse_desired_state_key(&key).expect("parses");
    assert_eq!((dev2, d2), (dev, d));
}

#[test]
fn status_key_round_trips() {
    let dev = Id::new("dev-7").expect("valid");
    assert_eq!(agent_status_key(&dev), "status.dev-7");
    assert_eq!(parse_agent_status_key("status.dev-7").expect("parses"), dev);
    assert!(parse_agent_status_key("heartbeat.dev-7").is_err());
}

#[test]
fn device_ids_that_break_nats_tokens_are_typed_errors() {
    for bad in ["", "a.b", "a*", "a>", "a b", "dév", "a/b", "x=y", &"x".repeat(65)] {
        match Id::new(bad) {
            Err(IdError::InvalidDeviceId { id, .. }) => assert_eq!(id, bad),
            other => panic!("{bad:?} should be rejected, got {other:?}"),
        }
    }
    assert!(Id::new("A-z_09").is_ok());
    assert!(Id::new("x".repeat(64)).is_ok());
}

#[test]
fn bad_namespaces_and_names_are_typed_errors() {
    assert!(matches!(
        DeploymentRef::new("Default", "web"),
        Err(IdError::InvalidNamespace { .. })
    ));
    assert!(matches!(
        DeploymentRef::new("a.b", "web"),
        Err(IdError::InvalidNamespace { .. })
    ));
    assert!(matches!(
        DeploymentRef::new("ns", "we_b"),
        Err(IdError::InvalidName { .. })
    ));
    assert!(matches!(
        DeploymentRef::new("ns", "web."),
        Err(IdError::InvalidName { .. })
    ));
    assert!(matches!(DeploymentRef::new("ns", ""), Err(IdError::InvalidName { .. })));
}

#[test]
fn malformed_keys_are_errors_not_panics() {
    for bad in [
        "",
        "dev1",
        "dev1.",
        "dev1.web",
        "dev1.ns_web.extra",
        ".ns_web",
        "d v.ns_web",
    ] {
        assert!(parse_desired_state_key(bad).is_err(), "{bad:?} should not parse");
    }
}

#[test]
fn error_messages_say_what_is_allowed() {
    let err = Id::new("a.b").expect_err("invalid").to_string();
    assert!(err.contains("a.b") && err.contains("A-Z a-z 0-9 _ -"), "{err}");
}

#[test]
fn subjects_match_kv_layout() {
    let dev = Id::new("dev1").expect("valid");
    assert_eq!(desired_state_device_filter(&dev), "$KV.desired-state.dev1.>");
    let subject = kv_subject("desired-state", "dev1.default_web");
    assert_eq!(subject, "$KV.desired-state.dev1.default_web");
    assert_eq!(key_from_subject("desired-state", &subject), Some("dev1.default_web"));
    assert_eq!(key_from_subject("agent-status", &subject), None);
}

#[test]
fn deployment_ref_parses_from_slash_form() {
    let d: DeploymentRef = "ns1/web".parse().expect("parses");
    assert_eq!((d.namespace(), d.name()), ("ns1", "web"));
    assert!("web".parse::<DeploymentRef>().is_err());
}

#[test]
fn enrollment_accepts_only_kubernetes_names() {
    use harmony_reconciler_contracts::id::enrollable_device_id_problem;
    for ok in ["pi-kitchen-01", "a", "dev1"] {
        assert_eq!(enrollable_device_id_problem(ok), None, "{ok}");
    }
    for bad in ["Pi-Kitchen", "dev_1", "-edge", "edge-", ""] {
        let problem = enrollable_device_id_problem(bad).expect("refused");
        assert!(problem.contains("DNS-1123 label"), "{problem}");
    }
    // Ids enrolled before the rule stay valid device ids for `targetDevices`.
    assert!(harmony_reconciler_contracts::Id::new("Dev_1").is_ok());
}
