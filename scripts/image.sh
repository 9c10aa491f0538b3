#!/usr/bin/env bash
# Builds the kmesh-rs container image as an OCI archive, with no Docker engine, registry or base
# image, then checks it (scripts/image-check.sh). Run as root, from anywhere in the checkout.
#
#   1. cargo builds the static binaries on the host: release, x86_64-unknown-linux-musl, into
#      target/x86_64-unknown-linux-musl/release (beside, not instead of, the usual target/release).
#   2. buildah builds the Dockerfile (FROM scratch, COPY of those binaries) with the repository as
#      the context, in a throwaway vfs storage directory, and pushes the image into
#      $KMESH_IMAGE_ARCHIVE (default target/kmesh-rs-image.tar) as an OCI archive whose one image
#      is named $KMESH_IMAGE_NAME:<workspace version> (default docker.io/kmesh-rs/kmesh-rs).
#   3. scripts/image-check.sh unpacks the archive and runs every binary from the image's root.
#
# The buildah storage is removed on exit, also on failure; the archive is replaced only when the
# build succeeded.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

MUSL_TARGET=x86_64-unknown-linux-musl
# The binaries the image holds; the Dockerfile COPYs exactly these from target/$MUSL_TARGET/release.
IMAGE_BINARIES=(kmesh-operator kmesh-agent kmeshctl kmesh-waypoint)
image_name=${KMESH_IMAGE_NAME:-docker.io/kmesh-rs/kmesh-rs}
archive=${KMESH_IMAGE_ARCHIVE:-target/kmesh-rs-image.tar}

log() { echo "image: $*" >&2; }
fail() { echo "image: $*" >&2; exit 1; }

require_tools() {
  [ "$(id -u)" = 0 ] || fail "must run as root (buildah's vfs storage and the check's chroot need it)"
  local missing=()
  command -v buildah >/dev/null || missing+=("buildah (Debian package buildah)")
  command -v musl-gcc >/dev/null || missing+=("musl-gcc (Debian package musl-tools; ring's C code needs it)")
  command -v cargo >/dev/null || missing+=("cargo")
  if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$MUSL_TARGET"; then
    missing+=("the Rust target $MUSL_TARGET")
  fi
  [ ${#missing[@]} -eq 0 ] || fail "missing: ${missing[*]}. Run scripts/setup.sh (it installs them)."
}

# Step 1: the static binaries. Prints the seconds it took on stdout.
build_binaries() {
  local bins=() b start
  for b in "${IMAGE_BINARIES[@]}"; do bins+=(--bin "$b"); done
  log "cargo build --release --target $MUSL_TARGET ${bins[*]}"
  start=$(date +%s)
  cargo build --release --locked --target "$MUSL_TARGET" "${bins[@]}" >&2
  echo $(($(date +%s) - start))
}

# The workspace version: the image's tag and its org.opencontainers.image.version label.
workspace_version() {
  cargo metadata --format-version 1 --no-deps --locked \
    | jq -r '.packages[] | select(.name == "kmesh-operator") | .version'
}

# Step 2: the image, built in a throwaway storage directory and pushed into the OCI archive.
build_archive() {
  local version=$1 revision epoch storage tmp_archive
  revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  # The creation time and every file time in the layer are the last commit's, so the same
  # binaries give the same image digest.
  epoch=$(git log -1 --format=%ct 2>/dev/null || echo 0)
  storage=$(mktemp -d "${TMPDIR:-/tmp}/kmesh-image-buildah.XXXXXX")
  tmp_archive="$archive.tmp.$$"
  local buildah=(buildah --root "$storage/root" --runroot "$storage/run" --storage-driver vfs)
  # buildah push also writes a blob-info cache to /var/lib/containers/cache whatever --root says;
  # it is removed (with the directories, if empty) when this run created it.
  local blob_cache=/var/lib/containers/cache/blob-info-cache-v1.boltdb forget_cache=:
  [ -e "$blob_cache" ] || forget_cache="rm -f $blob_cache; rmdir /var/lib/containers/cache /var/lib/containers 2>/dev/null"
  # shellcheck disable=SC2064 # expand now: the trap must remove this run's storage.
  trap "${buildah[*]} rm --all >/dev/null 2>&1 || true; ${buildah[*]} rmi --all --force >/dev/null 2>&1 || true; rm -rf '$storage' '$tmp_archive'; $forget_cache || true" EXIT
  log "buildah bud (storage $storage)"
  "${buildah[@]}" bud --quiet --layers=false --pull=false --timestamp "$epoch" \
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
    -t "$image_name:$version" -f Dockerfile . >&2
  log "buildah push $image_name:$version oci-archive:$archive"
  "${buildah[@]}" push --quiet "$image_name:$version" "oci-archive:$tmp_archive:$image_name:$version" >&2
  mv -f "$tmp_archive" "$archive"
}

main() {
  require_tools
  local build_seconds version start image_seconds
  build_seconds=$(build_binaries)
  version=$(workspace_version)
  [ -n "$version" ] || fail "could not read the workspace version from cargo metadata"
  mkdir -p "$(dirname "$archive")"
  start=$(date +%s)
  build_archive "$version"
  image_seconds=$(($(date +%s) - start))
  bash scripts/image-check.sh "$archive" "$image_name:$version"
  log "built $archive ($(du -h "$archive" | cut -f1)) as $image_name:$version:" \
      "cargo ${build_seconds}s, buildah ${image_seconds}s"
}

main "$@"
