#!/usr/bin/env bash
# Every test: set up this machine (scripts/setup.sh), then lint, build, run the unit tests and the
# real-kernel end-to-end tests, the snapshot codec at full scale in release mode, and a smoke run of
# the benchmark. Run as root. Exits non-zero on the first failure; the last line counts the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
log=$(mktemp)
trap 'rm -f "$log"' EXIT

step() { echo; echo "==> $*"; }

step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "the agent's dependency tree holds no Kubernetes client"
if cargo tree -p kmesh-agent -e normal --locked --prefix none | grep -E '^(kube|kube-[a-z-]+|k8s-openapi) '; then
  echo "kmesh-agent must not depend on a Kubernetes client (design: the agent is small)" >&2
  exit 1
fi

step "build (the end-to-end tests run the workspace binaries)"
cargo build --workspace --bins --locked

step "test control plane (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd from Go modules; versions pinned in scripts/control-plane-bins.sh; built once, then cached)"
KMESH_CONTROL_PLANE_BIN_DIR=$(bash scripts/control-plane-bins.sh)
export KMESH_CONTROL_PLANE_BIN_DIR

step "unit and end-to-end tests (real kernel, root; the cluster tests run on the control plane above)"
cargo test --workspace --locked 2>&1 | tee -a "$log"

step "snapshot codec at full scale (100,000 services, 1,000,000 endpoints), release"
cargo test -p kmesh-snapshot --release --locked 2>&1 | tee -a "$log"

step "benchmark smoke runs"
cargo build --release -p kmesh-tests --bins --locked
cargo bench -p kmesh-agent --bench dataplane --locked -- --smoke
cargo bench -p kmesh-operator --bench compile --locked -- --smoke

echo
awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
