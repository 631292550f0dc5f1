//! A node, a client and backends as network namespaces on this machine's kernel, wired with veth
//! pairs; every address lives inside them. `hack/topology.sh` builds and removes them (the one
//! definition, shared with the local demo); this harness adds the apiserver bridge and the
//! processes a test runs inside. Dropping the topology kills those and deletes the namespaces.
//!
//! ```text
//!   client (10.200.1.2) ── node (10.200.1.1) ── backend i (10.200.{i+1}.2/32 by proxy ARP, :8080)
//! ```
//!
//! The node reaches the test's apiserver at its own `127.0.0.1:<apiserver port>`: socat there
//! forwards to a unix socket (paths cross network namespaces), which the test forwards to the
//! apiserver on the host's loopback. So the agent runs inside the node with an ordinary
//! kubeconfig and no host network changes.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tokio::{
    net::{TcpStream, UnixListener},
    task::JoinHandle,
};

pub const CLIENT_IP: &str = "10.200.1.2";
pub const NODE_IP: &str = "10.200.1.1";

/// Runs `hack/topology.sh` (the one definition of this topology, shared with the local demo).
fn topology_script(args: &[&str]) {
    let out = Command::new("bash")
        .arg(crate::repo_root().join("hack/topology.sh"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running hack/topology.sh");
    assert!(
        out.status.success(),
        "hack/topology.sh {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Topology {
    pub prefix: String,
    pub backends: usize,
    dir: PathBuf,
    children: Vec<Child>,
    bridge: Option<JoinHandle<()>>,
}

impl Topology {
    /// Namespaces `<prefix>-c`, `<prefix>-n` and `<prefix>-b1..` with a busybox httpd on port 8080
    /// in each backend answering `backend-<i>`, and at `/cgi-bin/client` the address the
    /// connection came from.
    pub async fn create(prefix: &str, backends: usize, dir: &Path) -> Self {
        let specs: Vec<String> = (1..=backends)
            .map(|i| format!("{}:8080:backend-{i}", Self::backend_ip(i)))
            .collect();
        let topology_dir = dir.join("topology");
        let mut args = vec![
            "up",
            prefix,
            topology_dir.to_str().expect("a UTF-8 path"),
            "10.200.1",
        ];
        args.extend(specs.iter().map(String::as_str));
        topology_script(&args);
        Self {
            prefix: prefix.to_owned(),
            backends,
            dir: dir.to_path_buf(),
            children: Vec::new(),
            bridge: None,
        }
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    pub fn backend_ip(i: usize) -> String {
        format!("10.200.{}.2", i + 1)
    }

    /// Makes the apiserver at host `127.0.0.1:port` answer at the node's own `127.0.0.1:port`.
    pub async fn bridge_apiserver(&mut self, port: u16) {
        let sock = self.dir.join("apiserver.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).unwrap();
        self.bridge = Some(tokio::spawn(async move {
            while let Ok((mut unix, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut unix, &mut tcp).await;
                    }
                });
            }
        }));
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns("n"), "socat"])
            .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"))
            .arg(format!("UNIX-CONNECT:{}", sock.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("socat");
        self.children.push(child);
    }

    /// Runs `cmd` inside namespace `ns` (`ip netns exec`), as a child owned by the topology.
    pub fn spawn_in(&mut self, ns: &str, cmd: &Path, args: &[&str], log: &Path, env: &[(&str, &str)]) -> u32 {
        let log = std::fs::File::create(log).unwrap();
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(ns)]).arg(cmd).args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning in a namespace");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// SIGTERM to a child started with [`Topology::spawn_in`], waiting for it to exit.
    pub fn stop(&mut self, pid: u32) {
        if let Some(c) = self.children.iter_mut().find(|c| c.id() == pid) {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
            let _ = c.wait();
        }
    }

    /// `curl -s --max-time 2 url` from the client.
    async fn run_curl(&self, url: &str) -> std::process::Output {
        self.run_curl_in("c", url).await
    }

    /// `curl -s --max-time 2 url` from namespace `ns` (`c`, `b1`, …).
    async fn run_curl_in(&self, ns: &str, url: &str) -> std::process::Output {
        tokio::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(ns),
                "curl",
                "-s",
                "--max-time",
                "2",
                url,
            ])
            .output()
            .await
            .expect("running curl")
    }

    /// `curl` from the client; the body, or `None` when the request failed.
    pub async fn curl(&self, url: &str) -> Option<String> {
        self.curl_in("c", url).await
    }

    /// `curl` from the client: the body, or how it failed (curl's exit code, e.g. 7 refused, 28
    /// timed out, 56 reset) and when, for tests that must say why traffic failed.
    pub async fn curl_outcome(&self, url: &str) -> Result<String, String> {
        outcome(&self.run_curl(url).await)
    }

    /// `curl` from namespace `ns` (a backend: `b1`, …); the body, or `None` when it failed.
    pub async fn curl_in(&self, ns: &str, url: &str) -> Option<String> {
        outcome(&self.run_curl_in(ns, url).await).ok()
    }

    /// Whether `url` is refused at once (a reject, not a timeout).
    pub async fn refused(&self, url: &str) -> bool {
        let out = self.run_curl(url).await;
        // 7: failed to connect (refused); 28 would be a timeout.
        out.status.code() == Some(7)
    }

    /// svcplane's tables of `family` in the node (`svcplane` and its shards), as `nft list`
    /// prints them, or `None` when there is none.
    pub fn nft_list(&self, family: &str) -> Option<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns("n"), "nft", "list", "ruleset", family])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let ours = format!("table {family} svcplane");
        text.contains(&ours).then_some(text)
    }

    /// Waits until every backend answers directly (the httpds are up).
    pub async fn wait_for_backends(&self) {
        for i in 1..=self.backends {
            let url = format!("http://{}:8080/", Self::backend_ip(i));
            let mut ok = false;
            for _ in 0..100 {
                if self.curl(&url).await.is_some() {
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(ok, "backend {i} does not answer");
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(b) = self.bridge.take() {
            b.abort();
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let topology_dir = self.dir.join("topology");
        let _ = Command::new("bash")
            .arg(crate::repo_root().join("hack/topology.sh"))
            .args(["down", &self.prefix])
            .arg(&topology_dir)
            .status();
    }
}

/// A curl run's body, or how it failed and when.
fn outcome(out: &std::process::Output) -> Result<String, String> {
    match out.status.code() {
        Some(0) => Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
        code => Err(format!(
            "FAILED (curl exit {}, at {})",
            code.map_or_else(|| "by signal".to_owned(), |c| c.to_string()),
            humantime::format_rfc3339_millis(std::time::SystemTime::now())
        )),
    }
}
