#!/usr/bin/env bash
# The main job: set up this machine (scripts/setup.sh), build kmesh-rs, and run the local demo: the
# real kmesh-operator compiling Istio's bookinfo YAML from a directory (--source dir:) and serving
# the real kmesh-agent, which steers connections between network-namespace pods in the kernel.
#
#   scripts/demo.sh            the local demo (a few seconds once built)
#   scripts/demo.sh --cluster  the same story on a real control plane (etcd, kube-apiserver,
#                              controller-manager, scheduler, two nodes), installed and driven with
#                              kubectl, each command printed; builds the control-plane binaries
#                              once (about 8 minutes cold, then cached), then about a minute
#
# Run as root. Ctrl-C stops the demo and removes everything it made.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "" | --cluster | -h | --help) ;;
  *) echo "usage: scripts/demo.sh [--cluster]" >&2; exit 2 ;;
esac
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --workspace --bins
if [ "${1:-}" = --cluster ]; then
  KMESH_CONTROL_PLANE_BIN_DIR=$(bash scripts/control-plane-bins.sh)
  export KMESH_CONTROL_PLANE_BIN_DIR
fi
exec ./target/debug/kmesh-demo "$@"
