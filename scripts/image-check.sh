#!/usr/bin/env bash
# The image test: checks an OCI archive made by scripts/image.sh the way a container runtime would
# use it, with nothing but tar, jq, sha256sum, readelf and chroot. Run as root.
#
#   scripts/image-check.sh ARCHIVE [EXPECTED_NAME]
#
# It unpacks the archive, follows index.json to the one manifest and its config, verifies every
# blob against its digest and size, unpacks the layers in order into an empty root, and checks:
# the root holds exactly the expected files, owned by root and not writable by the image's user;
# each binary has no ELF interpreter and no shared-library dependency; the config's User,
# Entrypoint, Env and labels; and each binary's --help runs in the image's root (chroot, so nothing
# from the host can be loaded), as the image's user, and prints its usage. Exits non-zero with the
# reason on the first failure. The temporary root is removed on exit.
set -euo pipefail

# What the image must be; the Dockerfile is the other side of this contract.
EXPECTED_USER="65532:65532"
EXPECTED_ENTRYPOINT='["/usr/local/bin/kmesh-operator"]'
EXPECTED_PATH_ENV="PATH=/usr/local/bin"
BIN_DIR=usr/local/bin
EXPECTED_BINARIES=(kmesh-agent kmesh-operator kmesh-waypoint kmeshctl)
EXPECTED_LABELS=(org.opencontainers.image.title org.opencontainers.image.version
                 org.opencontainers.image.licenses org.opencontainers.image.revision)

archive=${1:?usage: scripts/image-check.sh ARCHIVE [EXPECTED_NAME]}
expected_name=${2:-}
checks=0

fail() { echo "image-check: FAILED: $*" >&2; exit 1; }
ok() { checks=$((checks + 1)); echo "image-check: ok: $*"; }

[ "$(id -u)" = 0 ] || fail "must run as root (chroot, and unpacking layers with their owners)"
[ -f "$archive" ] || fail "no archive at $archive (build it with scripts/image.sh)"
work=$(mktemp -d "${TMPDIR:-/tmp}/kmesh-image-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
layout=$work/layout
root=$work/root
manifest= # set by read_index
config=   # set by read_index
mkdir -p "$layout" "$root"

# The path of the blob a digest names (pure: check_blob verifies it).
blob_path() { echo "$layout/blobs/sha256/${1#sha256:}"; }

# Checks that the blob a descriptor names is in the archive with its size and sha256.
check_blob() {
  local digest=$1 size=$2 path
  [[ $digest =~ ^sha256:[0-9a-f]{64}$ ]] || fail "unsupported or malformed digest '$digest'"
  path=$(blob_path "$digest")
  [ -f "$path" ] || fail "blob $digest is referenced but missing from the archive"
  [ "$(stat -c %s "$path")" = "$size" ] || fail "blob $digest is $(stat -c %s "$path") bytes, its descriptor says $size"
  [ "sha256:$(sha256sum "$path" | cut -d' ' -f1)" = "$digest" ] || fail "blob $digest does not hash to its digest"
}

# Checks the layout and the index; sets $manifest to the path of the one image manifest.
read_index() {
  tar -xf "$archive" -C "$layout" || fail "$archive is not a tar archive"
  [ -f "$layout/oci-layout" ] || fail "$archive has no oci-layout file: not an OCI archive"
  [ "$(jq -r .imageLayoutVersion "$layout/oci-layout")" = 1.0.0 ] || fail "oci-layout version is not 1.0.0"
  local index=$layout/index.json count media name
  [ -f "$index" ] || fail "$archive has no index.json"
  count=$(jq '.manifests | length' "$index")
  [ "$count" = 1 ] || fail "index.json lists $count manifests, expected exactly one image"
  media=$(jq -r '.manifests[0].mediaType' "$index")
  [ "$media" = application/vnd.oci.image.manifest.v1+json ] || fail "the index entry is a $media, expected an OCI image manifest"
  name=$(jq -r '.manifests[0].annotations["org.opencontainers.image.ref.name"] // ""' "$index")
  [ -n "$name" ] || fail "the image has no org.opencontainers.image.ref.name (ctr import would name it import-<date>)"
  if [ -n "$expected_name" ]; then
    [ "$name" = "$expected_name" ] || fail "the image is named '$name', expected '$expected_name'"
  fi
  check_blob "$(jq -r '.manifests[0].digest' "$index")" "$(jq -r '.manifests[0].size' "$index")"
  manifest=$(blob_path "$(jq -r '.manifests[0].digest' "$index")")
  [ "$(jq -r .mediaType "$manifest")" = application/vnd.oci.image.manifest.v1+json ] || fail "the manifest is not an OCI image manifest"
  check_blob "$(jq -r .config.digest "$manifest")" "$(jq -r .config.size "$manifest")"
  config=$(blob_path "$(jq -r .config.digest "$manifest")")
  ok "OCI layout 1.0.0 with one image manifest, named $name; manifest and config verified"
}

# Checks the image config (platform, user, entrypoint, environment, labels).
check_config() {
  local value label
  [ "$(jq -r '.os + "/" + .architecture' "$config")" = linux/amd64 ] || fail "the image is for $(jq -r '.os + "/" + .architecture' "$config"), expected linux/amd64"
  value=$(jq -r '.config.User // ""' "$config")
  [ "$value" = "$EXPECTED_USER" ] || fail "the image's User is '$value', expected '$EXPECTED_USER' (runAsNonRoot needs a numeric non-root user)"
  value=$(jq -c '.config.Entrypoint' "$config")
  [ "$value" = "$EXPECTED_ENTRYPOINT" ] || fail "the image's Entrypoint is $value, expected $EXPECTED_ENTRYPOINT"
  jq -e --arg p "$EXPECTED_PATH_ENV" '.config.Env | index($p)' "$config" >/dev/null \
    || fail "the image's Env lacks $EXPECTED_PATH_ENV: $(jq -c '.config.Env' "$config")"
  for label in "${EXPECTED_LABELS[@]}"; do
    value=$(jq -r --arg l "$label" '.config.Labels[$l] // ""' "$config")
    if [ -z "$value" ] || [ "$value" = unknown ]; then fail "the image's label $label is '${value:-missing}'"; fi
  done
  ok "config: linux/amd64, User $EXPECTED_USER, Entrypoint $EXPECTED_ENTRYPOINT, $EXPECTED_PATH_ENV, labels ${EXPECTED_LABELS[*]}"
}

# Unpacks each layer in order into $root, refusing what this image must not contain.
unpack_layers() {
  local count i digest media blob listing
  count=$(jq '.layers | length' "$manifest")
  [ "$count" -ge 1 ] || fail "the manifest has no layers"
  [ "$(jq '.rootfs.diff_ids | length' "$config")" = "$count" ] || fail "the config's diff_ids do not match the manifest's $count layers"
  for ((i = 0; i < count; i++)); do
    media=$(jq -r ".layers[$i].mediaType" "$manifest")
    case $media in
      application/vnd.oci.image.layer.v1.tar+gzip | application/vnd.oci.image.layer.v1.tar) ;;
      *) fail "layer $i has media type $media, expected an OCI tar or tar+gzip layer" ;;
    esac
    digest=$(jq -r ".layers[$i].digest" "$manifest")
    check_blob "$digest" "$(jq -r ".layers[$i].size" "$manifest")"
    blob=$(blob_path "$digest")
    # The diff_id is the digest of the uncompressed tar (gzip -dcf passes an uncompressed one through).
    [ "sha256:$(gzip -dcf "$blob" | sha256sum | cut -d' ' -f1)" = "$(jq -r ".rootfs.diff_ids[$i]" "$config")" ] \
      || fail "layer $i does not match its diff_id in the config"
    listing=$(tar -tvf "$blob") || fail "layer $i is not a readable tar"
    # A scratch image built by COPY has only directories and regular files: whiteouts, links,
    # devices, absolute paths or '..' would mean a different image than the Dockerfile says.
    if grep -Ev '^[-d]' <<<"$listing"; then fail "layer $i holds entries other than files and directories (above)"; fi
    if tar -tf "$blob" | grep -E '(^/|(^|/)\.\.(/|$)|(^|/)\.wh\.)'; then fail "layer $i holds absolute, '..' or whiteout paths (above)"; fi
    tar -xf "$blob" -C "$root" --numeric-owner --same-permissions || fail "unpacking layer $i failed"
  done
  ok "$count layer(s): digests, sizes and diff_ids verified, unpacked into an empty root"
}

# The root holds exactly the expected binaries, owned by root, executable and not writable by others.
check_files() {
  local expected actual b
  expected=$(printf '%s\n' usr usr/local "$BIN_DIR" "${EXPECTED_BINARIES[@]/#/$BIN_DIR/}" | sort)
  actual=$(cd "$root" && find . -mindepth 1 -printf '%P\n' | sort)
  [ "$actual" = "$expected" ] || fail "the image's files differ from the expected ones:$(diff <(echo "$expected") <(echo "$actual") | sed 's/^/ /')"
  for b in "${EXPECTED_BINARIES[@]}"; do
    [ "$(stat -c '%u:%g %a' "$root/$BIN_DIR/$b")" = "0:0 755" ] \
      || fail "$BIN_DIR/$b is $(stat -c '%u:%g mode %a' "$root/$BIN_DIR/$b"), expected root-owned mode 755"
  done
  ok "files: exactly ${EXPECTED_BINARIES[*]} in /$BIN_DIR, root-owned, mode 755"
}

# Each binary is static: no program interpreter and no needed shared library.
check_static() {
  local b path
  for b in "${EXPECTED_BINARIES[@]}"; do
    path=$root/$BIN_DIR/$b
    readelf -h "$path" >/dev/null 2>&1 || fail "$BIN_DIR/$b is not an ELF file"
    if readelf -lW "$path" | grep -q 'INTERP'; then fail "$BIN_DIR/$b is dynamically linked: $(readelf -lW "$path" | grep -o 'interpreter: [^]]*')"; fi
    if readelf -dW "$path" | grep -q '(NEEDED)'; then fail "$BIN_DIR/$b needs shared libraries: $(readelf -dW "$path" | grep '(NEEDED)' | grep -o '\[.*\]' | tr '\n' ' ')"; fi
  done
  ok "static: no ELF interpreter, no shared library in ${EXPECTED_BINARIES[*]}"
}

# Runs `BINARY --help` inside the image's root as the image's user, with only the image's Env.
check_runs() {
  local user entrypoint b out chroot_bin
  # Resolved on the host's PATH: `env -i` leaves only the image's PATH for the binary itself.
  chroot_bin=$(command -v chroot) || fail "chroot is not installed"
  user=$(jq -r '.config.User' "$config")
  entrypoint=$(jq -r '.config.Entrypoint[0]' "$config")
  for b in "${EXPECTED_BINARIES[@]}"; do
    out=$(env -i "$EXPECTED_PATH_ENV" "$chroot_bin" --userspec="$user" "$root" "/$BIN_DIR/$b" --help 2>&1) \
      || fail "'/$BIN_DIR/$b --help' exited with status $? in the image's root (as $user): $out"
    grep -q "^Usage: $b" <<<"$out" || fail "'/$BIN_DIR/$b --help' printed no 'Usage: $b' line: $out"
    ok "/$BIN_DIR/$b --help runs in the image's root as $user"
  done
  out=$(env -i "$EXPECTED_PATH_ENV" "$chroot_bin" --userspec="$user" "$root" "$entrypoint" --help 2>&1) \
    || fail "the entrypoint $entrypoint --help failed in the image's root: $out"
  ok "the entrypoint $entrypoint runs"
}

main() {
  read_index
  check_config
  unpack_layers
  check_files
  check_static
  check_runs
  echo "image-check: $archive: all $checks checks passed"
}

main
