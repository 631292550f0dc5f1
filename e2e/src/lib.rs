//! Test harness for svcplane's end-to-end tests: a real etcd and a real kube-apiserver, started
//! once per test process by `hack/control-plane.sh run`, plus helpers to run svcplane binaries
//! against them and to write the objects a kubelet would (Pods and their status).
//!
//! The control plane outlives no test process: the script supervises it and tears everything
//! down (processes and temporary directory) as soon as the test process exits, however it exits.

#![allow(clippy::unwrap_used)] // Test support: a failed unwrap is a failed test, with its message.

pub mod agentlog;
pub mod balancer;
pub mod cluster;
pub mod etcd;
pub mod http;
pub mod netns;
pub mod objects;
pub mod pods;
pub mod process;
pub mod proxy;
pub mod soak;
pub mod upstream;
pub mod validating;
pub mod webhook;

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::{
    Api, Client, Config,
    api::{ObjectMeta, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};

/// The running control plane of this test process.
#[derive(Debug)]
pub struct ControlPlane {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub kube_bin: PathBuf,
    pub apiserver_port: u16,
    pub etcd_port: u16,
}

static CONTROL_PLANE: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

/// Starts the control plane on first use; every later call returns the same one.
pub fn control_plane() -> &'static ControlPlane {
    match CONTROL_PLANE.get_or_init(|| start().map_err(|e| format!("{e:#}"))) {
        Ok(cp) => cp,
        Err(e) => panic!("control plane failed to start: {e}"),
    }
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start() -> anyhow::Result<ControlPlane> {
    let dir = std::env::temp_dir().join(format!("svcplane-e2e-{}", std::process::id()));
    let (cp, child) = spawn(dir)?;
    // The supervisor runs until this process exits; nobody waits for it, and that is the point.
    std::mem::forget(child);
    Ok(cp)
}

/// A control plane of its own (benchmarks compare controllers on identical, fresh clusters).
/// Dropping it stops etcd and the apiserver and removes its directory.
pub struct OwnedControlPlane {
    pub cp: ControlPlane,
    supervisor: std::process::Child,
}

impl OwnedControlPlane {
    pub fn start(name: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("svcplane-e2e-{}-{name}", std::process::id()));
        let (cp, supervisor) = spawn(dir)?;
        Ok(Self { cp, supervisor })
    }
}

impl Drop for OwnedControlPlane {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.supervisor.id().to_string())
            .status();
        let _ = self.supervisor.wait();
    }
}

fn spawn(dir: PathBuf) -> anyhow::Result<(ControlPlane, std::process::Child)> {
    let (apiserver_port, etcd_port, etcd_peer_port) = (free_port(), free_port(), free_port());
    let (child, exports) = run_script(
        "control-plane.sh",
        &dir,
        &[
            ("APISERVER_PORT", apiserver_port.to_string()),
            ("ETCD_PORT", etcd_port.to_string()),
            ("ETCD_PEER_PORT", etcd_peer_port.to_string()),
        ],
    )?;
    let kube_bin = PathBuf::from(exports.get("KUBE_BIN")?);
    Ok((
        ControlPlane {
            kubeconfig: dir.join("kubeconfig"),
            dir,
            kube_bin,
            apiserver_port,
            etcd_port,
        },
        child,
    ))
}

/// What a supervising script left in DIR/env (`export KEY=value` lines).
pub(crate) struct Exports(String);

impl Exports {
    pub(crate) fn get(&self, key: &str) -> anyhow::Result<String> {
        let prefix = format!("export {key}=");
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(str::to_owned)
            .with_context(|| format!("{key} missing from the script's env file"))
    }
}

/// Starts `hack/<script> run DIR` with `env`, supervised against this process (it tears down
/// what it started when this process exits), and waits until it prints READY.
pub(crate) fn run_script(
    script: &str,
    dir: &Path,
    env: &[(&str, String)],
) -> anyhow::Result<(std::process::Child, Exports)> {
    let mut child = Command::new("bash")
        .arg(repo_root().join("hack").join(script))
        .arg("run")
        .arg(dir)
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .env("WATCH_PID", std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting hack/{script}"))?;
    let stdout = child.stdout.take().with_context(|| format!("{script} stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.trim() == "READY" => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("reading {script}'s output: {e}"),
            None => bail!("{script} exited before it was ready: {:?}", child.wait()),
        }
    }
    let env =
        std::fs::read_to_string(dir.join("env")).with_context(|| format!("reading {script}'s env file"))?;
    Ok((child, Exports(env)))
}

impl ControlPlane {
    /// An admin client for the calling test's runtime (clients must not cross runtimes).
    pub async fn client(&self) -> Client {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(self.kube_bin.join("kubectl"));
        c.env("KUBECONFIG", &self.kubeconfig);
        c
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("pki/ca.crt")).unwrap()
    }

    /// Writes a kubeconfig that authenticates as `namespace/service_account` with a fresh token,
    /// optionally through another server address (a fault-injecting proxy).
    pub async fn service_account_kubeconfig(
        &self,
        client: &Client,
        namespace: &str,
        service_account: &str,
        server_port: Option<u16>,
        path: &Path,
    ) -> PathBuf {
        let token = service_account_token(client, namespace, service_account).await;
        let port = server_port.unwrap_or(self.apiserver_port);
        let ca = base64(self.ca_pem().as_bytes());
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority-data: {ca}\nusers:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: local\n  context: {{cluster: local, user: sa}}\ncurrent-context: local\n"
        );
        std::fs::write(path, yaml).unwrap();
        path.to_path_buf()
    }
}

impl ControlPlane {
    /// Applies the shipped controller-manager ServiceAccount and RBAC moved into `ns`
    /// (cluster-scoped objects get a per-namespace name), so every test has its own copy of
    /// exactly the shipped permissions.
    pub fn apply_controller_manager_rbac(&self, ns: &str) {
        let yaml = (shipped_rbac("controller-manager", ns, "svcplane:controller-manager")
            + &webhook_secret(ns))
            // The webhook configuration a test registers is its own too.
            .replace(
                "resourceNames: [\"svcplane\"]",
                &format!("resourceNames: [\"svcplane-{ns}\"]"),
            );
        self.kubectl_apply(&yaml);
    }

    /// Applies the shipped CRDs (cluster-wide, the same for every test) and waits until they are
    /// served.
    pub fn apply_crds(&self) {
        let yaml = std::fs::read_to_string(repo_root().join("manifests/crds/crds.yaml")).unwrap();
        self.kubectl_apply(&yaml);
        let out = self
            .kubectl()
            .args([
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/servicepools.svcplane.io",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "CRD not established: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// On a control plane of the test's own: the shipped controller-manager ServiceAccount and
    /// RBAC unmodified (in kube-system) and the CRDs; returns a kubeconfig acting as that
    /// ServiceAccount.
    pub async fn install_controller_manager(&self, client: &Client) -> PathBuf {
        let manifests = repo_root().join("manifests");
        let mut yaml = String::new();
        for f in [
            "controller-manager/serviceaccount.yaml",
            "controller-manager/rbac.yaml",
            "allocation/webhook-tls-secret.yaml",
        ] {
            yaml.push_str(&std::fs::read_to_string(manifests.join(f)).unwrap());
            yaml.push_str("\n---\n");
        }
        self.kubectl_apply(&yaml);
        self.apply_crds();
        self.service_account_kubeconfig(
            client,
            "kube-system",
            "svcplane-controller-manager",
            None,
            &self.dir.join("sa.kubeconfig"),
        )
        .await
    }

    /// The shipped dataplane ServiceAccount and RBAC, moved into `ns` the same way.
    pub fn apply_dataplane_rbac(&self, ns: &str) {
        self.kubectl_apply(&shipped_rbac("dataplane", ns, "svcplane:dataplane"));
    }

    /// `kubectl apply --server-side` of a YAML stream; panics with kubectl's output on failure.
    pub fn kubectl_apply(&self, yaml: &str) {
        use std::io::Write;
        let mut child = self
            .kubectl()
            .args([
                "apply",
                "--server-side",
                "--field-manager=svcplane-e2e",
                "-f",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `manifests/<component>/{serviceaccount,rbac}.yaml` moved into `ns`, the cluster-scoped
/// objects named `cluster_name` renamed `<cluster_name>:<ns>`.
/// The shipped (empty) webhook certificate Secret, moved into `ns`: the RBAC grants no
/// `create`, so it must exist, as the manifests make it.
fn webhook_secret(ns: &str) -> String {
    std::fs::read_to_string(repo_root().join("manifests/allocation/webhook-tls-secret.yaml"))
        .unwrap()
        .replace("namespace: kube-system", &format!("namespace: {ns}"))
}

fn shipped_rbac(component: &str, ns: &str, cluster_name: &str) -> String {
    let dir = repo_root().join("manifests").join(component);
    let mut yaml = String::new();
    for f in ["serviceaccount.yaml", "rbac.yaml"] {
        yaml.push_str(&std::fs::read_to_string(dir.join(f)).unwrap());
        yaml.push_str("\n---\n");
    }
    yaml.replace("namespace: kube-system", &format!("namespace: {ns}"))
        .replace(
            &format!("name: {cluster_name}\n"),
            &format!("name: {cluster_name}:{ns}\n"),
        )
}

pub async fn client_from_kubeconfig(path: &Path) -> Client {
    let kc = Kubeconfig::read_from(path).unwrap();
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

async fn service_account_token(client: &Client, namespace: &str, name: &str) -> String {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let resp: TokenRequest = api
        .create_subresource("token", name, &PostParams::default(), &req)
        .await
        .unwrap();
    resp.status.unwrap().token.unwrap()
}

/// Creates a namespace with a random name and its `default` ServiceAccount (which the
/// ServiceAccount admission plugin wants for Pods, and which no controller creates here).
pub async fn test_namespace(client: &Client, prefix: &str) -> String {
    let name = format!("{prefix}-{:08x}", rand::random::<u32>());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("default".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), &name)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    name
}

/// Path of the svcplane binary built for this workspace (`cargo build -p svcplane`).
pub fn svcplane_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SVCPLANE_BIN") {
        return PathBuf::from(p);
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo_root().join("target"), PathBuf::from);
    let bin = target.join("debug/svcplane");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p svcplane`",
        bin.display()
    );
    bin
}

/// Polls `f` every 100 ms until it returns `Some`, failing the test after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}
