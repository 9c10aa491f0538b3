#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and run kmesh-rs, and prepares the kernel
# facilities the agent and the tests use. Idempotent: every step checks before it acts.
# Needs root (apt, bpffs, cgroups, netns).
set -euo pipefail

BPF_LINKER_VERSION=0.13.0
CARGO_FUZZ_VERSION=0.13.2
LLVM_VERSION=22
here=$(cd "$(dirname "$0")/.." && pwd)

log() { echo "setup: $*" >&2; }

# --no-kernel: only the build toolchain (image builds, where there is no bpffs or cgroup to prepare).
kernel=yes
[ "${1:-}" = "--no-kernel" ] && kernel=no

if [ "$(id -u)" != 0 ]; then
  echo "setup: must run as root (apt-get, bpffs, cgroups and network namespaces need it)" >&2
  exit 1
fi

# 1. Debian packages: LLVM for bpf-linker, iproute2 for the netns harness, unzip for the Go
# toolchain that scripts/control-plane-bins.sh fetches when Go is missing, wrk for the
# benchmarks' HTTP runs, haproxy for the data plane benchmark's proxy pair (the sidecars' shape),
# DejaVu Sans for the benchmarks' charts (bench-plots).
need_pkgs=()
for p in llvm-${LLVM_VERSION}-dev libpolly-${LLVM_VERSION}-dev libzstd-dev zlib1g-dev iproute2 curl ca-certificates pkg-config build-essential unzip wrk haproxy fonts-dejavu-core; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# 1a. nginx for the waypoint benchmark's baseline (an L7 reverse proxy with the same route): the
# benchmark runs its own nginx, with its own configuration, in a test pod. Debian's package starts
# a system nginx on port 80 when installed; service starts are forbidden for the install (unless a
# policy-rc.d already decides), and the service is disabled at boot.
if [ ! -x /usr/sbin/nginx ]; then
  log "installing nginx-light (the waypoint benchmark's baseline; no system service)"
  own_policy=no
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=yes
  fi
  apt-get update -qq
  installed=yes
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null || installed=no
  [ "$own_policy" = yes ] && rm -f /usr/sbin/policy-rc.d
  [ "$installed" = yes ] || { echo "setup: apt-get install nginx-light failed" >&2; exit 1; }
  if [ -d /run/systemd/system ]; then
    systemctl disable --now nginx >/dev/null 2>&1 || true
  else
    update-rc.d nginx disable >/dev/null 2>&1 || true
  fi
fi

# 1b. The image build (scripts/image.sh): buildah, and musl-gcc for ring's C code in the static
# (musl) binaries; jq reads the image's JSON. Without recommends: buildah's are container runtimes,
# and a FROM scratch image built by COPY alone never runs a container.
need_pkgs=()
for p in buildah musl-tools jq; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]} (image build)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# 2. Rust: stable toolchain with rust-src (the eBPF crate rebuilds `core` for bpfel-unknown-none).
if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    log "installing rustup + stable toolchain"
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain stable
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi
sysroot=$(rustc --print sysroot)
if [ ! -d "$sysroot/lib/rustlib/src/rust/library/core" ]; then
  log "adding rust-src"
  if ! rustup component add rust-src 2>/dev/null; then
    fallback="$here/../shared/toolchain/rust-src-$(rustc --version | awk '{print $2}').tar.xz"
    [ -f "$fallback" ] || { echo "setup: rust-src unavailable and no fallback at $fallback" >&2; exit 1; }
    log "rustup could not add rust-src; unpacking $fallback"
    tar xJf "$fallback" -C "$sysroot/lib/rustlib/"
  fi
fi

# The image's binaries are static: built for musl.
if ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
  log "adding the Rust target x86_64-unknown-linux-musl (static binaries for the image)"
  rustup target add x86_64-unknown-linux-musl
fi

# 3. bpf-linker, built against Debian's LLVM (rustc's LLVM is the same major version).
if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  log "building bpf-linker $BPF_LINKER_VERSION against LLVM $LLVM_VERSION (a few minutes)"
  env LLVM_PREFIX=/usr/lib/llvm-${LLVM_VERSION} "LLVM_SYS_${LLVM_VERSION}1_PREFIX=/usr/lib/llvm-${LLVM_VERSION}" \
    "PATH=/usr/lib/llvm-${LLVM_VERSION}/bin:$PATH" \
    cargo install bpf-linker --version "$BPF_LINKER_VERSION" --locked --no-default-features --features llvm-${LLVM_VERSION}
fi

# 4. cargo-fuzz, for scripts/fuzz.sh (tests only: image builds skip it).
if [ "$kernel" = yes ] && ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  log "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

# 5. Kernel facilities: bpffs for pins; cgroup v2 must be mounted somewhere.
if [ "$kernel" = no ]; then
  log "ok (toolchain only): $(rustc --version), $(bpf-linker --version)"
  exit 0
fi
if ! awk '$3=="bpf"{found=1} END{exit !found}' /proc/mounts; then
  log "mounting bpffs on /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi
if ! awk '$3=="cgroup2"{found=1} END{exit !found}' /proc/mounts; then
  echo "setup: no cgroup v2 hierarchy is mounted; kmesh-rs attaches its programs to a cgroup v2" >&2
  exit 1
fi
log "ok: $(rustc --version), $(bpf-linker --version)"
