//! `iotctl rollout status|pause|resume|promote|abort` against real API servers: the
//! CRD-only server for what the commands print, write and refuse, and the full
//! kube-apiserver for RBAC and the audit log. The test plays the operator: it
//! writes `status.rollout` itself (a merge patch on the status subresource), since
//! what is under test is the CLI, not the operator's decisions.

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use iot_api::{ABORT_ANNOTATION, Deployment, PROMOTE_ANNOTATION};
use iot_e2e::chart::{can_i, docs_of_kind, render, service_account_token};
use iot_testkit::{ApiServer, KubeApiServer, cargo_bin, wait_until};
use kube::Api;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// How long a watching iotctl may take to notice a change and end.
const EXIT_WITHIN: Duration = Duration::from_secs(30);

struct Run {
    code: Option<i32>,
    out: String,
    err: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

fn iotctl(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<Run> {
    let out = Command::new(cargo_bin("iotctl")?)
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .output()?;
    Ok(Run {
        code: out.status.code(),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The CRD-only API server with the platform's CRDs, as `iot-operator install`
/// puts them.
async fn api_server() -> anyhow::Result<(ApiServer, Api<Deployment>)> {
    let api = ApiServer::start().await?;
    iot_launch::operator::install_crd(&cargo_bin("iot-operator")?, &api.kubeconfig())?;
    let deployments = Api::namespaced(api.kube_client().await?, "default");
    Ok((api, deployments))
}

/// Two batches: one device that waits for promotion once it passed, then the rest.
fn two_batches() -> Value {
    json!({"batches": [{"limit": 1, "pause": {}}, {"limit": "100%"}]})
}

/// A Deployment of three devices, with `rollout` as its spec.rollout (`Null`: none).
async fn create(api: &Api<Deployment>, name: &str, rollout: Value) -> anyhow::Result<()> {
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "iot.nationtech.io/v1alpha1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "targetDevices": ["pi-1", "pi-2", "pi-3"],
            "score": {"PodmanV0": {"services": [{"name": "web", "image": "localhost/iot-web:v2"}]}},
            "rollout": rollout,
        },
    }))?;
    api.create(&PostParams::default(), &d).await?;
    Ok(())
}

/// Plays the operator: merges `status` into the Deployment's status, as of its
/// current generation.
async fn operator_writes(api: &Api<Deployment>, name: &str, mut status: Value) -> anyhow::Result<()> {
    let generation = api.get(name).await?.metadata.generation;
    status["observedGeneration"] = json!(generation);
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(json!({"status": status})))
        .await?;
    Ok(())
}

/// A whole `status.rollout` of revision 2 (stable 1) over three devices, every key
/// given so that a merge patch replaces the previous one.
fn rollout(phase: &str, current_batch: u32, batches: Value, clusters: Value) -> Value {
    let succeeded: u64 = batches
        .as_array()
        .map(|b| b.iter().filter_map(|b| b["succeeded"].as_u64()).sum())
        .unwrap_or(0);
    json!({
        "revision": 2,
        "stableRevision": 1,
        "phase": phase,
        "currentBatch": current_batch,
        "matchedAtStart": 3,
        "startedAt": "2026-01-01T00:00:00Z",
        "batches": batches,
        "message": "",
        "failureClusters": clusters,
        "summary": format!("batch {current_batch}/2, {succeeded}/3"),
    })
}

fn progressing() -> Value {
    rollout(
        "Progressing",
        1,
        json!([{"selected": 1, "dispatched": 1}, {"selected": 2}]),
        json!([]),
    )
}

/// Batch 1 passed and waits for promotion.
fn awaiting_promotion() -> Value {
    rollout(
        "Paused",
        1,
        json!([{"selected": 1, "dispatched": 1, "succeeded": 1, "passedAt": "2026-01-01T00:01:00Z"}, {"selected": 2}]),
        json!([]),
    )
}

fn complete() -> Value {
    rollout(
        "Complete",
        2,
        json!([
            {"selected": 1, "dispatched": 1, "succeeded": 1, "passedAt": "2026-01-01T00:01:00Z"},
            {"selected": 2, "dispatched": 2, "succeeded": 2, "passedAt": "2026-01-01T00:02:00Z"},
        ]),
        json!([]),
    )
}

fn rolled_back() -> Value {
    let mut r = rollout(
        "RolledBack",
        1,
        json!([{"selected": 1, "dispatched": 1, "failed": 1}, {"selected": 2}]),
        json!([{
            "message": "service web: exec format error",
            "devices": 1,
            "exampleDevices": ["pi-1"],
            "sharedLabels": {"hw": "rpi3"},
        }]),
    );
    r["message"] = json!("batch 1 failed its gate: 1 of 1 device failed");
    r
}

/// Rows of the batch table, split on whitespace (header first).
fn batch_rows(out: &str) -> Vec<Vec<&str>> {
    out.lines()
        .skip_while(|l| !l.starts_with("BATCH"))
        .take_while(|l| !l.is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect()
}

/// The Deployment as stored, every field (spec.rollout.paused absent or not).
async fn raw(api: &Api<Deployment>, name: &str) -> anyhow::Result<DynamicObject> {
    let dynamic: Api<DynamicObject> = Api::namespaced_with(
        api.clone().into_client(),
        "default",
        &ApiResource::erase::<Deployment>(&()),
    );
    Ok(dynamic.get(name).await?)
}

fn annotation(d: &DynamicObject, key: &str) -> Option<String> {
    d.metadata.annotations.as_ref()?.get(key).cloned()
}

#[tokio::test]
async fn rollout_status_shows_batches_and_failures_and_exits_0_only_when_complete() -> anyhow::Result<()> {
    let (api, deployments) = api_server().await?;
    let k = api.kubeconfig();
    create(&deployments, "web", two_batches()).await?;

    // Progressing, batch 1 of 2: plain lines (not a terminal), exit 1.
    operator_writes(
        &deployments,
        "web",
        json!({"currentRevision": 2, "rollout": progressing()}),
    )
    .await?;
    let run = iotctl(&k, &["rollout", "status", "default/web"])?;
    assert_eq!(run.code, Some(1), "{}{}", run.out, run.err);
    let lines: Vec<&str> = run.out.lines().collect();
    assert_eq!(
        lines[..2],
        [
            "default/web: progressive rollout of revision 2 (stable revision 1)",
            "phase:    Progressing (batch 1/2, 0/3)",
        ],
        "{}",
        run.out
    );
    let rows = batch_rows(&run.out);
    assert_eq!(
        rows,
        [
            vec![
                "BATCH",
                "STATE",
                "SELECTED",
                "DISPATCHED",
                "SUCCEEDED",
                "FAILED",
                "TIMED-OUT",
                "SILENT",
                "NEVER-ACK",
                "OFFLINE",
                "PENDING-PULL"
            ],
            vec!["1/2", "in", "progress", "1", "1", "0", "0", "0", "0", "0", "0", "0"],
            vec!["2/2", "waiting", "2", "0", "0", "0", "0", "0", "0", "0", "0"],
        ],
        "{}",
        run.out
    );
    assert!(
        !run.out.contains('█') && !run.out.contains('░'),
        "bars in a pipe: {}",
        run.out
    );
    assert!(
        run.out
            .contains("next: iotctl rollout status default/web --watch   # follow it"),
        "{}",
        run.out
    );
    assert!(
        run.err
            .contains("default/web: not complete: the rollout of revision 2 is progressing (batch 1/2, 0/3)"),
        "{}",
        run.err
    );

    // -o json: status.rollout as stored (with the defaults the API server filled in).
    let run = iotctl(&k, &["rollout", "status", "default/web", "-o", "json"])?;
    assert_eq!(run.code, Some(1));
    let printed: Value = serde_json::from_str(&run.out)?;
    assert_eq!(printed, raw(&deployments, "web").await?.data["status"]["rollout"]);
    assert_eq!(
        (
            &printed["revision"],
            &printed["phase"],
            &printed["batches"][0]["dispatched"]
        ),
        (&json!(2), &json!("Progressing"), &json!(1))
    );

    // Complete, for the revision the spec is: exit 0.
    operator_writes(
        &deployments,
        "web",
        json!({"currentRevision": 2, "rollout": complete()}),
    )
    .await?;
    let run = iotctl(&k, &["rollout", "status", "default/web"])?;
    assert!(run.ok(), "{}{}", run.out, run.err);
    assert!(run.out.contains("phase:    Complete (batch 2/2, 3/3)"), "{}", run.out);
    assert_eq!(batch_rows(&run.out)[2][..2], ["2/2", "passed"], "{}", run.out);
    assert!(!run.out.contains("next:"), "{}", run.out);
    // ... but complete for revision 2 says nothing about revision 3.
    operator_writes(&deployments, "web", json!({"currentRevision": 3})).await?;
    let run = iotctl(&k, &["rollout", "status", "default/web"])?;
    assert_eq!(run.code, Some(1));
    assert!(
        run.out
            .contains("the spec is now revision 3; its rollout has not started yet (shown: revision 2)"),
        "{}",
        run.out
    );

    // Rolled back: exit 1, with the failures grouped and the labels they share.
    operator_writes(
        &deployments,
        "web",
        json!({"currentRevision": 2, "rollout": rolled_back()}),
    )
    .await?;
    let run = iotctl(&k, &["rollout", "status", "default/web"])?;
    assert_eq!(run.code, Some(1));
    for said in [
        "phase:    RolledBack (batch 1/2, 0/3)",
        "message:  batch 1 failed its gate: 1 of 1 device failed",
        "failures, grouped by error (1):",
        "  1 device(s): service web: exec format error",
        "    shared labels: hw=rpi3",
        "    for example:   pi-1",
        "next: iotctl rollout undo default/web",
    ] {
        assert!(run.out.contains(said), "{said:?} missing:\n{}", run.out);
    }
    assert_eq!(batch_rows(&run.out)[1][..3], ["1/2", "rolled", "back"], "{}", run.out);
    assert!(
        run.err
            .contains("the rollout of revision 2 is rolled back (batch 1/2, 0/3): batch 1 failed its gate"),
        "{}",
        run.err
    );

    // Without spec.rollout: every device at once, judged by the aggregate.
    create(&deployments, "plain", Value::Null).await?;
    let aggregate = |succeeded: u32| {
        json!({"currentRevision": 1, "aggregate": {
            "specHash": "h", "targets": 3, "succeeded": succeeded, "failed": 0, "pending": 3 - succeeded,
            "unreported": 0, "revision": 1, "revisionSummary": format!("{succeeded}/3 on rev 1"),
        }})
    };
    operator_writes(&deployments, "plain", aggregate(3)).await?;
    let run = iotctl(&k, &["rollout", "status", "default/plain"])?;
    assert!(run.ok(), "{}{}", run.out, run.err);
    assert!(
        run.out
            .starts_with("default/plain: no spec.rollout: every matched device gets a new revision at once\n"),
        "{}",
        run.out
    );
    assert!(
        run.out
            .contains("devices:  3/3 on rev 1; 3 succeeded, 0 failed, 0 pending, 0 unreported of 3 target(s)"),
        "{}",
        run.out
    );
    operator_writes(&deployments, "plain", aggregate(2)).await?;
    let run = iotctl(&k, &["rollout", "status", "default/plain"])?;
    assert_eq!(run.code, Some(1));
    assert!(run.err.contains("2/3 devices run the current revision"), "{}", run.err);
    let run = iotctl(&k, &["rollout", "status", "default/plain", "-o", "json"])?;
    assert_eq!(run.out.trim(), "null");

    // A reader that is gone before iotctl writes: it ends quietly.
    let mut child = Command::new(cargo_bin("iotctl")?)
        .env("KUBECONFIG", &k)
        .args(["rollout", "status", "default/web"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    drop(child.stdout.take());
    let out = child.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code().is_some(), "killed by a signal: {}", out.status);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");

    // Refusals that read nothing.
    let run = iotctl(&k, &["rollout", "status", "default/nope"])?;
    assert_eq!(run.code, Some(1));
    assert!(run.err.contains("no Deployment default/nope"), "{}", run.err);
    let run = iotctl(&k, &["rollout", "status", "default/web", "--timeout", "1s"])?;
    assert!(!run.ok() && run.err.contains("--watch"), "{}", run.err);
    Ok(())
}

/// An iotctl that runs on, its stdout read line by line as it comes.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn spawn(mut cmd: Command) -> anyhow::Result<Self> {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// Waits for a line `ok` accepts.
    fn wait_line(&mut self, what: &str, ok: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        let deadline = Instant::now() + EXIT_WITHIN;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if ok(&line) {
                        return Ok(line);
                    }
                }
                Err(_) => anyhow::bail!("no line {what} within {EXIT_WITHIN:?}; saw:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Waits for the process to end (killing it after `EXIT_WITHIN`); returns its
    /// exit code, all it printed and its stderr.
    async fn finish(mut self) -> anyhow::Result<(Option<i32>, String, String)> {
        let deadline = Instant::now() + EXIT_WITHIN;
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                self.child.wait()?;
                anyhow::bail!(
                    "still running after {EXIT_WITHIN:?}; printed:\n{}",
                    self.seen.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            e.read_to_string(&mut err)?;
        }
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        Ok((status.code(), self.seen.join("\n"), err))
    }
}

fn watch(kubeconfig: &Path, deployment: &str, timeout: &str) -> anyhow::Result<Running> {
    let mut cmd = Command::new(cargo_bin("iotctl")?);
    cmd.env("KUBECONFIG", kubeconfig)
        .args(["rollout", "status", deployment, "--watch", "--timeout", timeout]);
    Running::spawn(cmd)
}

#[tokio::test]
async fn rollout_status_watch_ends_when_complete_rolled_back_or_timed_out() -> anyhow::Result<()> {
    let (api, deployments) = api_server().await?;
    let k = api.kubeconfig();
    for name in ["to-complete", "to-roll-back", "stuck", "piped"] {
        create(&deployments, name, two_batches()).await?;
        operator_writes(
            &deployments,
            name,
            json!({"currentRevision": 2, "rollout": progressing()}),
        )
        .await?;
    }

    // Completes while watched: re-rendered at each change, exit 0.
    let started = Instant::now();
    let mut w = watch(&k, "default/to-complete", "2m")?;
    w.wait_line("with the first phase", |l| l.starts_with("phase:    Progressing"))?;
    operator_writes(
        &deployments,
        "to-complete",
        json!({"rollout": rollout("Progressing", 2, json!([
            {"selected": 1, "dispatched": 1, "succeeded": 1, "passedAt": "2026-01-01T00:01:00Z"},
            {"selected": 2, "dispatched": 2},
        ]), json!([]))}),
    )
    .await?;
    w.wait_line("with batch 2", |l| l.starts_with("phase:    Progressing (batch 2/2"))?;
    operator_writes(&deployments, "to-complete", json!({"rollout": complete()})).await?;
    let (code, out, err) = w.finish().await?;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("phase:    Complete"), "{out}");
    assert!(err.is_empty(), "{err}");
    println!(
        "watch: started, followed two changes and ended in {:?}",
        started.elapsed()
    );

    // Rolled back while watched: exit 1, saying so.
    let mut w = watch(&k, "default/to-roll-back", "2m")?;
    w.wait_line("with the first phase", |l| l.starts_with("phase:"))?;
    operator_writes(&deployments, "to-roll-back", json!({"rollout": rolled_back()})).await?;
    let (code, out, err) = w.finish().await?;
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(out.contains("shared labels: hw=rpi3"), "{out}");
    assert!(
        err.contains("default/to-roll-back: the rollout of revision 2 is rolled back"),
        "{err}"
    );

    // Nothing happens: exit 1 at the timeout, with where it stood.
    let started = Instant::now();
    let (code, out, err) = watch(&k, "default/stuck", "2s")?.finish().await?;
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains("default/stuck: the rollout did not complete within 2s: the rollout of revision 2 is progressing"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());

    // `| head -1`: head is gone after the first line; the next change ends iotctl
    // quietly, without a panic.
    let bin = cargo_bin("iotctl")?;
    let mut cmd = Command::new("bash");
    cmd.env("KUBECONFIG", &k).args(["-o", "pipefail", "-c"]).arg(format!(
        "'{}' rollout status default/piped --watch --timeout 2m | head -1",
        bin.display()
    ));
    let mut piped = Running::spawn(cmd)?;
    let first = piped.wait_line("from head", |_| true)?;
    assert_eq!(
        first,
        "default/piped: progressive rollout of revision 2 (stable revision 1)"
    );
    operator_writes(&deployments, "piped", json!({"rollout": awaiting_promotion()})).await?;
    let (code, _, err) = piped.finish().await?;
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    Ok(())
}

#[tokio::test]
async fn rollout_pause_resume_promote_abort_edit_the_deployment_or_refuse_saying_why() -> anyhow::Result<()> {
    let (api, deployments) = api_server().await?;
    let k = api.kubeconfig();
    create(&deployments, "web", two_batches()).await?;
    create(&deployments, "plain", Value::Null).await?;
    create(&deployments, "fresh", two_batches()).await?;
    operator_writes(
        &deployments,
        "web",
        json!({"currentRevision": 2, "rollout": progressing()}),
    )
    .await?;

    // promote: refused while no batch waits for it, naming what the rollout does.
    let run = iotctl(&k, &["rollout", "promote", "default/web"])?;
    assert_eq!(run.code, Some(1));
    assert!(
        run.err.contains(
            "cannot promote default/web: the rollout of revision 2 is progressing (batch 1/2, 0/3); no batch waits for promotion"
        ),
        "{}",
        run.err
    );
    assert_eq!(annotation(&raw(&deployments, "web").await?, PROMOTE_ANNOTATION), None);

    // Batch 1 passed and waits: promote names revision and batch.
    operator_writes(&deployments, "web", json!({"rollout": awaiting_promotion()})).await?;
    let run = iotctl(&k, &["rollout", "status", "default/web"])?;
    assert!(
        run.out
            .contains("next: iotctl rollout promote default/web   # batch 1/2 passed and waits for you"),
        "{}",
        run.out
    );
    let run = iotctl(&k, &["rollout", "promote", "default/web"])?;
    assert!(run.ok(), "{}", run.err);
    assert!(
        run.err.contains(
            "default/web: promoted batch 1/2 of revision 2 (iot.nationtech.io/rollout-promote=2/1); the operator goes on with batch 2/2"
        ),
        "{}",
        run.err
    );
    assert_eq!(
        annotation(&raw(&deployments, "web").await?, PROMOTE_ANNOTATION).as_deref(),
        Some("2/1")
    );
    let run = iotctl(&k, &["rollout", "status", "default/web"])?;
    assert!(
        run.out.contains(
            "asked:    promotion of batch 1/2 (iot.nationtech.io/rollout-promote=2/1); waiting for the operator"
        ),
        "{}",
        run.out
    );
    let run = iotctl(&k, &["rollout", "promote", "default/web", "-o", "json"])?;
    assert!(run.ok(), "{}", run.err);
    let said: Value = serde_json::from_str(&run.out)?;
    assert_eq!((&said["batch"], &said["changed"]), (&json!(1), &json!(false)), "{said}");

    // pause / resume: spec.rollout.paused set, then removed; the batches stay.
    let run = iotctl(&k, &["rollout", "pause", "default/web"])?;
    assert!(run.ok(), "{}", run.err);
    assert!(
        run.err
            .contains("default/web: rollout paused (spec.rollout.paused: true)"),
        "{}",
        run.err
    );
    let d = raw(&deployments, "web").await?;
    assert_eq!(d.data["spec"]["rollout"]["paused"], json!(true));
    assert_eq!(d.data["spec"]["rollout"]["batches"], two_batches()["batches"]);
    let run = iotctl(&k, &["rollout", "pause", "default/web"])?;
    assert!(run.ok() && run.err.contains("already paused"), "{}", run.err);
    // Paused by the flag at a batch that has not passed: resume, not promote.
    operator_writes(
        &deployments,
        "web",
        json!({"rollout": rollout("Paused", 1, json!([{"selected": 1, "dispatched": 1}, {"selected": 2}]), json!([]))}),
    )
    .await?;
    let run = iotctl(&k, &["rollout", "promote", "default/web"])?;
    assert_eq!(run.code, Some(1));
    assert!(
        run.err
            .contains("by spec.rollout.paused: `iotctl rollout resume default/web` goes on"),
        "{}",
        run.err
    );
    let run = iotctl(&k, &["rollout", "status", "default/web"])?;
    assert!(
        run.out.contains("next: iotctl rollout resume default/web"),
        "{}",
        run.out
    );
    let run = iotctl(&k, &["rollout", "resume", "default/web", "-o", "json"])?;
    assert!(run.ok(), "{}", run.err);
    assert_eq!(
        serde_json::from_str::<Value>(&run.out)?,
        json!({"deployment": "default/web", "paused": false, "changed": true})
    );
    let d = raw(&deployments, "web").await?;
    assert!(d.data["spec"]["rollout"].get("paused").is_none(), "{}", d.data["spec"]);
    assert_eq!(d.data["spec"]["rollout"]["batches"], two_batches()["batches"]);

    // abort: the revision under way.
    let run = iotctl(&k, &["rollout", "abort", "default/web"])?;
    assert!(run.ok(), "{}", run.err);
    assert!(
        run.err.contains(
            "default/web: abort of revision 2 requested (iot.nationtech.io/rollout-abort=2): the operator stops the rollout and writes revision 1 back"
        ),
        "{}",
        run.err
    );
    assert_eq!(
        annotation(&raw(&deployments, "web").await?, ABORT_ANNOTATION).as_deref(),
        Some("2")
    );
    // ... refused once the rollout is over.
    operator_writes(&deployments, "web", json!({"rollout": complete()})).await?;
    let run = iotctl(&k, &["rollout", "abort", "default/web"])?;
    assert_eq!(run.code, Some(1));
    assert!(
        run.err.contains(
            "cannot abort default/web: the rollout of revision 2 is complete (batch 2/2, 3/3): nothing to abort (to go back to an earlier revision: `iotctl rollout undo default/web`)"
        ),
        "{}",
        run.err
    );
    let run = iotctl(&k, &["rollout", "promote", "default/web"])?;
    assert!(run.code == Some(1) && run.err.contains("is complete"), "{}", run.err);
    operator_writes(&deployments, "web", json!({"rollout": rolled_back()})).await?;
    let run = iotctl(&k, &["rollout", "abort", "default/web"])?;
    assert!(run.code == Some(1) && run.err.contains("is rolled back"), "{}", run.err);

    // Without spec.rollout, every command refuses and writes nothing.
    let before = raw(&deployments, "plain").await?.metadata.resource_version;
    for verb in ["pause", "resume", "promote", "abort"] {
        let run = iotctl(&k, &["rollout", verb, "default/plain"])?;
        assert_eq!(run.code, Some(1), "{verb}");
        assert!(
            run.err.contains(&format!(
                "cannot {verb} default/plain: it has no spec.rollout, so there is no rollout to {verb}: every matched device gets a new revision at once"
            )),
            "{verb}: {}",
            run.err
        );
    }
    assert_eq!(raw(&deployments, "plain").await?.metadata.resource_version, before);
    // With spec.rollout but no rollout started yet: nothing to promote or abort.
    for verb in ["promote", "abort"] {
        let run = iotctl(&k, &["rollout", verb, "default/fresh"])?;
        assert!(
            run.code == Some(1)
                && run.err.contains(&format!(
                    "cannot {verb} default/fresh: the operator has not started a rollout yet (no status.rollout)"
                )),
            "{verb}: {}",
            run.err
        );
    }
    let run = iotctl(&k, &["rollout", "pause", "default/nope"])?;
    assert!(
        run.code == Some(1) && run.err.contains("no Deployment default/nope"),
        "{}",
        run.err
    );
    Ok(())
}

#[tokio::test]
async fn rollout_commands_follow_rbac_and_the_audit_log_names_who_paused_and_aborted() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let api = KubeApiServer::start_in(dir.path(), None).await?;
    // The chart's CRDs, and its fleet roles bound to a deployer and a viewer
    // ServiceAccount.
    let rendered = render("iot", "iot-system", &[])?;
    for crd in docs_of_kind(&rendered, "CustomResourceDefinition")? {
        let (ok, _, err) = api.kubectl(&["apply", "-f", "-"], Some(&crd.to_string()))?;
        anyhow::ensure!(ok, "{err}");
    }
    let (ok, _, err) = api.kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "crd/deployments.iot.nationtech.io",
            "--timeout=60s",
        ],
        None,
    )?;
    anyhow::ensure!(ok, "{err}");
    for role in docs_of_kind(&rendered, "ClusterRole")? {
        if matches!(
            role["metadata"]["name"].as_str(),
            Some("iot-fleet-deployer" | "iot-fleet-viewer")
        ) {
            let (ok, _, err) = api.kubectl(&["apply", "-f", "-"], Some(&role.to_string()))?;
            anyhow::ensure!(ok, "{err}");
        }
    }
    for (sa, role) in [("deployer", "iot-fleet-deployer"), ("viewer", "iot-fleet-viewer")] {
        let clusterrole = format!("--clusterrole={role}");
        let subject = format!("--serviceaccount=default:{sa}");
        for args in [
            vec!["create", "serviceaccount", sa, "-n", "default"],
            vec!["create", "clusterrolebinding", sa, &clusterrole, &subject],
        ] {
            let (ok, _, err) = api.kubectl(&args, None)?;
            anyhow::ensure!(ok, "kubectl {args:?}: {err}");
        }
    }
    let admin = api.kube_client().await?;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), "default");
    create(&deployments, "web", two_batches()).await?;
    let mut suspended = progressing();
    suspended["phase"] = json!("Suspended");
    operator_writes(&deployments, "web", json!({"currentRevision": 2, "rollout": suspended})).await?;
    let deployer_user = "system:serviceaccount:default:deployer";
    let viewer_user = "system:serviceaccount:default:viewer";
    let deployer = api.token_kubeconfig("deployer", &service_account_token(&admin, "default", "deployer").await?)?;
    let viewer = api.token_kubeconfig("viewer", &service_account_token(&admin, "default", "viewer").await?)?;
    wait_until(Duration::from_secs(30), "the deployer binding in effect", || async {
        can_i(
            &admin,
            deployer_user,
            "patch",
            "iot.nationtech.io",
            "deployments",
            Some("default"),
            Some("web"),
        )
        .await
        .ok()?
        .then_some(())
    })
    .await?;

    // The viewer reads the rollout, and may change nothing: said plainly, exit 1.
    let run = iotctl(&viewer, &["rollout", "status", "default/web"])?;
    assert_eq!(run.code, Some(1), "{}", run.err);
    assert!(run.out.contains("phase:    Suspended"), "{}{}", run.out, run.err);
    assert!(
        run.out.contains("next: iotctl rollout abort default/web"),
        "{}",
        run.out
    );
    for (verb, doing) in [("pause", "pause the rollout of"), ("abort", "abort")] {
        let run = iotctl(&viewer, &["rollout", verb, "default/web"])?;
        assert_eq!(run.code, Some(1), "{verb}: {}", run.err);
        assert!(
            run.err.contains(&format!(
                "cannot {doing} default/web: permission denied: {viewer_user} cannot patch deployments.iot.nationtech.io in namespace default"
            )),
            "{verb}: {}",
            run.err
        );
    }
    let d = raw(&deployments, "web").await?;
    assert_eq!(d.data["spec"]["rollout"].get("paused"), None);
    assert_eq!(annotation(&d, ABORT_ANNOTATION), None);

    // The deployer may.
    let run = iotctl(&deployer, &["rollout", "pause", "default/web"])?;
    assert!(run.ok(), "{}", run.err);
    let run = iotctl(&deployer, &["rollout", "abort", "default/web"])?;
    assert!(run.ok(), "{}", run.err);
    let d = raw(&deployments, "web").await?;
    assert_eq!(d.data["spec"]["rollout"]["paused"], json!(true));
    assert_eq!(annotation(&d, ABORT_ANNOTATION).as_deref(), Some("2"));

    // The audit log names who did what to the Deployment: the deployer's pause and
    // abort allowed, the viewer's two attempts forbidden.
    let patches = |user: &str, decision: &str| -> anyhow::Result<usize> {
        Ok(api
            .audit()?
            .iter()
            .filter(|e| {
                e.user == user
                    && e.verb == "patch"
                    && e.decision == decision
                    && e.uri.contains("/namespaces/default/deployments/web")
            })
            .count())
    };
    let counts = wait_until(Duration::from_secs(10), "the audit log", || async {
        let counts = (
            patches(deployer_user, "allow").ok()?,
            patches(viewer_user, "forbid").ok()?,
        );
        (counts == (2, 2)).then_some(counts)
    })
    .await;
    assert!(
        counts.is_ok(),
        "(deployer allowed, viewer forbidden) = ({:?}, {:?})",
        patches(deployer_user, "allow"),
        patches(viewer_user, "forbid")
    );
    assert_eq!(patches(viewer_user, "allow")?, 0);
    Ok(())
}
