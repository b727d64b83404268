//! The status writer against a real API server, where writes fail: a resource that
//! is gone (404) and a status the server refuses (422). Neither is retried forever.

use std::sync::Arc;
use std::time::Duration;

use harmony_reconciler_contracts::DeploymentRef;
use iot_api::{AggregateStatus, Deployment};
use iot_operator::conditions::WriteOutcome;
use iot_operator::install::install_crd;
use iot_operator::metrics::OperatorMetrics;
use iot_operator::status_writer::{StatusInbox, StatusWriter};
use iot_testkit::ApiServer;
use kube::runtime::{reflector, watcher};
use prometheus_client::registry::Registry;

fn count(metrics: &OperatorMetrics, result: &'static str) -> u64 {
    metrics
        .status_writes
        .get_or_create(&iot_operator::metrics::result(result))
        .get()
}

fn sample(name: &str) -> anyhow::Result<Deployment> {
    let mut d: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "iot.nationtech.io/v1alpha1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"targetDevices": ["d1"], "score": {"PodmanV0": {"services": [{"name": "web", "image": "i"}]}}}
    }))?;
    d.metadata.generation = Some(1);
    Ok(d)
}

fn inputs(inbox: &StatusInbox, dep: &DeploymentRef) {
    inbox.written(dep.clone(), Some(1), WriteOutcome::written(1));
    inbox.aggregate(
        dep.clone(),
        AggregateStatus {
            observed_generation: Some(1),
            spec_hash: "h".into(),
            targets: 1,
            succeeded: 1,
            ..Default::default()
        },
    );
}

#[tokio::test]
async fn a_write_for_a_resource_that_is_gone_is_dropped_once_the_reflector_agrees() -> anyhow::Result<()> {
    let api = ApiServer::start().await?;
    let client = api.kube_client().await?;
    install_crd(client.clone(), Duration::from_secs(30)).await?;
    // The reflector still has the object (its delete event not seen yet); the server
    // does not. That is also what an API server that is restarting looks like, so the
    // writer keeps trying, with backoff...
    let (reader, mut writer) = reflector::store::<Deployment>();
    let ghost = sample("ghost")?;
    writer.apply_watcher_event(&watcher::Event::Apply(ghost.clone()));
    let inbox = StatusInbox::new(reader);
    let metrics = Arc::new(OperatorMetrics::default());
    metrics.register(&mut Registry::default());
    let task =
        tokio::spawn(StatusWriter::new(client, inbox.clone(), Duration::from_millis(100), metrics.clone()).run());
    let dep = DeploymentRef::new("default", "ghost")?;
    inputs(&inbox, &dep);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let tries = count(&metrics, "not_found");
    assert!(
        (2..=4).contains(&tries),
        "retried with backoff while the reflector has it: {tries} tries"
    );
    assert_eq!(inbox.pending(), 1, "still waiting to be written");
    // ...until the reflector sees the delete: then the entry is dropped for good.
    writer.apply_watcher_event(&watcher::Event::Delete(ghost));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(inbox.pending(), 0);
    let after_delete = count(&metrics, "not_found");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        count(&metrics, "not_found"),
        after_delete,
        "no attempts after the delete"
    );
    task.abort();
    Ok(())
}

#[tokio::test]
async fn a_status_the_server_refuses_is_not_retried_until_it_changes() -> anyhow::Result<()> {
    let api = ApiServer::start().await?;
    let client = api.kube_client().await?;
    install_crd(client.clone(), Duration::from_secs(30)).await?;
    // A stricter schema than ours, as an old or hand-edited CRD could have.
    let (ok, _, err) = api.kubectl(
        &[
            "patch",
            "crd",
            "deployments.iot.nationtech.io",
            "--type=json",
            "-p",
            r#"[{"op":"add","path":"/spec/versions/0/schema/openAPIV3Schema/properties/status/properties/aggregate/properties/targets/maximum","value":0}]"#,
        ],
        None,
    )?;
    assert!(ok, "{err}");
    let (ok, _, err) = api.kubectl(&["apply", "-f", "-"], Some(&serde_json::to_string(&sample("strict")?)?))?;
    assert!(ok, "{err}");
    let (reader, mut writer) = reflector::store::<Deployment>();
    let live: kube::Api<Deployment> = kube::Api::namespaced(client.clone(), "default");
    writer.apply_watcher_event(&watcher::Event::Apply(live.get("strict").await?));
    let inbox = StatusInbox::new(reader);
    let metrics = Arc::new(OperatorMetrics::default());
    let task =
        tokio::spawn(StatusWriter::new(client, inbox.clone(), Duration::from_millis(100), metrics.clone()).run());
    let dep = DeploymentRef::new("default", "strict")?;
    inputs(&inbox, &dep);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count(&metrics, "invalid"), 1, "refused once, not retried");
    assert_eq!(count(&metrics, "error"), 0);
    // New inputs are tried again (and refused again).
    inbox.written(dep.clone(), Some(1), WriteOutcome::written(2));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count(&metrics, "invalid"), 2);
    task.abort();
    Ok(())
}

#[tokio::test]
async fn a_silent_api_server_never_blocks_whoever_reports_status() -> anyhow::Result<()> {
    // An API server that accepts connections and never answers: the worst kind of
    // slow. (A real one cannot be made to hang on demand.)
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let config = kube::Config::new(format!("http://{addr}").parse()?);
    let client = kube::Client::try_from(config)?;
    let (reader, mut writer) = reflector::store::<Deployment>();
    for i in 0..50 {
        writer.apply_watcher_event(&watcher::Event::Apply(sample(&format!("d{i}"))?));
    }
    let inbox = StatusInbox::new(reader);
    let metrics = Arc::new(OperatorMetrics::default());
    let task = tokio::spawn(StatusWriter::new(client, inbox.clone(), Duration::from_millis(10), metrics).run());
    // Far more updates than any channel would buffer, while every write hangs.
    let fed = tokio::time::timeout(Duration::from_secs(5), async {
        for round in 0..200u32 {
            for i in 0..50 {
                let dep = DeploymentRef::new("default", format!("d{i}")).expect("ref");
                inbox.written(dep, Some(1), WriteOutcome::written(round as usize));
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(fed.is_ok(), "reporting status blocked behind the API server");
    task.abort();
    holder.abort();
    Ok(())
}
