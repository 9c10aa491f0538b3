//! `kmesh-demo`: the canary rollout of Istio's bookinfo `reviews` service, enforced in the kernel
//! with no proxy, told with Istio's own YAML (see [`story`]).
//!
//! * `kmesh-demo` ([`local`]): a one-node cluster of network namespaces, the real `kmesh-operator`
//!   over a directory of YAML that each step rewrites, the real `kmesh-agent`.
//! * `kmesh-demo --cluster` ([`cluster`]): the same story on a real Kubernetes control plane
//!   (the test harness's: etcd, kube-apiserver, controller-manager, scheduler, two nodes), with
//!   kmesh-rs installed and driven with kubectl, each command printed as it runs. Needs the
//!   control-plane binaries (`KMESH_CONTROL_PLANE_BIN_DIR`, from `scripts/control-plane-bins.sh`).
//!
//! Needs root and the workspace binaries (`scripts/demo.sh [--cluster]` sees to both). Everything
//! it creates is removed when it ends, also on Ctrl-C ([`interrupt`]); traffic never leaves the
//! namespaces it makes.
mod cluster;
mod interrupt;
mod local;
mod operator;
mod story;
mod yaml_dir;

use std::process::ExitCode;

/// What the command line asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Local,
    Cluster,
    Help,
}

const USAGE: &str = "usage: kmesh-demo [--cluster]\n\
    \n\
    Without flags: the local demo (network namespaces, kmesh-operator --source dir:, kmesh-agent).\n\
    --cluster: the same story on a real control plane, installed and driven with kubectl\n\
    \x20          (needs KMESH_CONTROL_PLANE_BIN_DIR; scripts/demo.sh --cluster sets it).\n\
    Run as root. Ctrl-C stops the demo and removes everything it made.";

fn main() -> ExitCode {
    let mode = match parse(std::env::args().skip(1)) {
        Ok(mode) => mode,
        Err(e) => {
            eprintln!("kmesh-demo: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let run: fn() -> Result<(), String> = match mode {
        Mode::Help => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Mode::Local => local::run,
        Mode::Cluster => cluster::run,
    };
    if let Err(e) = interrupt::install() {
        eprintln!("kmesh-demo: taking over Ctrl-C: {e}");
        return ExitCode::FAILURE;
    }
    let result = run();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Whatever failed once a stop was asked for, the stop is why.
        Err(_) if interrupt::requested() => {
            eprintln!("kmesh-demo: interrupted; everything it made is removed");
            ExitCode::from(interrupt::EXIT_STATUS)
        }
        Err(e) => {
            eprintln!("kmesh-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Mode, String> {
    let mode = match args.next().as_deref() {
        None => Mode::Local,
        Some("--cluster") => Mode::Cluster,
        Some("-h" | "--help") => Mode::Help,
        Some(other) => return Err(format!("unknown argument {other:?}")),
    };
    match args.next() {
        None => Ok(mode),
        Some(extra) => Err(format!("unexpected argument {extra:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_args(args: &[&str]) -> Result<Mode, String> {
        parse(args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn command_lines() {
        assert_eq!(parse_args(&[]), Ok(Mode::Local));
        assert_eq!(parse_args(&["--cluster"]), Ok(Mode::Cluster));
        assert_eq!(parse_args(&["--help"]), Ok(Mode::Help));
        assert!(
            parse_args(&["--clutser"])
                .unwrap_err()
                .contains("--clutser")
        );
        assert!(
            parse_args(&["--cluster", "x"])
                .unwrap_err()
                .contains("\"x\"")
        );
    }
}
