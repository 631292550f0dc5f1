//! A real one-node cluster for tests: `hack/cluster-up.sh run` starts the control plane in a
//! network namespace and boots the node (a qemu VM with kubelet and containerd), then supervises
//! both; everything is torn down when the test process exits or the handle is dropped.

use std::{
    path::PathBuf,
    process::{Child, Command, Output},
    time::Instant,
};

use anyhow::Context;
use kube::Client;

use crate::{client_from_kubeconfig, repo_root, run_script};

/// The node's address, as the cluster script gives it.
pub const NODE_IP: &str = "10.210.0.2";

pub struct Cluster {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub kube_bin: PathBuf,
    netns: String,
    /// The cluster's etcd as this host reaches it (client certificates under `pki/`).
    pub etcd_endpoint: String,
    supervisor: Child,
    /// Wall-clock time from start to a Ready node with its add-ons.
    pub ready_after: std::time::Duration,
}

impl Cluster {
    /// Starts a cluster (its host link on the first subnet no other cluster uses).
    pub fn start() -> anyhow::Result<Self> {
        let started = Instant::now();
        let dir = std::env::temp_dir().join(format!("svcplane-e2e-cluster-{}", std::process::id()));
        let (supervisor, exports) = run_script("cluster-up.sh", &dir, &[])?;
        let kube_bin = PathBuf::from(exports.get("KUBE_BIN")?);
        let etcd_endpoint = exports.get("ETCD_ENDPOINT")?;
        let netns = std::fs::read_to_string(dir.join("netns"))
            .context("reading the cluster's netns")?
            .trim()
            .to_owned();
        Ok(Self {
            kubeconfig: dir.join("kubeconfig"),
            dir,
            kube_bin,
            netns,
            etcd_endpoint,
            supervisor,
            ready_after: started.elapsed(),
        })
    }

    pub async fn client(&self) -> Client {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(self.kube_bin.join("kubectl"));
        c.env("KUBECONFIG", &self.kubeconfig);
        c
    }

    /// Runs kubectl and returns its stdout; panics with its stderr when it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "kubectl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `hack/cluster-up.sh` with this cluster's directory (load, ssh).
    pub fn script(&self) -> Command {
        let mut c = Command::new("bash");
        c.arg(repo_root().join("hack/cluster-up.sh"))
            .env("SVCPLANE_CLUSTER_DIR", &self.dir);
        c
    }

    /// A shell command on the node, as root.
    pub fn ssh(&self, command: &str) -> Output {
        self.script().arg("ssh").arg(command).output().unwrap()
    }

    /// Same, panicking unless it succeeds; returns stdout.
    pub fn ssh_ok(&self, command: &str) -> String {
        let out = self.ssh(command);
        assert!(
            out.status.success(),
            "on the node: {command}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A command in the control plane's network namespace: a host outside the node, with
    /// routes to Services and Pods (as the apiserver has).
    pub fn in_netns(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns, program]);
        c
    }

    /// Imports an OCI archive into the node's containerd (`hack/cluster-up.sh load`).
    pub fn load(&self, archive: &std::path::Path) {
        let out = self.script().arg("load").arg(archive).output().unwrap();
        assert!(
            out.status.success(),
            "loading {}: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn pki(&self, name: &str) -> PathBuf {
        self.dir.join("pki").join(name)
    }
}

impl Cluster {
    /// What a failed test needs to be understood: printed before the cluster is torn down.
    fn dump(&self) {
        eprintln!("=== cluster state at failure ({})", self.dir.display());
        for args in [
            &["get", "nodes,pods,services,endpointslices", "-A", "-o", "wide"][..],
            &["get", "events", "-A", "--sort-by=.lastTimestamp"][..],
            &[
                "-n",
                "kube-system",
                "logs",
                "-l",
                "app.kubernetes.io/name=svcplane",
                "--all-containers",
                "--tail=40",
                "--prefix",
            ][..],
        ] {
            if let Ok(out) = self.kubectl().args(args).output() {
                eprintln!(
                    "--- kubectl {}\n{}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        for log in [
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "etcd",
            "console",
        ] {
            let text =
                std::fs::read_to_string(self.dir.join("logs").join(format!("{log}.log"))).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            eprintln!(
                "--- {log}.log (last lines)\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let out = self.ssh("journalctl -u kubelet -u containerd --no-pager -n 40");
        eprintln!("--- node journal\n{}", String::from_utf8_lossy(&out.stdout));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.supervisor.id().to_string())
            .status();
        let _ = self.supervisor.wait();
    }
}
