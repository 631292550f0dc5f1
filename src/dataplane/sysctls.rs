//! `svcplane dataplane-init`: the kernel settings the node agent relies on, written once per node
//! start by a privileged init container (an unprivileged container sees `/proc/sys` read-only,
//! and the agent itself runs with `CAP_NET_ADMIN` only).
//!
//! The values are kube-proxy's: forwarding for Service traffic to Pods, and in IPVS mode
//! `net.ipv4.vs.conntrack=1` (connections IPVS forwards stay visible to conntrack, so the
//! masquerade rules apply to them), `expire_nodest_conn=1` (a connection whose real server was
//! removed is dropped at its next packet instead of hanging) and `expire_quiescent_template=1`
//! (persistence templates of a weight-0 real server expire, so affinity moves on).

use std::path::{Path, PathBuf};

use anyhow::Context;
use tracing::info;

use super::{
    Mode,
    ipvs::probe::{self as ipvs_probe, Ipvs},
};

#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// The mode the agent will run in; `auto` sets the IPVS values when the kernel has IPVS
    /// (asking for it loads the module, so the `net.ipv4.vs` files exist).
    #[arg(long, value_enum, default_value = "auto", env = "SVCPLANE_DATAPLANE_MODE")]
    pub mode: Mode,
    /// Where the sysctl files are (tests point this elsewhere).
    #[arg(long, default_value = "/proc/sys", hide = true)]
    pub proc_sys: PathBuf,
}

/// The settings for a node, as (sysctl name, value).
pub fn wanted(ipvs: bool) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![("net.ipv4.ip_forward", "1")];
    if ipvs {
        v.extend([
            ("net.ipv4.vs.conntrack", "1"),
            ("net.ipv4.vs.expire_nodest_conn", "1"),
            ("net.ipv4.vs.expire_quiescent_template", "1"),
        ]);
    }
    v
}

fn path(proc_sys: &Path, name: &str) -> PathBuf {
    proc_sys.join(name.replace('.', "/"))
}

/// Writes each setting that differs; a setting that cannot be written fails the run (the agent
/// would otherwise start on a node that cannot do what its mode promises).
pub fn apply(proc_sys: &Path, settings: &[(&str, &str)]) -> anyhow::Result<usize> {
    let mut changed = 0;
    for (name, value) in settings {
        let file = path(proc_sys, name);
        let current = std::fs::read_to_string(&file).with_context(|| format!("reading {name}"))?;
        if current.trim() == *value {
            continue;
        }
        std::fs::write(&file, value).with_context(|| format!("setting {name}={value}"))?;
        info!(name, from = current.trim(), to = value, "sysctl set");
        changed += 1;
    }
    Ok(changed)
}

pub fn run(args: &InitArgs) -> anyhow::Result<()> {
    let ipvs = match (args.mode, ipvs_probe::probe()) {
        (Mode::Nftables, _) => false,
        (Mode::Auto, Ipvs::Absent(_)) => false,
        (Mode::Ipvs, Ipvs::Absent(why)) => anyhow::bail!("--mode=ipvs: {why}"),
        (Mode::Auto | Mode::Ipvs, Ipvs::Available { .. }) => true,
    };
    let settings = wanted(ipvs);
    let changed = apply(&args.proc_sys, &settings)?;
    info!(ipvs, checked = settings.len(), changed, "node settings in place");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_proc(values: &[(&str, &str)]) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        for (name, v) in values {
            let f = path(dir.path(), name);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, format!("{v}\n")).unwrap();
        }
        dir
    }

    #[test]
    fn ipvs_mode_adds_the_ipvs_settings() {
        assert_eq!(wanted(false), [("net.ipv4.ip_forward", "1")]);
        let names: Vec<_> = wanted(true).into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"net.ipv4.vs.conntrack"));
        assert!(names.contains(&"net.ipv4.vs.expire_nodest_conn"));
    }

    #[test]
    fn writes_only_what_differs_and_fails_on_a_missing_setting() {
        let dir = fake_proc(&[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.vs.conntrack", "0"),
            ("net.ipv4.vs.expire_nodest_conn", "0"),
            ("net.ipv4.vs.expire_quiescent_template", "1"),
        ]);
        assert_eq!(apply(dir.path(), &wanted(true)).unwrap(), 2);
        let read = |n| std::fs::read_to_string(path(dir.path(), n)).unwrap();
        assert_eq!(read("net.ipv4.vs.conntrack").trim(), "1");
        assert_eq!(read("net.ipv4.vs.expire_nodest_conn").trim(), "1");
        assert_eq!(apply(dir.path(), &wanted(true)).unwrap(), 0);

        let no_ipvs = fake_proc(&[("net.ipv4.ip_forward", "0")]);
        let err = apply(no_ipvs.path(), &wanted(true)).unwrap_err();
        assert!(format!("{err:#}").contains("net.ipv4.vs.conntrack"), "{err:#}");
    }

    /// A directory removed when dropped (std only; the crate has no tempfile dependency).
    mod tempdir {
        use std::path::{Path, PathBuf};

        pub struct Dir(PathBuf);

        impl Dir {
            pub fn new() -> Self {
                let p = std::env::temp_dir().join(format!(
                    "svcplane-sysctl-test-{}-{}",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }

            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}
