//! svcplane: Kubernetes Service networking, rebuilt.
//!
//! One binary, one subcommand per component; each subcommand's module wires I/O around the pure
//! logic in the library crates.

mod allocation;
mod controller_manager;
mod crds;
mod dataplane;
mod health;
mod http;
mod kubeclient;
mod telemetry;
mod webhook;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "svcplane",
    version,
    about = "Kubernetes Service networking: controllers, allocators and node dataplane"
)]
struct Cli {
    #[command(flatten)]
    logging: telemetry::LoggingArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the leader-elected controllers (EndpointSlice, Endpoints, mirroring, allocators).
    ControllerManager(Box<controller_manager::Args>),
    /// Runs the node agent: programs this node's kernel for Services (nftables; IPVS to come).
    Dataplane(Box<dataplane::Args>),
    /// Sets the kernel settings the node agent relies on (run once per node start, privileged).
    DataplaneInit(dataplane::sysctls::InitArgs),
    /// Removes every rule the node agent wrote.
    Cleanup(dataplane::CleanupArgs),
    /// Prints the CustomResourceDefinitions svcplane uses, for `kubectl apply -f -`.
    Crds,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Crds = cli.command {
        return match crds::yaml() {
            Ok(y) => {
                print!("{y}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("svcplane: cannot render the CRDs: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // kube, the webhook server and etcd-client all use rustls; one provider, chosen once, keeps
    // aws-lc out of the build and every TLS stack consistent.
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("svcplane: a rustls crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    if let Err(e) = telemetry::init(&cli.logging) {
        eprintln!("svcplane: cannot set up logging: {e:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("svcplane: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::ControllerManager(args) => controller_manager::run(*args).await,
            Command::Dataplane(args) => dataplane::run(*args).await,
            Command::DataplaneInit(args) => dataplane::sysctls::run(&args),
            Command::Cleanup(args) => dataplane::cleanup(args).await,
            Command::Crds => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "exiting");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// The DaemonSet sets the mode once, in an environment variable both subcommands read.
    #[test]
    fn both_dataplane_subcommands_read_the_mode_from_the_same_variable() {
        let cli = Cli::command();
        for sub in ["dataplane", "dataplane-init"] {
            let mode = cli
                .find_subcommand(sub)
                .and_then(|c| c.get_arguments().find(|a| a.get_id() == "mode"))
                .unwrap_or_else(|| panic!("{sub} has no --mode"));
            assert_eq!(
                mode.get_env().and_then(|e| e.to_str()),
                Some("SVCPLANE_DATAPLANE_MODE"),
                "{sub}"
            );
        }
    }
}
