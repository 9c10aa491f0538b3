#!/usr/bin/env bash
# The main job: set up this machine (scripts/setup.sh), build kmesh-rs, and run the local demo:
# the real kmesh-agent steering connections between network-namespace pods from snapshots.
# Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --workspace --bins
exec ./target/debug/kmesh-demo
