//! A device on a link of its own (a network namespace), cut and restored.

mod common;

use std::time::{Duration, Instant};

use common::*;
use harmony_reconciler_contracts::Phase;
use iot_testkit::{NatsServer, NetNs, free_port, wait_until};

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_cut_link_is_noticed_while_it_is_down_and_the_device_converges_after() -> anyhow::Result<()> {
    let net = NetNs::create()?;
    let mut stack = Stack::start().await?;
    // NATS on the host end of the device's link, as on a gateway.
    stack.nats = NatsServer::start_on(&net.host_ip).await?;
    stack.reconnect().await?;
    let (dev, _guard) = device();
    let mport = free_port()?;
    let _agent = Agent::spawn_in(
        &stack,
        &dev,
        &net,
        &[
            ("NATS_URL", stack.nats.url()),
            // Metrics inside the namespace are reached through its address.
            ("IOT_METRICS_ADDR", format!("{}:{mport}", net.ns_ip)),
            ("IOT_RESYNC_INTERVAL", "10s".into()),
        ],
    )?;
    let web = dep("default", "web");
    let port = free_port()?;
    let h1 = stack.put(&dev, &web, &web_score("localhost/iot-web:v1", port)).await?;
    stack.wait_phase(&dev, &web, Phase::Running, Some(&h1)).await?;
    let connects = |text: &str| metric(text, "iot_agent_nats_connects_total");
    let before = iot_testkit::http::get_text(&net.ns_ip, mport, "/metrics").await?;
    assert_eq!(connects(&before), 1.0, "{before}");

    // 30 s by default: long enough for TCP alone not to notice (its retransmits keep
    // trying for minutes). IOT_LINK_OUTAGE_SECS=60 reproduces BENCHMARKS.md.
    let outage: u64 = std::env::var("IOT_LINK_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    net.link_down()?;
    tokio::time::sleep(Duration::from_secs(outage * 2 / 3)).await;
    // A change while the device is cut off.
    let h2 = stack.put(&dev, &web, &web_score("localhost/iot-web:v2", port)).await?;
    tokio::time::sleep(Duration::from_secs(outage - outage * 2 / 3)).await;
    net.link_up()?;
    let up = Instant::now();
    stack.wait_phase(&dev, &web, Phase::Running, Some(&h2)).await?;
    let converged = up.elapsed();
    eprintln!("converged {converged:?} after the link came back ({outage} s outage)");
    wait_http(port, "v2").await?;
    // The dead connection was dropped and a new one made: the pings, not TCP's
    // retransmit timers, found out.
    let after = wait_until(Duration::from_secs(10), "metrics", || async {
        iot_testkit::http::get_text(&net.ns_ip, mport, "/metrics").await.ok()
    })
    .await?;
    assert!(connects(&after) >= 2.0, "no reconnect happened: {after}");
    Ok(())
}
