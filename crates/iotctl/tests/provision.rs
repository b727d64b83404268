//! `iotctl device provision` as a person runs it: a seed from an enrollment file
//! and an agent binary, and clear refusals of what would brick a first boot.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

fn iotctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iotctl"))
        .args(["device", "provision"])
        .args(args)
        .env_remove("BAO_TOKEN")
        .output()
        .expect("run iotctl")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn writes_a_private_seed_that_checks_the_agent_it_carries() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Any ELF executable stands in for the agent: this test's own binary.
    let agent = std::env::current_exe().expect("exe");
    let enrollment = tmp.path().join("pi-1.json");
    std::fs::write(
        &enrollment,
        r#"{"baoAddr":"https://10.0.0.1:8200","name":"pi-1","role":"device","roleId":"r","secretId":"top-secret"}"#,
    )
    .expect("enrollment");
    let ca = tmp.path().join("ca.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").expect("ca");
    let out = tmp.path().join("seed");
    let iso = tmp.path().join("seed.iso");
    let o = iotctl(&[
        "pi-1",
        "--agent",
        agent.to_str().expect("utf8"),
        "--device-nats-url",
        "tls://10.0.0.1:4222",
        "--enrollment",
        enrollment.to_str().expect("utf8"),
        "--ca-file",
        ca.to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
        "--iso",
        iso.to_str().expect("utf8"),
        "--address",
        "10.0.0.50/24",
        "--gateway",
        "10.0.0.1",
        "--mac",
        "dc:a6:32:00:00:01",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let said = text(&o);
    assert!(
        said.contains(&format!("agent for {}", std::env::consts::ARCH)),
        "{said}"
    );
    assert!(!said.contains("top-secret"), "the secret is never printed");
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&out), 0o700);
    assert_eq!(mode(&out.join("user-data")), 0o600);
    assert_eq!(mode(&iso), 0o600);
    let user_data = std::fs::read_to_string(out.join("user-data")).expect("user-data");
    assert!(
        !user_data.contains("top-secret"),
        "cloud-init keeps copies of user-data"
    );
    assert!(user_data.contains("NATS_URL=tls://10.0.0.1:4222"));
    assert!(user_data.contains("NATS_CA_FILE=/etc/iot-agent/ca.pem"));
    let secret = out.join("iot-enrollment.json");
    assert!(
        std::fs::read_to_string(&secret)
            .expect("enrollment")
            .contains("top-secret")
    );
    assert_eq!(mode(&secret), 0o600);
    assert!(
        std::fs::read_to_string(out.join("iot-ca.pem"))
            .expect("ca")
            .contains("BEGIN CERTIFICATE")
    );
    let bytes = std::fs::read(&agent).expect("agent");
    assert_eq!(std::fs::read(out.join("iot-agent")).expect("copy"), bytes);
    let network = std::fs::read_to_string(out.join("network-config")).expect("network-config");
    assert!(
        network.contains("10.0.0.50/24") && network.contains("dc:a6:32:00:00:01"),
        "{network}"
    );
}

#[test]
fn refuses_what_would_fail_on_the_device_and_names_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let agent = std::env::current_exe().expect("exe");
    let agent = agent.to_str().expect("utf8");
    let out = tmp.path().join("seed");
    let out = out.to_str().expect("utf8");
    let script = tmp.path().join("agent.sh");
    std::fs::write(&script, "#!/bin/sh\n").expect("script");
    let plain_bao = tmp.path().join("plain.json");
    std::fs::write(&plain_bao, r#"{"baoAddr":"http://10.0.0.1:8200","secretId":"s"}"#).expect("enrollment");
    let plain_bao = plain_bao.to_str().expect("utf8");
    let cases: [(&[&str], &str); 6] = [
        (
            &[
                "pi-1",
                "--agent",
                agent,
                "--device-nats-url",
                "nats://10.0.0.1:4222",
                "--out",
                out,
            ],
            "nats://10.0.0.1:4222 is not TLS",
        ),
        (
            &[
                "pi-1",
                "--agent",
                agent,
                "--device-nats-url",
                "tls://10.0.0.1:4222",
                "--enrollment",
                plain_bao,
                "--out",
                out,
            ],
            "OpenBao address http://10.0.0.1:8200 is not TLS",
        ),
        (
            &[
                "pi-1",
                "--agent",
                script.to_str().expect("utf8"),
                "--device-nats-url",
                "tls://10.0.0.1:4222",
                "--out",
                out,
            ],
            "is not a little-endian ELF executable",
        ),
        (
            &[
                "pi-1",
                "--agent",
                agent,
                "--device-nats-url",
                "tls://127.0.0.1:4222",
                "--out",
                out,
            ],
            "invalid nats_urls",
        ),
        (
            &[
                "pi 1",
                "--agent",
                agent,
                "--device-nats-url",
                "tls://10.0.0.1:4222",
                "--out",
                out,
            ],
            "invalid device_id",
        ),
        (
            &[
                "pi-1",
                "--agent",
                agent,
                "--device-nats-url",
                "tls://10.0.0.1:4222",
                "--out",
                out,
                "--address",
                "10.0.0.50/24",
                "--gateway",
                "10.0.0.1",
                "--mac",
                "dc:a6:32",
            ],
            "invalid network.mac",
        ),
    ];
    for (args, want) in cases {
        let o = iotctl(args);
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(text(&o).contains(want), "{args:?}: {}", text(&o));
        assert!(
            !std::path::Path::new(out).join("user-data").exists(),
            "nothing written for {args:?}"
        );
    }
}

#[test]
fn insecure_allows_plain_nats_for_a_debugging_network() {
    let tmp = tempfile::tempdir().expect("tmp");
    let agent = std::env::current_exe().expect("exe");
    let out = tmp.path().join("seed");
    let o = iotctl(&[
        "pi-1",
        "--agent",
        agent.to_str().expect("utf8"),
        "--device-nats-url",
        "nats://10.0.0.1:4222",
        "--insecure",
        "--out",
        out.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let user_data = std::fs::read_to_string(out.join("user-data")).expect("user-data");
    assert!(user_data.contains("NATS_INSECURE=true"));
}
