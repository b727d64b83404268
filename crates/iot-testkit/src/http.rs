//! A minimal HTTP/1.0 GET for checking what a deployed container serves.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::wait_until;

/// `GET /` on host:port; (status code, trimmed body), or None if nothing answered.
pub async fn http_get(host: &str, port: u16) -> Option<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        s.write_all(b"GET / HTTP/1.0\r\nHost: device\r\n\r\n").await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_owned();
        Some((code, body))
    };
    tokio::time::timeout(Duration::from_secs(3), fut).await.ok().flatten()
}

/// Waits for HTTP 200 with exactly `body`.
pub async fn wait_http(host: &str, port: u16, body: &str, timeout: Duration) -> anyhow::Result<()> {
    wait_until(
        timeout,
        &format!("HTTP 200 {body:?} from http://{host}:{port}/"),
        || async {
            http_get(host, port)
                .await
                .filter(|(c, b)| *c == 200 && b == body)
                .map(drop)
        },
    )
    .await
}
