//! svcplane processes started by tests, killed when the test lets go of them.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
};

use crate::{free_port, http};

pub struct Svcplane {
    pub name: String,
    pub http_addr: SocketAddr,
    child: Option<Child>,
}

impl Svcplane {
    /// Starts `svcplane controller-manager` as identity `name`, with `extra` arguments. Its log
    /// goes to `log_dir/<name>.log`.
    pub fn controller_manager(name: &str, kubeconfig: &Path, log_dir: &Path, extra: &[&str]) -> Self {
        let http_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(log_dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(crate::svcplane_bin())
            .arg("controller-manager")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--http-bind-address")
            .arg(http_addr.to_string())
            .arg("--leader-elect-identity")
            .arg(name)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("SVCPLANE_LOG").unwrap_or_else(|_| "info,svcplane_controllers=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self {
            name: name.to_owned(),
            http_addr,
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub async fn metrics(&self) -> Option<String> {
        match http::get(self.http_addr, "/metrics").await {
            Some((200, body)) => Some(body),
            _ => None,
        }
    }

    /// `leader_election_master_status` for `lease`, if the process answers.
    pub async fn leader_status(&self, lease: &str) -> Option<f64> {
        let m = self.metrics().await?;
        http::metric_value(&m, &format!("leader_election_master_status{{name=\"{lease}\"}}"))
    }

    pub async fn readyz(&self) -> Option<(u16, String)> {
        http::get(self.http_addr, "/readyz?verbose").await
    }

    /// SIGKILL: no chance to release anything.
    pub fn kill_hard(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        c.wait().ok()
    }

    /// SIGSTOP: the process stops where it is, mid-request or mid-reconcile, as a stalled node or
    /// a paused VM stops it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let status = Command::new("kill").arg(sig).arg(c.id().to_string()).status();
            assert!(status.is_ok_and(|s| s.success()), "kill {sig} {}", c.id());
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Svcplane {
    fn drop(&mut self) {
        self.kill_hard();
    }
}
