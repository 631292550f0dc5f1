//! A node, a client and backends as network namespaces on this machine's kernel, wired with veth
//! pairs; every address lives inside them. Dropping the topology kills its processes and deletes
//! the namespaces.
//!
//! ```text
//!   client (10.200.1.2) ── node (10.200.1.1 | 10.200.{2,3,4}.1) ── backend i (10.200.{i+1}.2:8080)
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

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
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
    /// in each backend answering `backend-<i>`.
    pub async fn create(prefix: &str, backends: usize, dir: &Path) -> Self {
        let mut t = Self {
            prefix: prefix.to_owned(),
            backends,
            dir: dir.to_path_buf(),
            children: Vec::new(),
            bridge: None,
        };
        let (c, n) = (t.ns("c"), t.ns("n"));
        for ns in [&c, &n] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&[
            "link", "add", "c0", "netns", &c, "type", "veth", "peer", "name", "n-c", "netns", &n,
        ]);
        ip(&["-n", &c, "addr", "add", &format!("{CLIENT_IP}/24"), "dev", "c0"]);
        ip(&["-n", &c, "link", "set", "c0", "up"]);
        ip(&["-n", &c, "route", "add", "default", "via", NODE_IP]);
        ip(&["-n", &n, "addr", "add", &format!("{NODE_IP}/24"), "dev", "n-c"]);
        ip(&["-n", &n, "link", "set", "n-c", "up"]);
        // Service addresses are routed into the node (no dummy link type on this kernel), where
        // DNAT takes them, or the filter hooks reject them.
        ip(&["-n", &n, "route", "add", "10.96.0.0/12", "dev", "lo"]);
        let out = Command::new("ip")
            .args(["netns", "exec", &n, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .output()
            .unwrap();
        assert!(out.status.success());
        for i in 1..=backends {
            let b = t.ns(&format!("b{i}"));
            ip(&["netns", "add", &b]);
            ip(&["-n", &b, "link", "set", "lo", "up"]);
            let peer = format!("n-b{i}");
            ip(&[
                "link", "add", "b0", "netns", &b, "type", "veth", "peer", "name", &peer, "netns", &n,
            ]);
            ip(&[
                "-n",
                &b,
                "addr",
                "add",
                &format!("{}/24", Self::backend_ip(i)),
                "dev",
                "b0",
            ]);
            ip(&["-n", &b, "link", "set", "b0", "up"]);
            ip(&[
                "-n",
                &b,
                "route",
                "add",
                "default",
                "via",
                &format!("10.200.{}.1", i + 1),
            ]);
            ip(&[
                "-n",
                &n,
                "addr",
                "add",
                &format!("10.200.{}.1/24", i + 1),
                "dev",
                &peer,
            ]);
            ip(&["-n", &n, "link", "set", &peer, "up"]);
            let www = dir.join(format!("www-{i}"));
            std::fs::create_dir_all(&www).unwrap();
            std::fs::write(www.join("index.html"), format!("backend-{i}\n")).unwrap();
            let child = Command::new("ip")
                .args(["netns", "exec", &b, "busybox", "httpd", "-f", "-p", "8080", "-h"])
                .arg(&www)
                .stdin(Stdio::null())
                .spawn()
                .expect("busybox httpd");
            t.children.push(child);
        }
        t
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
        tokio::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns("c"),
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
        let out = self.run_curl(url).await;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Whether `url` is refused at once (a reject, not a timeout).
    pub async fn refused(&self, url: &str) -> bool {
        let out = self.run_curl(url).await;
        // 7: failed to connect (refused); 28 would be a timeout.
        out.status.code() == Some(7)
    }

    /// `nft list table` in the node, or `None` when the table does not exist.
    pub fn nft_list(&self, family: &str) -> Option<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns("n"),
                "nft",
                "list",
                "table",
                family,
                "svcplane",
            ])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
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
        let mut names = vec![self.ns("c"), self.ns("n")];
        names.extend((1..=self.backends).map(|i| self.ns(&format!("b{i}"))));
        for ns in names {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}
