//! `kmesh-demo --cluster` (what `scripts/demo.sh --cluster` runs), end to end, once: the story on
//! the real control plane of `kmesh_tests::cluster`, installed and driven with kubectl. Its exit
//! status, each step's distribution (the same checks as the local demo's, [`demo_output`]), and
//! nothing left behind. About 25 s (a cluster's start, install and bookinfo, then four steps).
//!
//! Needs root, the workspace binaries (`cargo build --workspace --bins`) and the control-plane
//! binaries (`KMESH_CONTROL_PLANE_BIN_DIR`, from `scripts/control-plane-bins.sh`).
mod demo_output;

use demo_output::{assert_no_leftovers, check_story, run_demo};
use kmesh_tests::require_root;

#[test]
fn the_cluster_demo_shows_each_istio_step_on_every_node() {
    require_root();
    let (pid, stdout) = run_demo(&["--cluster"]);
    check_story(&stdout);
    assert_no_leftovers(pid);
}
