//! Outages: a callout replica dies (the others carry on), OpenBao freezes (known
//! identities are admitted from cache, unknown ones are not), every callout dies
//! (connected devices keep working, new connects fail until one is back).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Secured, try_connect};
use harmony_reconciler_contracts::Id;

async fn status_put_works(client: &async_nats::Client, device: &str) -> anyhow::Result<()> {
    iot_nats::status_relay::write_via_relay(
        client,
        &Id::new(device)?,
        Bytes::from_static(b"{}"),
        Duration::from_secs(5),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn outages_never_admit_strangers_and_never_cut_off_connected_devices() -> anyhow::Result<()> {
    let mut s = Secured::start(2).await?;
    let known = s.credentials(s.enroll_device("dev-known").await?)?;
    let connected = try_connect(&s.nats, &known).await.map_err(anyhow::Error::msg)?;
    status_put_works(&connected, "dev-known").await?;

    // One replica dies: new connects keep working (the queue group routes around it).
    s.callouts[0].process.kill();
    for _ in 0..6 {
        try_connect(&s.nats, &known).await.map_err(anyhow::Error::msg)?;
    }

    // OpenBao freezes. Restart the surviving replica's view first so that its cache
    // holds only what its enrollment listing loaded: a device enrolled later is one it
    // has never vouched for.
    s.callouts.remove(0);
    s.add_callout(&[]).await?;
    let newcomer = s.credentials(s.enroll_device("dev-new").await?)?;
    newcomer.token().await?;
    known.token().await?;
    s.bao.freeze()?;
    let admitted = try_connect(&s.nats, &known).await;
    let refused = try_connect(&s.nats, &newcomer).await;
    s.bao.thaw()?;
    admitted.map_err(|e| anyhow::anyhow!("a known device was refused during the OpenBao outage: {e}"))?;
    assert!(
        refused.is_err(),
        "a device OpenBao never vouched for got in during its outage"
    );
    assert!(s.callout_logs().contains("admitting from cache"));
    // Once OpenBao is back, the newcomer gets in.
    try_connect(&s.nats, &newcomer).await.map_err(anyhow::Error::msg)?;

    // Every callout dies: the connected device keeps working; nobody new gets in.
    for c in &mut s.callouts {
        c.process.kill();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    status_put_works(&connected, "dev-known").await?;
    assert!(try_connect(&s.nats, &known).await.is_err());
    // A callout comes back: connects work again.
    s.add_callout(&[]).await?;
    try_connect(&s.nats, &known).await.map_err(anyhow::Error::msg)?;
    status_put_works(&connected, "dev-known").await?;
    Ok(())
}
