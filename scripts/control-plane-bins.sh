#!/usr/bin/env bash
# Builds the test control plane from Go modules, or reuses it from a cache outside the repository:
# kube-apiserver, kube-controller-manager, kube-scheduler and kubectl (Kubernetes v$K8S_VERSION) and
# etcd (v$ETCD_VERSION). The recipe is ../shared/docs/envtest.md's, run here: about 8 minutes cold on
# 2 cores, seconds when cached. Prints the bin directory on stdout; progress goes to stderr.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-1.36.3}
ETCD_VERSION=${ETCD_VERSION:-3.6.16}
cache=${KMESH_CACHE:-$HOME/.cache/kmesh-rs}
kdir=$cache/k8s-v$K8S_VERSION
edir=$cache/etcd-v$ETCD_VERSION
export GOFLAGS=-buildvcs=false GOTOOLCHAIN=local
export PATH="/usr/local/go/bin:$PATH"

log() { echo "control-plane-bins: $*" >&2; }

# Only a build needs Go (at least $GO_MIN); cached binaries are used as they are. A machine without
# it gets Go $GO_VERSION from the Go module proxy, the way `go` itself fetches toolchains
# (golang.org/toolchain), into the cache.
GO_MIN=1.26
GO_VERSION=${GO_VERSION:-1.26.8}
go_is_recent() {
  local v
  v=$(go env GOVERSION 2>/dev/null) || return 1
  v=${v#go}
  [ "$(printf '%s\n%s\n' "$GO_MIN" "$v" | sort -V | head -1)" = "$GO_MIN" ]
}
need_go() {
  go_is_recent && return
  local root=$cache/go-$GO_VERSION
  local mod="golang.org/toolchain@v0.0.1-go$GO_VERSION.linux-amd64"
  if [ ! -x "$root/$mod/bin/go" ]; then
    log "no Go $GO_MIN or later here: fetching Go $GO_VERSION from the Go module proxy into $root"
    command -v unzip >/dev/null || { log "unzip is missing (scripts/setup.sh installs it)"; exit 1; }
    mkdir -p "$root"
    curl -fsSL --retry 3 -o "$root/go.zip" \
      "https://proxy.golang.org/golang.org/toolchain/@v/v0.0.1-go$GO_VERSION.linux-amd64.zip"
    unzip -q -o "$root/go.zip" -d "$root"
    rm -f "$root/go.zip"
    # Module zips carry no file modes.
    chmod +x "$root/$mod/bin/"* "$root/$mod/pkg/tool/"*/*
  fi
  export PATH="$root/$mod/bin:$PATH"
  go_is_recent || { log "$root/$mod/bin/go is not Go $GO_MIN or later"; exit 1; }
}

k8s_bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
missing=()
for b in "${k8s_bins[@]}"; do [ -x "$kdir/bin/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -gt 0 ]; then
  need_go
  log "building ${missing[*]} v$K8S_VERSION from Go modules into $kdir (about 8 minutes cold on 2 cores)"
  mkdir -p "$kdir/bin" "$kdir/mod"
  cd "$kdir/mod"
  printf 'module local/k8sbins\n\ngo 1.26.0\n\ngodebug default=go1.26\n' > go.mod
  gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
  # Every staging module k8s.io/kubernetes replaces with a directory is tagged v0.Y.Z for v1.Y.Z.
  go mod edit $(grep -oE '^\s*k8s.io/[a-z0-9-]+ => ./staging/src/k8s.io/[a-z0-9-]+' "$gomod" \
    | awk -v v="0.${K8S_VERSION#1.}" '{print "-replace="$1"="$1"@v"v}')
  pkgs=()
  for b in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  log "go get ${pkgs[*]}"
  go get "${pkgs[@]/%/@v$K8S_VERSION}"
  minor=${K8S_VERSION#1.}; minor=${minor%%.*}
  ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  done
  for p in "${pkgs[@]}"; do
    log "go build $p"
    go build -trimpath -ldflags "$ld" -o "$kdir/bin/" "$p"
  done
fi

if [ ! -x "$edir/bin/etcd" ]; then
  need_go
  log "building etcd v$ETCD_VERSION from Go modules into $edir"
  mkdir -p "$edir/bin" "$edir/mod"
  cd "$edir/mod"
  printf 'module local/etcdbin\n\ngo 1.26.0\n' > go.mod
  go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
  go build -trimpath -ldflags "-s -w" -o "$edir/bin/etcd" go.etcd.io/etcd/server/v3
fi

# One directory holding all five, so a test needs one path.
mkdir -p "$cache/bin-k8s-v$K8S_VERSION-etcd-v$ETCD_VERSION"
out=$cache/bin-k8s-v$K8S_VERSION-etcd-v$ETCD_VERSION
for b in "${k8s_bins[@]}"; do ln -sf "$kdir/bin/$b" "$out/$b"; done
ln -sf "$edir/bin/etcd" "$out/etcd"
log "ready: $("$out/kube-apiserver" --version 2>/dev/null), $("$out/etcd" --version 2>/dev/null | head -1)"
echo "$out"
