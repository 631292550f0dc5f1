//! What the node agents (svcplane's and kube-proxy) log per sync and per programmed change,
//! read as their logs grow: the dataplane benchmark times both by their own words.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    time::{Duration, Instant},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agent {
    Svcplane,
    KubeProxy,
}

impl Agent {
    pub fn name(self) -> &'static str {
        match self {
            Agent::Svcplane => "svcplane",
            Agent::KubeProxy => "kube-proxy",
        }
    }

    /// A sync's duration, if `line` reports the end of a successful one.
    pub fn sync_line(self, line: &str) -> Option<Duration> {
        match self {
            Agent::Svcplane => {
                if !line.contains("sync complete") || !line.contains("ok=true") {
                    return None;
                }
                let ms: f64 = field(line, "elapsed_ms=")?.parse().ok()?;
                Some(Duration::from_secs_f64(ms / 1000.0))
            }
            Agent::KubeProxy => {
                // One proxier per family; this cluster is IPv4 only.
                if !line.contains("\"SyncProxyRules complete\"") || line.contains("IPv6") {
                    return None;
                }
                go_duration(field(line, "elapsed=")?)
            }
        }
    }

    /// The Service and latency of a "network programming" line.
    pub fn programming_line(self, line: &str) -> Option<(String, Duration)> {
        let (service, secs) = match self {
            Agent::Svcplane if line.contains("network programming") => {
                (field(line, "service=")?, field(line, "seconds=")?)
            }
            Agent::KubeProxy if line.contains("\"Network programming\"") && !line.contains("IPv6") => {
                (field(line, "endpoint=")?, field(line, "elapsed=")?)
            }
            _ => return None,
        };
        let secs: f64 = secs.parse().ok()?;
        Some((service.to_owned(), Duration::from_secs_f64(secs.max(0.0))))
    }
}

/// The value after `key` in a log line (up to a space; quotes removed).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = &line[line.find(key)? + key.len()..];
    let rest = rest.strip_prefix('"').unwrap_or(rest);
    let end = rest.find(['"', ' ']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// A Go `time.Duration` string: `1.5s`, `250.1ms`, `900µs`, `1m2.5s`.
fn go_duration(s: &str) -> Option<Duration> {
    let mut total = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, scale) = [
            ("ms", 1e-3),
            ("µs", 1e-6),
            ("us", 1e-6),
            ("ns", 1e-9),
            ("h", 3600.0),
            ("m", 60.0),
            ("s", 1.0),
        ]
        .into_iter()
        .find(|(u, _)| rest.starts_with(u))?;
        total += value * scale;
        rest = &rest[unit.len()..];
    }
    Some(Duration::from_secs_f64(total))
}

/// Reads a log as it grows, line by line.
pub struct Tail {
    reader: BufReader<std::fs::File>,
    partial: String,
    /// Lines read but not yet looked at by [`Tail::until`].
    unread: std::collections::VecDeque<String>,
}

impl Tail {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::open(path)?;
        Ok(Self {
            reader: BufReader::new(file),
            partial: String::new(),
            unread: std::collections::VecDeque::new(),
        })
    }

    /// The complete lines written since the last call, without their newlines (not those
    /// [`Tail::until`] holds).
    pub fn lines(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if let Some(whole) = line.strip_suffix('\n') {
                        self.partial.push_str(whole);
                        out.push(std::mem::take(&mut self.partial));
                    } else {
                        self.partial.push_str(&line);
                    }
                }
            }
        }
        out
    }

    /// Waits (up to `limit`) for a line `pick` accepts; what it returns.
    pub async fn until<T>(&mut self, limit: Duration, mut pick: impl FnMut(&str) -> Option<T>) -> Option<T> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if self.unread.is_empty() {
                let fresh = self.lines();
                self.unread.extend(fresh);
            }
            // Lines after the one picked stay for the next call.
            while let Some(line) = self.unread.pop_front() {
                if let Some(v) = pick(&line) {
                    return Some(v);
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }

    /// Forgets what was written so far.
    pub fn skip(&mut self) {
        self.unread.clear();
        self.lines();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_of_both_agents_parse() {
        let kp = r#"I1202 09:50:00.123456   1234 proxier.go:1200] "SyncProxyRules complete" ipFamily="IPv4" elapsed="1.5ms""#;
        assert_eq!(Agent::KubeProxy.sync_line(kp), Some(Duration::from_micros(1500)));
        let kp = r#"I1202 09:50:00.1 1 proxier.go:1891] "Network programming" ipFamily="IPv4" endpoint="bench/s12" elapsed=0.25"#;
        assert_eq!(
            Agent::KubeProxy.programming_line(kp),
            Some(("bench/s12".into(), Duration::from_millis(250)))
        );
        let sp = "2026-12-02T09:50:00Z DEBUG sync: svcplane::dataplane: sync complete full=false elapsed_ms=6.5 ok=true";
        assert_eq!(Agent::Svcplane.sync_line(sp), Some(Duration::from_micros(6500)));
        let sp = "2026-12-02T09:50:00Z DEBUG svcplane::dataplane: network programming service=bench/s3 slice=bench/s3-x seconds=0.012";
        assert_eq!(
            Agent::Svcplane.programming_line(sp),
            Some(("bench/s3".into(), Duration::from_millis(12)))
        );
        assert_eq!(go_duration("1m2.5s"), Some(Duration::from_millis(62_500)));
        assert_eq!(go_duration("900µs"), Some(Duration::from_micros(900)));
    }

    #[test]
    fn a_growing_log_is_read_line_by_line_without_newlines() {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("agentlog-{}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        write!(f, "sync complete elapsed_ms=1.5 ok=true\nhalf").unwrap();
        let mut tail = Tail::open(&path).unwrap();
        let lines = tail.lines();
        assert_eq!(lines, ["sync complete elapsed_ms=1.5 ok=true"]);
        assert_eq!(
            Agent::Svcplane.sync_line(&lines[0]),
            Some(Duration::from_micros(1500))
        );
        writeln!(f, " a line").unwrap();
        assert_eq!(tail.lines(), ["half a line"]);
        assert!(tail.lines().is_empty());
        // A line picked by `until` leaves the ones after it for the next `until`.
        writeln!(
            f,
            "network programming service=ns/a seconds=0.5\nsync complete elapsed_ms=2 ok=true"
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let second = Duration::from_secs(1);
            let seen = tail.until(second, |l| Agent::Svcplane.programming_line(l)).await;
            assert_eq!(seen, Some(("ns/a".into(), Duration::from_millis(500))));
            let synced = tail.until(second, |l| Agent::Svcplane.sync_line(l)).await;
            assert_eq!(synced, Some(Duration::from_millis(2)));
        });
        std::fs::remove_file(&path).unwrap();
    }
}
