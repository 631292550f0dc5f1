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

/// The cumulative buckets `(le, count)` of an unlabelled histogram, `+Inf` last.
pub fn histogram_buckets(exposition: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    exposition
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The `q` quantile of cumulative buckets, interpolating linearly inside the bucket it falls in
/// (as PromQL's `histogram_quantile`); `None` without observations.
pub fn histogram_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = if count > lower.1 {
                (rank - lower.1) / (count - lower.1)
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (le, count);
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn quantiles_interpolate_within_buckets() {
        let text = "h_bucket{le=\"0.1\"} 50\nh_bucket{le=\"0.2\"} 90\nh_bucket{le=\"+Inf\"} 100\n";
        let b = super::histogram_buckets(text, "h");
        assert_eq!(b.len(), 3);
        assert_eq!(super::histogram_quantile(&b, 0.5), Some(0.1));
        let p70 = super::histogram_quantile(&b, 0.7).unwrap();
        assert!((p70 - 0.15).abs() < 1e-9, "{p70}");
        assert_eq!(super::histogram_quantile(&b, 0.99), Some(0.2));
        assert_eq!(super::histogram_quantile(&[], 0.5), None);
    }

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
