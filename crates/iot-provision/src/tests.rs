use std::os::unix::fs::PermissionsExt;

use serde_yaml_ng::Value;

use super::*;

fn device() -> DeviceProvision {
    DeviceProvision {
        device_id: "pi-kitchen_1".into(),
        nats_urls: vec!["tls://10.77.0.1:4222".into(), "tls://10.77.0.2:4222".into()],
        enrollment: Some(r#"{"baoAddr":"https://10.77.0.1:8200","name":"pi-kitchen_1","role":"device","roleId":"r","secretId":"s3cret"}"#.into()),
        ca_pem: Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into()),
        metrics_addr: Some("0.0.0.0:9464".parse().expect("addr")),
        network: Some(StaticNetwork {
            mac: "52:54:00:AB:00:01".into(),
            address: "10.77.0.101/24".into(),
            gateway: "10.77.0.1".parse().expect("ip"),
            nameservers: vec![],
        }),
        admin: Some(AdminUser {
            name: "fleet".into(),
            password_hash: Some("$6$salt$hash".into()),
            ssh_authorized_keys: vec!["ssh-ed25519 AAAA test".into()],
        }),
        agent_sha256: "ab".repeat(32),
        preload_images: vec!["images.tar".into()],
        agent_env: vec![("IOT_STOP_TIMEOUT".into(), "5s".into())],
        ..Default::default()
    }
}

fn parsed(p: &DeviceProvision) -> Value {
    let text = p.user_data().expect("user-data");
    assert!(
        text.starts_with("#cloud-config\n"),
        "cloud-init ignores user-data without the header"
    );
    serde_yaml_ng::from_str(&text).expect("user-data is YAML")
}

fn file<'a>(doc: &'a Value, path: &str) -> &'a Value {
    doc["write_files"]
        .as_sequence()
        .expect("write_files")
        .iter()
        .find(|f| f["path"].as_str() == Some(path))
        .unwrap_or_else(|| panic!("{path} not written"))
}

#[test]
fn user_data_installs_the_agent_config_identity_and_unit() {
    let doc = parsed(&device());
    assert_eq!(doc["hostname"].as_str(), Some("pi-kitchen-1"));
    let env = file(&doc, AGENT_ENV_FILE);
    assert_eq!(env["permissions"].as_str(), Some("0600"));
    assert_eq!(
        env["content"].as_str(),
        Some(
            "IOT_DEVICE_ID=pi-kitchen_1\nNATS_URL=tls://10.77.0.1:4222,tls://10.77.0.2:4222\nNATS_IDENTITY=/etc/iot-agent/identity.json\nNATS_CA_FILE=/etc/iot-agent/ca.pem\nBAO_CACERT=/etc/iot-agent/ca.pem\nIOT_METRICS_ADDR=0.0.0.0:9464\nIOT_STOP_TIMEOUT=\"5s\"\n"
        )
    );
    // The secret is not in user-data (cloud-init keeps copies of it): it is a seed
    // file of its own, which the script installs and then removes from the seed.
    let text = device().user_data().expect("user-data");
    assert!(!text.contains("s3cret"), "the enrollment secret is in user-data");
    let unit = file(&doc, "/etc/systemd/system/iot-agent.service");
    let unit = unit["content"].as_str().expect("unit");
    for line in [
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "ProtectSystem=strict",
        "WantedBy=multi-user.target",
    ] {
        assert!(unit.contains(line), "unit lacks {line:?}");
    }
    let script = file(&doc, INSTALL_SCRIPT);
    assert_eq!(script["permissions"].as_str(), Some("0755"));
    let script = script["content"].as_str().expect("script");
    assert!(script.contains(&"ab".repeat(32)), "the checksum is checked");
    let enrollment_sha = sha256_text(&device().enrollment_file().expect("enrollment"));
    assert!(
        script.contains(&format!(
            "echo '{enrollment_sha}  {AGENT_IDENTITY_FILE}.new' | sha256sum --check"
        )),
        "the enrollment is checked before it is installed"
    );
    assert!(script.contains(&format!("install -D -m 0600 \"$src/{ENROLLMENT_FILE}\"")));
    assert!(script.contains(&format!("install -D -m 0644 \"$src/{CA_FILE}\" {AGENT_CA_FILE}.new")));
    let scrub = script
        .find(&format!("shred -n 1 -z -u \"$src/{ENROLLMENT_FILE}\""))
        .expect("scrubs the seed");
    let enabled = script.find("systemctl enable").expect("enables");
    assert!(enabled < scrub, "the seed's copy goes only after a good install");
    assert!(script.contains("podman load --quiet --input \"$src/images.tar\""));
    let runcmd: Vec<Vec<String>> = serde_yaml_ng::from_value(doc["runcmd"].clone()).expect("runcmd");
    assert_eq!(
        runcmd,
        vec![vec![INSTALL_SCRIPT.to_owned()]],
        "one command, so a failure stops it"
    );
    let enable = script
        .find("systemctl enable --now podman.socket iot-agent.service")
        .expect("enables");
    let installed = script.find("mv /usr/local/bin/iot-agent.new").expect("installs");
    assert!(
        installed < enable,
        "the unit is enabled only after the agent is installed"
    );
    let user = &doc["users"][0];
    assert_eq!(user["name"].as_str(), Some("fleet"));
    assert_eq!(user["lock_passwd"].as_bool(), Some(false));
    assert_eq!(doc["ssh_pwauth"].as_bool(), Some(false));
}

#[test]
fn without_enrollment_no_identity_file_is_written_or_named() {
    let mut p = device();
    p.enrollment = None;
    p.admin = None;
    let doc = parsed(&p);
    let files = doc["write_files"].as_sequence().expect("files");
    assert!(files.iter().all(|f| f["path"].as_str() != Some(AGENT_IDENTITY_FILE)));
    assert!(!p.agent_env_file().contains("NATS_IDENTITY"));
    assert!(doc.get("users").is_none(), "no users key: the image's default stays");
}

#[test]
fn the_instance_id_is_stable_per_seed_and_new_for_a_new_seed() {
    let p = device();
    let meta = p.meta_data().expect("meta");
    let doc: Value = serde_yaml_ng::from_str(&meta).expect("yaml");
    let id = doc["instance-id"].as_str().expect("id").to_owned();
    assert!(id.starts_with("iot-pi-kitchen_1-"), "{id}");
    assert_eq!(doc["local-hostname"].as_str(), Some("pi-kitchen-1"));
    assert_eq!(
        p.meta_data().expect("again"),
        meta,
        "same seed, same id: reboots do not re-provision"
    );
    let mut re = device();
    re.enrollment = Some(r#"{"roleId":"r2","secretId":"new"}"#.into());
    let other: Value = serde_yaml_ng::from_str(&re.meta_data().expect("meta")).expect("yaml");
    assert_ne!(
        other["instance-id"].as_str(),
        Some(id.as_str()),
        "a new enrollment is provisioned anew"
    );
}

#[test]
fn network_config_matches_the_mac_and_sets_the_address() {
    let text = device().network_config().expect("render").expect("static");
    let doc: Value = serde_yaml_ng::from_str(&text).expect("yaml");
    assert_eq!(doc["version"].as_u64(), Some(2));
    let eth = &doc["ethernets"]["uplink"];
    assert_eq!(eth["match"]["macaddress"].as_str(), Some("52:54:00:ab:00:01"));
    assert_eq!(eth["addresses"][0].as_str(), Some("10.77.0.101/24"));
    assert_eq!(eth["gateway4"].as_str(), Some("10.77.0.1"));
    let mut p = device();
    p.network = None;
    assert!(p.network_config().expect("render").is_none());
}

#[test]
fn bad_fields_are_named() {
    type Breakage = Box<dyn Fn(&mut DeviceProvision)>;
    let cases: Vec<(&str, Breakage)> = vec![
        ("device_id", Box::new(|p| p.device_id = "pi kitchen".into())),
        ("nats_urls", Box::new(|p| p.nats_urls = vec![])),
        (
            "nats_urls",
            Box::new(|p| p.nats_urls = vec!["nats://127.0.0.1:4222".into()]),
        ),
        ("nats_urls", Box::new(|p| p.nats_urls = vec!["http://x:1".into()])),
        ("enrollment", Box::new(|p| p.enrollment = Some("role_id=x".into()))),
        ("agent_sha256", Box::new(|p| p.agent_sha256 = "abc".into())),
        (
            "network.mac",
            Box::new(|p| {
                if let Some(n) = &mut p.network {
                    n.mac = "52:54:00".into()
                }
            }),
        ),
        (
            "network.address",
            Box::new(|p| {
                if let Some(n) = &mut p.network {
                    n.address = "10.77.0.101".into()
                }
            }),
        ),
        (
            "network.gateway",
            Box::new(|p| {
                if let Some(n) = &mut p.network {
                    n.gateway = "10.77.0.101".parse().expect("ip")
                }
            }),
        ),
        (
            "admin.name",
            Box::new(|p| {
                if let Some(a) = &mut p.admin {
                    a.name = "root".into()
                }
            }),
        ),
        (
            "admin.password_hash",
            Box::new(|p| {
                if let Some(a) = &mut p.admin {
                    a.password_hash = Some("hunter2".into())
                }
            }),
        ),
        (
            "preload_images",
            Box::new(|p| p.preload_images = vec!["../etc/passwd".into()]),
        ),
        (
            "preload_images",
            Box::new(|p| p.preload_images = vec!["user-data".into()]),
        ),
        (
            "agent_env",
            Box::new(|p| p.agent_env = vec![("PATH".into(), "/tmp".into())]),
        ),
        (
            "agent_env",
            Box::new(|p| p.agent_env = vec![("IOT_DEVICE_ID".into(), "other".into())]),
        ),
        (
            "agent_env",
            Box::new(|p| p.agent_env = vec![("IOT_X".into(), "a\nNATS_URL=evil".into())]),
        ),
        ("hostname", Box::new(|p| p.hostname = Some("Kitchen".into()))),
        ("hostname", Box::new(|p| p.device_id = "-pi".into())),
    ];
    for (field, break_it) in cases {
        let mut p = device();
        break_it(&mut p);
        match p.user_data() {
            Err(Error::Invalid { field: f, reason }) => assert_eq!(f, field, "{reason}"),
            other => panic!("{field}: expected a validation error, got {other:?}"),
        }
    }
}

#[test]
fn debug_hides_the_enrollment() {
    let shown = format!("{:?}", device());
    assert!(!shown.contains("s3cret"), "{shown}");
}

#[test]
fn seed_dir_is_private_and_carries_the_checked_binary() {
    let tmp = tempfile::tempdir().expect("tmp");
    let agent = tmp.path().join("agent-build");
    std::fs::write(&agent, b"#!/bin/sh\necho agent\n").expect("agent");
    let images = tmp.path().join("images.tar");
    std::fs::write(&images, b"tar").expect("images");
    let dir = tmp.path().join("seed");
    let mut p = device();
    p.agent_sha256 = String::new(); // taken from the file
    let files = write_seed_dir(&p, &agent, &[images], &dir).expect("seed");
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "user-data",
            "meta-data",
            "network-config",
            ENROLLMENT_FILE,
            CA_FILE,
            "iot-agent",
            "images.tar"
        ]
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("user-data")), 0o600);
    assert_eq!(mode(&dir.join(ENROLLMENT_FILE)), 0o600);
    assert!(
        std::fs::read_to_string(dir.join(ENROLLMENT_FILE))
            .expect("enrollment")
            .contains("s3cret")
    );
    let want = sha256_file(&agent).expect("sha");
    let user_data = std::fs::read_to_string(dir.join("user-data")).expect("read");
    assert!(
        user_data.contains(&want),
        "the seed's user-data checks the binary it carries"
    );
    assert_eq!(
        std::fs::read(dir.join("iot-agent")).expect("copy"),
        b"#!/bin/sh\necho agent\n"
    );

    // The ISO, if genisoimage is here (scripts/setup-host.sh installs it).
    if std::process::Command::new("genisoimage")
        .arg("-version")
        .output()
        .is_ok()
    {
        let iso = tmp.path().join("seed.iso");
        write_seed_iso(&files, &iso).expect("iso");
        let bytes = std::fs::read(&iso).expect("iso bytes");
        // ISO 9660 primary volume descriptor at 32 KiB: type 1, "CD001", then the
        // volume id at offset 40 (space padded).
        assert_eq!(&bytes[0x8001..0x8006], b"CD001");
        assert_eq!(
            &bytes[0x8028..0x802e],
            b"cidata",
            "cloud-init finds the seed by this label"
        );
        assert_eq!(mode(&iso), 0o600);
    }
}

#[test]
fn the_install_script_checks_what_it_takes_and_scrubs_a_writable_seed() {
    // Runs the generated script against a fake seed in a directory, the way a Pi's
    // boot partition carries it, with the paths redirected into a temp dir.
    let tmp = tempfile::tempdir().expect("tmp");
    let seed = tmp.path().join("boot");
    std::fs::create_dir_all(&seed).expect("seed");
    std::fs::write(seed.join(AGENT_FILE), b"#!/bin/sh\necho iot-agent 9.9\n").expect("agent");
    let enrollment = "{\"secretId\":\"s3cret\"}\n";
    std::fs::write(seed.join(ENROLLMENT_FILE), enrollment).expect("enrollment");
    let good = sha256_file(&seed.join(AGENT_FILE)).expect("sha");
    let etc = tmp.path().join("etc");
    let bin = tmp.path().join("bin/iot-agent");
    let identity = etc.join("identity.json");
    let run = |agent_sha: &str, enrollment_sha: &str| {
        let script = unit::install_script(&unit::SeedContents {
            agent_sha256: agent_sha,
            enrollment_sha256: Some(enrollment_sha.to_owned()),
            ca_sha256: None,
            preload_images: &[],
        })
        .replace("/dev/disk/by-label/", &format!("{}/no-such-", tmp.path().display()))
        .replace("/boot/firmware", &seed.display().to_string())
        .replace(AGENT_BINARY, &bin.display().to_string())
        .replace(AGENT_IDENTITY_FILE, &identity.display().to_string())
        // Never the host's systemd: the test only sees what would be enabled.
        .replace("systemctl ", "echo would-run systemctl ");
        std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .output()
            .expect("sh")
    };
    let out = run(&"0".repeat(64), &sha256_text(enrollment));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the binary on the seed does not match"),
        "{out:?}"
    );
    assert!(!bin.exists(), "nothing installed");
    // A seed whose enrollment was swapped is refused too, and keeps it.
    let out = run(&good, &"0".repeat(64));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("the enrollment on the seed does not match"));
    assert!(!identity.exists() && seed.join(ENROLLMENT_FILE).exists());

    let out = run(&good, &sha256_text(enrollment));
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("installed iot-agent 9.9"), "{said}");
    assert!(
        said.contains("would-run systemctl enable --now podman.socket iot-agent.service"),
        "{said}"
    );
    assert_eq!(std::fs::read_to_string(&identity).expect("installed"), enrollment);
    let mode = std::fs::metadata(&identity).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(said.contains("removed the enrollment secret from the seed"), "{said}");
    assert!(
        !seed.join(ENROLLMENT_FILE).exists(),
        "the writable seed keeps no secret"
    );
}
