//! Minimal HTTP/1.0 GET for the plain-HTTP endpoints svcplane serves (/metrics, /healthz, /readyz).

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

/// Returns the status code and body, or `None` when nothing answers in time.
pub async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, body.to_owned()))
    };
    timeout(Duration::from_secs(5), exchange).await.ok().flatten()
}

/// The value of a sample line `name{labels} value` (exact match on `name{labels}`) in Prometheus
/// text exposition.
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_exact_series() {
        let text = "# HELP x\nleader_election_master_status{name=\"a\"} 1\nleader_election_master_status{name=\"ab\"} 0\n";
        assert_eq!(
            super::metric_value(text, "leader_election_master_status{name=\"a\"}"),
            Some(1.0)
        );
        assert_eq!(
            super::metric_value(text, "leader_election_master_status{name=\"ab\"}"),
            Some(0.0)
        );
        assert_eq!(
            super::metric_value(text, "leader_election_master_status{name=\"b\"}"),
            None
        );
    }
}
