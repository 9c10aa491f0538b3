//! `kmesh-container PLAN.json`: the fake kubelet's container runtime. Sets up one container as the
//! plan says (cgroup, network namespace, mount namespace with its root and volumes, user; see
//! `kmesh_tests::cluster::runtime`), then execs the container's program in place, so the process
//! the kubelet started *is* the container. Errors go to stderr, which is the container's log.
use std::{os::unix::process::CommandExt as _, process::ExitCode};

use kmesh_tests::cluster::{
    runtime::{self, ContainerPlan},
    sys::RealSys,
};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(path), None) = (args.next(), args.next()) else {
        eprintln!("usage: kmesh-container PLAN.json");
        return ExitCode::from(2);
    };
    let plan: ContainerPlan = match std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("kmesh-container: reading the plan {path}: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = runtime::execute(&runtime::steps(&plan), &mut RealSys) {
        eprintln!("kmesh-container: setting up the container: {e}");
        return ExitCode::from(127);
    }
    let Some((argv0, rest)) = plan.argv.split_first() else {
        eprintln!("kmesh-container: the plan has an empty argv");
        return ExitCode::from(2);
    };
    let err = std::process::Command::new(&plan.program)
        .arg0(argv0)
        .args(rest)
        .env_clear()
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .exec();
    eprintln!(
        "kmesh-container: exec {} in the container: {err}",
        plan.program.display()
    );
    ExitCode::from(127)
}
