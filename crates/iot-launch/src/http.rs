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

/// `GET path` on host:port; (status code, body).
pub async fn get(host: &str, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect((host, port)).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no HTTP status in {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        anyhow::Ok((code, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| anyhow::anyhow!("GET http://{host}:{port}{path} timed out"))?
}

/// The body of a `GET path` that must answer 200.
pub async fn get_text(host: &str, port: u16, path: &str) -> anyhow::Result<String> {
    let (code, body) = get(host, port, path).await?;
    anyhow::ensure!(code == 200, "GET http://{host}:{port}{path}: {code} {body}");
    Ok(body)
}

/// The status code of a `GET path`.
pub async fn get_status(host: &str, port: u16, path: &str) -> anyhow::Result<u16> {
    Ok(get(host, port, path).await?.0)
}
