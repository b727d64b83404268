//! The tree says what each crate is: these are the dependency rules the README's
//! Layout section states, checked on the resolved graph (`cargo metadata`), so an
//! arrow that runs the wrong way fails here instead of creeping in.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// Normal (non-dev, non-build) dependencies of every package, by name.
fn normal_graph() -> anyhow::Result<BTreeMap<String, BTreeSet<String>>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .current_dir(iot_launch::paths::repo_root())
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: Value = serde_json::from_slice(&out.stdout)?;
    let name_of: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["id"].as_str()?, p["name"].as_str()?)))
        .collect();
    let mut graph = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().into_iter().flatten() {
        let Some(name) = node["id"].as_str().and_then(|id| name_of.get(id)) else {
            continue;
        };
        let deps: BTreeSet<String> = node["deps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|k| k["kind"].is_null())
            })
            .filter_map(|d| {
                d["pkg"]
                    .as_str()
                    .and_then(|id| name_of.get(id))
                    .map(|n| (*n).to_owned())
            })
            .collect();
        graph
            .entry((*name).to_owned())
            .or_insert_with(BTreeSet::new)
            .extend(deps);
    }
    Ok(graph)
}

fn reaches(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_owned()];
    while let Some(p) = todo.pop() {
        for d in graph.get(&p).into_iter().flatten() {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn no_crate_depends_on_what_its_role_forbids() -> anyhow::Result<()> {
    let graph = normal_graph()?;
    let ours: Vec<&String> = graph
        .keys()
        .filter(|n| n.starts_with("iot") || n.starts_with("harmony") || n.starts_with("example"))
        .collect();
    assert!(ours.len() >= 18, "found only {ours:?}");
    // (crate, what it must not reach, why)
    let rules: &[(&str, &[&str], &str)] = &[
        (
            "harmony-reconciler-contracts",
            &["kube", "k8s-openapi", "async-nats", "tokio"],
            "wire types every side can use",
        ),
        ("iot-timing", &[], "no dependencies at all"),
        (
            "iot-nats",
            &["kube", "k8s-openapi", "iot-api", "iot-observe", "iot-operator"],
            "the NATS client: no Kubernetes, no server side",
        ),
        (
            "iot-agent",
            &["kube", "k8s-openapi", "iot-api", "iot-operator"],
            "a device links no Kubernetes client",
        ),
        (
            "iot-observe",
            &["async-nats", "kube"],
            "what every daemon does alike, nothing else",
        ),
        ("iot-api", &["async-nats", "iot-nats"], "the Kubernetes API types only"),
        ("iot-bao", &["async-nats", "kube"], "an OpenBao client only"),
        (
            "iot-provision",
            &["async-nats", "kube"],
            "files for a device's first boot",
        ),
        (
            "iot-up",
            &["iot-operator"],
            "runs the operator's binary, never links it",
        ),
        (
            "example_iot_apply_deployment",
            &["async-nats", "iot-operator"],
            "a typed applier needs only the API types",
        ),
    ];
    let mut broken = Vec::new();
    for (krate, forbidden, why) in rules {
        let reached = reaches(&graph, krate);
        if forbidden.is_empty() && !graph.get(*krate).is_some_and(BTreeSet::is_empty) {
            broken.push(format!("{krate} has dependencies ({why})"));
        }
        for f in *forbidden {
            if reached.contains(*f) {
                broken.push(format!("{krate} reaches {f} ({why})"));
            }
        }
    }
    // Tests' helpers never ship.
    for krate in &ours {
        if ["iot-e2e", "iot-testkit", "iot-bench"].contains(&krate.as_str()) {
            continue;
        }
        if reaches(&graph, krate).contains("iot-testkit") {
            broken.push(format!("{krate} reaches iot-testkit (test helpers never ship)"));
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
    Ok(())
}
