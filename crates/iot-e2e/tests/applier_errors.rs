//! The typed applier's errors: no cluster, no CRD, bad flags. Each message must say
//! what is wrong and what to do.

use std::process::Command;

use iot_testkit::{ApiServer, cargo_bin, free_port};

fn applier(kubeconfig: &std::path::Path, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let out = Command::new(cargo_bin("example_iot_apply_deployment")?)
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ),
    ))
}

const GOOD: [&str; 6] = [
    "--target-device",
    "dev1",
    "--image",
    "localhost/iot-web:v1",
    "--port",
    "8080",
];

#[tokio::test]
async fn no_cluster_and_no_crd_are_explained() -> anyhow::Result<()> {
    // Nothing listens at this server address.
    let dir = tempfile::tempdir()?;
    let kc = dir.path().join("kubeconfig");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{}\n    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: x\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n",
            free_port()?
        ),
    )?;
    let (ok, msg) = applier(&kc, &GOOD)?;
    assert!(!ok);
    assert!(
        msg.contains("cannot talk to the Kubernetes API server at https://127.0.0.1:") && msg.contains("refused"),
        "{msg}"
    );

    // A real server without the CRD.
    let api = ApiServer::start().await?;
    let (ok, msg) = applier(&api.kubeconfig(), &GOOD)?;
    assert!(!ok);
    assert!(
        msg.contains("the Deployment CRD is not installed; run `iot-operator install`"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn invalid_flags_are_rejected_before_anything_is_sent() -> anyhow::Result<()> {
    let nowhere = std::path::Path::new("/nonexistent");
    let cases: [(&[&str], &str); 6] = [
        (
            &["--image", "x", "--print"],
            "at least one --target-device or --selector is required",
        ),
        (
            &["--target-device", "dev.1", "--image", "x", "--print"],
            "invalid --target-device",
        ),
        (&["--target-device", "dev1", "--print"], "--image is required"),
        (
            &["--target-device", "dev1", "--image", "", "--print"],
            "services[0].image: must not be empty",
        ),
        (
            &["--target-device", "dev1", "--image", "x", "--port", "70000", "--print"],
            "not a number in 1-65535",
        ),
        (
            &["--name", "Web", "--target-device", "dev1", "--image", "x", "--print"],
            "invalid --namespace/--name",
        ),
    ];
    for (args, needle) in cases {
        let (ok, msg) = applier(nowhere, args)?;
        assert!(!ok, "{args:?} was accepted");
        assert!(msg.contains(needle), "{args:?}: expected {needle:?} in {msg}");
    }
    // And a valid one prints JSON that round-trips into the typed resource.
    let (ok, json) = applier(
        nowhere,
        &[
            "--target-device",
            "dev1",
            "--image",
            "localhost/iot-web:v1",
            "--port",
            "8080",
            "--print",
        ],
    )?;
    assert!(ok, "{json}");
    let dep: iot_api::Deployment = serde_json::from_str(&json)?;
    assert_eq!(dep.spec.target_devices, ["dev1"]);
    Ok(())
}
