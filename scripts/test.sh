#!/usr/bin/env bash
# Every test: set up this machine (scripts/setup.sh), then lint, build, run the unit tests and the
# real-kernel end-to-end tests, the snapshot codec at full scale in release mode, and a smoke run of
# the benchmark. Run as root. Exits non-zero on the first failure; the last line counts the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# Golden tests rewrite their expected output when KMESH_UPDATE_GOLDEN is set, and would then pass
# whatever the compiler produced: a test run must never start with it.
if [[ -n "${KMESH_UPDATE_GOLDEN+set}" ]]; then
  echo "scripts/test.sh: KMESH_UPDATE_GOLDEN is set, so the golden tests would rewrite the goldens" \
       "instead of checking them. Unset it. (To regenerate goldens after an intended change, run" \
       "KMESH_UPDATE_GOLDEN=1 cargo test -p kmesh-operator --test compile and review the diff.)" >&2
  exit 1
fi
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
log=$(mktemp)
release_log=$(mktemp)
trap 'rm -f "$log" "$release_log"' EXIT

# Sums cargo's "test result:" lines of a log: passed failed ignored filtered-out.
count_tests() {
  awk '/^test result:/ { for (i = 1; i < NF; i++) {
         if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i
         if ($(i+1) ~ /^ignored/) g += $i; if ($(i+1) == "filtered") o += $i } }
       END { printf "%d %d %d %d\n", p, f, g, o }' "$1"
}

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
cargo test -p kmesh-snapshot --release --locked 2>&1 | tee "$release_log"

step "fuzz smoke run (snapshot decoder and encoder, operator input path)"
bash scripts/fuzz.sh --smoke

# The smoke runs show that the benchmarks run and print their ratios; they are built in the test
# profile, beside everything above, because a release build of the operator and the test harness
# (kube and all) would add about 10 minutes to a cold run. Measurements are `cargo bench` (release).
step "benchmark smoke runs (test profile; measurements: cargo bench)"
cargo test -p kmesh-agent --bench dataplane --locked -- --smoke
cargo test -p kmesh-agent --bench events --locked -- --smoke
cargo test -p kmesh-agent --bench authz --locked -- --smoke
cargo test -p kmesh-agent --bench waypoint --locked -- --smoke
cargo test -p kmesh-operator --bench compile --locked -- --smoke
cargo test -p kmesh-operator --bench fanout --locked -- --smoke

step "the OCI image: static musl binaries in a FROM scratch image, unpacked and run from its root"
bash scripts/image.sh

# Each test is counted once, from the workspace run. The release run repeats kmesh-snapshot's
# tests (the same tests, one of them at full scale), so it is reported beside the count, not added.
echo
read -r rp rf _ _ < <(count_tests "$release_log")
echo "(kmesh-snapshot's tests again in release mode, not counted twice: $rp passed, $rf failed)"
read -r p f g o < <(count_tests "$log")
echo "tests: $p passed, $f failed, $g ignored, $o filtered out"
