//! An etcd of a test's own (Debian's `etcd`, as the control plane uses), which the test may stop
//! and start again on the same data and ports: an etcd outage without touching the apiserver's.
//! Optionally secured as production etcds are: TLS, client certificates required, and the user
//! taken from the certificate's common name (for tests of etcd's authentication).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};

use crate::{free_port, http};

pub struct Etcd {
    pub port: u16,
    peer_port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// The CA of a secure etcd, which signs its serving and client certificates.
    ca: Option<Ca>,
}

struct Ca {
    params: CertificateParams,
    key: KeyPair,
}

/// A client certificate of a secure etcd's CA, as files under the etcd's directory.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Etcd {
    /// Starts a single-member etcd with its data under `dir/etcd`, waiting until it is healthy.
    pub async fn start(dir: &Path) -> Self {
        let mut etcd = Self::new(dir, None);
        etcd.resume().await;
        etcd
    }

    /// Starts one serving TLS on loopback and requiring client certificates of its own CA
    /// (`--client-cert-auth`: with authentication on, the user is the certificate's common name).
    pub async fn start_secure(dir: &Path) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "e2e etcd CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("etcd-ca.crt"), cert.pem()).unwrap();
        let mut etcd = Self::new(dir, Some(Ca { params, key }));
        etcd.issue("etcd-server", true);
        etcd.resume().await;
        etcd
    }

    fn new(dir: &Path, ca: Option<Ca>) -> Self {
        Self {
            port: free_port(),
            peer_port: free_port(),
            dir: dir.to_path_buf(),
            child: None,
            ca,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// A client certificate for user `cn` (or, with `server`, the etcd's serving certificate).
    fn issue(&self, cn: &str, server: bool) -> ClientTls {
        let ca = self.ca.as_ref().expect("a secure etcd");
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if server {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
            params.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
        }
        let cert = params
            .signed_by(&key, &Issuer::from_params(&ca.params, &ca.key))
            .unwrap();
        let tls = ClientTls {
            ca: self.dir.join("etcd-ca.crt"),
            cert: self.dir.join(format!("{cn}.crt")),
            key: self.dir.join(format!("{cn}.key")),
        };
        std::fs::write(&tls.cert, cert.pem()).unwrap();
        std::fs::write(&tls.key, key.serialize_pem()).unwrap();
        tls
    }

    /// A client certificate for user `cn` of this secure etcd.
    pub fn client_tls(&self, cn: &str) -> ClientTls {
        self.issue(cn, false)
    }

    /// A client of this etcd as user `cn` (secure) or anonymous.
    pub async fn client_as(&self, cn: &str) -> etcd_client::Client {
        let mut opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(5));
        if self.ca.is_some() {
            let tls = self.client_tls(cn);
            let read = |p: &Path| std::fs::read(p).unwrap();
            opts = opts.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)))
                    .identity(etcd_client::Identity::from_pem(read(&tls.cert), read(&tls.key))),
            );
        }
        etcd_client::Client::connect([self.url()], Some(opts))
            .await
            .unwrap()
    }

    /// `cmd` (etcdctl or a script running it) pointed at this etcd as user `cn`, through
    /// etcdctl's environment variables.
    pub fn etcdctl_env(&self, cmd: &mut Command, cn: &str) {
        cmd.env("ETCDCTL_API", "3").env("ETCDCTL_ENDPOINTS", self.url());
        if self.ca.is_some() {
            let tls = self.client_tls(cn);
            cmd.env("ETCDCTL_CACERT", &tls.ca)
                .env("ETCDCTL_CERT", &tls.cert)
                .env("ETCDCTL_KEY", &tls.key);
        }
    }

    /// `etcdctl args` as user `cn`.
    pub fn etcdctl(&self, cn: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new("etcdctl");
        self.etcdctl_env(&mut cmd, cn);
        cmd.args(args).output().unwrap()
    }

    /// SIGKILL: what a crashed or partitioned etcd looks like to its clients.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same data and ports.
    pub async fn resume(&mut self) {
        assert!(self.child.is_none(), "etcd is already running");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .unwrap();
        let mut cmd = Command::new("etcd");
        if self.ca.is_some() {
            cmd.arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(self.dir.join("etcd-ca.crt"))
                .arg("--cert-file")
                .arg(self.dir.join("etcd-server.crt"))
                .arg("--key-file")
                .arg(self.dir.join("etcd-server.key"));
        }
        let child = cmd
            .args(["--name", "test", "--data-dir"])
            .arg(self.dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &self.url(),
                "--advertise-client-urls",
                &self.url(),
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &format!("test={peer}"),
                "--initial-cluster-state",
                "new",
            ])
            .args([
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting etcd (hack/install-deps.sh installs it)");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        for _ in 0..300 {
            let healthy = if self.ca.is_some() {
                self.etcdctl("health-check", &["endpoint", "health"])
                    .status
                    .success()
            } else {
                matches!(http::get(addr, "/health").await, Some((200, body)) if body.contains("\"health\":\"true\""))
            };
            if healthy {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "etcd did not become healthy; see {}",
            self.dir.join("etcd.log").display()
        );
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
