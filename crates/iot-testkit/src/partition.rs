//! A TCP forwarder that a test can partition: after [`PartitionProxy::partition`]
//! bytes stop flowing both ways, but every connection stays open and new ones are
//! accepted and left hanging. That is what a cut network link looks like to a
//! client (silence, not a reset), which is the hard case for timeouts.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct PartitionProxy {
    port: u16,
    cut: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl PartitionProxy {
    /// Forwards 127.0.0.1:<new port> to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (cut, cut_rx) = watch::channel(false);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let cut_rx = cut_rx.clone();
                tokio::spawn(forward(client, target, cut_rx));
            }
        });
        Ok(Self { port, cut, accept })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// From now on nothing gets through, in either direction.
    pub fn partition(&self) {
        self.cut.send_replace(true);
    }

    /// New connections get through again. Those cut stay silent: the client must
    /// notice and reconnect, as after a real outage.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for PartitionProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn forward(mut client: TcpStream, target: SocketAddr, mut cut: watch::Receiver<bool>) {
    if *cut.borrow() {
        // Accepted, never answered.
        let _held = client;
        std::future::pending::<()>().await;
        return;
    }
    let Ok(mut server) = TcpStream::connect(target).await else {
        let _ = client.shutdown().await;
        return;
    };
    let partitioned = async {
        while !*cut.borrow_and_update() {
            if cut.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        () = partitioned => {
            // Hold both ends open and silent.
            let _held = (client, server);
            std::future::pending::<()>().await;
        }
    }
}
