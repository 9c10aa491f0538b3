#!/usr/bin/env bash
# Fuzzing of kmesh-rs's two input paths with cargo-fuzz (libFuzzer): the snapshot decoder and
# encoder (targets snapshot_decode, snapshot_roundtrip) and the operator's YAML/JSON input path
# through the compiler (operator_compile). The targets and their oracles are in fuzz/; the committed,
# minimized corpora in fuzz/corpus/<target>; the compiler's dictionary in fuzz/dict/.
#
#   scripts/fuzz.sh --smoke                  CI: each target for SMOKE_SECONDS (default 20) over its
#                                            corpus; fails on any crash. No sanitizer (see below).
#   scripts/fuzz.sh --long [TARGET ...]      RUNS (default 10^7) executions per target, or
#                                            LONG_SECONDS per target if set (whichever ends first),
#                                            at nice NICE (default 10; do not wrap it in another
#                                            nice); new inputs go to fuzz/work/<target>, the log to
#                                            fuzz/work/<target>.log. FORK=N runs N libFuzzer
#                                            workers (-fork=N; executions are counted over all).
#                                            JOBS=N runs N independent workers instead (-jobs=N,
#                                            RUNS/N executions each, sharing fuzz/work/<target>;
#                                            their logs are fuzz/work/<target>.job<i>.log): on
#                                            the compiler nearly twice fork mode's speed, which
#                                            restarts its workers and replays inputs all the time.
#   scripts/fuzz.sh --merge [TARGET ...]     adds to fuzz/corpus what fuzz/work holds that reaches new
#                                            code (review the size, then commit).
#   scripts/fuzz.sh --seed                   rebuilds fuzz/corpus and fuzz/dict from their sources
#                                            (kmeshctl output of tests/fixtures and
#                                            ../shared/reference), minimized with cargo fuzz cmin.
#   scripts/fuzz.sh --coverage [TARGET ...]  line coverage of the corpus (llvm-cov of LLVM 22).
#
# The smoke run is an unoptimized build without a sanitizer: the code is safe Rust apart from the
# decoder's record copies, the smoke run looks for panics, and an optimized or ASan build of the
# operator's dependency tree costs three times the CPU. The long runs of the snapshot targets use
# ASan, which also checks those unsafe copies (see long_build). Every build keeps debug assertions
# and overflow checks on. Crashes are written to fuzz/artifacts/<target>/; keep a
# reproducer as a test in snapshot/tests/fuzz_regressions.rs or operator/tests/fuzz_regressions.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
export PATH="$HOME/.cargo/bin:$PATH"
# cargo-fuzz passes a few nightly-only flags (-Zsanitizer, -Cllvm-args for sancov); stable rustc
# accepts them with RUSTC_BOOTSTRAP=1, scoped to these builds (fuzz/ is its own workspace).
export RUSTC_BOOTSTRAP=1
export CARGO_INCREMENTAL=0 CARGO_PROFILE_DEV_DEBUG=0

TARGETS=(snapshot_decode snapshot_roundtrip operator_compile)
SMOKE_SECONDS=${SMOKE_SECONDS:-20}
RUNS=${RUNS:-10000000}
LONG_SECONDS=${LONG_SECONDS:-0}
NICE=${NICE:-10}
LLVM_BIN=/usr/lib/llvm-22/bin
shared="$repo/../shared/reference"

log() { echo "fuzz: $*" >&2; }

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# libFuzzer options per target: the compiler's inputs are YAML text (dictionary of schema keys,
# longer inputs), the decoder's are snapshots of a few KB.
target_options() {
  case "$1" in
    operator_compile) echo "-dict=$repo/fuzz/dict/operator_compile.dict -max_len=16384 -timeout=30" ;;
    snapshot_decode) echo "-max_len=8192 -timeout=10" ;;
    snapshot_roundtrip) echo "-max_len=4096 -timeout=10" ;;
  esac
}

# The long runs' build: AddressSanitizer for the snapshot targets (the decoder copies records with
# unsafe code). The compiler's target is two orders of magnitude slower (YAML parsing is most of a
# run) and safe Rust down to the YAML parser, so it runs without a sanitizer, about twice as fast,
# from its own target directory (another set of RUSTFLAGS would rebuild everything).
long_build() {
  case "$1" in
    operator_compile) echo plain ;;
    *) echo thorough ;;
  esac
}

# AddressSanitizer without allocation stack traces or malloc fill: a third faster, errors are still
# caught (an ASan report then lacks the allocation's stack).
export ASAN_OPTIONS=${ASAN_OPTIONS:-malloc_context_size=0:max_malloc_fill_size=0}

# cargo fuzz build flags. quick: unoptimized, no sanitizer, for the smoke run, seeding and
# minimizing (a third of the build time of an optimized build). thorough: optimized, with
# AddressSanitizer; plain: optimized, no sanitizer (see long_build). All keep debug assertions and
# overflow checks.
build_flags() {
  case "$1" in
    quick) echo "--dev --sanitizer none" ;;
    thorough) echo "--release --debug-assertions --sanitizer address" ;;
    plain) echo "--release --debug-assertions --sanitizer none --target-dir target/plain" ;;
  esac
}

# The figures of a libFuzzer log: the corpus loaded, the last status line, executions and speed.
# Each grep may find nothing (a log has either the plain or the fork-mode lines): under pipefail
# that must not end the script.
summarize() {
  {
    grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$1" || true
    # Fork mode prints a status line per job instead: the last one holds the totals.
    { grep -E '^#[0-9]+: cov:' "$1" || true; } | tail -n 1
  } | sed 's/^/    /' >&2
}

targets_or_all() {
  if [ $# -gt 0 ]; then echo "$@"; else echo "${TARGETS[@]}"; fi
}

require_cargo_fuzz() {
  cargo fuzz --version >/dev/null 2>&1 || {
    echo "fuzz: cargo-fuzz is missing; scripts/setup.sh installs it" >&2
    exit 1
  }
}

smoke() {
  local start
  start=$(date +%s)
  # cargo fuzz has no --locked: check fuzz/Cargo.lock is complete as the main build's --locked does.
  cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null
  log "building the targets (unoptimized, no sanitizer)"
  (cd fuzz && cargo fuzz build $(build_flags quick))
  log "build took $(($(date +%s) - start)) s"
  for t in "${TARGETS[@]}"; do
    # New inputs go to a scratch directory: the committed corpus is only read.
    mkdir -p "$scratch/$t"
    log "$t: the corpus, then ${SMOKE_SECONDS} s of fuzzing"
    if ! (cd fuzz && cargo fuzz run $(build_flags quick) "$t" "$scratch/$t" "corpus/$t" -- \
      $(target_options "$t") -max_total_time="$SMOKE_SECONDS" -print_final_stats=1) >"$scratch/$t.log" 2>&1; then
      tail -n 40 "$scratch/$t.log" >&2
      log "$t: FAILED; the input is in fuzz/artifacts/$t"
      exit 1
    fi
    summarize "$scratch/$t.log"
  done
  log "smoke run passed in $(($(date +%s) - start)) s"
}

long() {
  local t
  for t in $(targets_or_all "$@"); do
    mkdir -p "fuzz/work/$t"
    log "$t: $RUNS executions or $LONG_SECONDS s (0: no limit), whichever ends first; log in fuzz/work/$t.log"
    local runs=$RUNS parallel=() status=0 i
    if [ -n "${JOBS:-}" ]; then
      runs=$((RUNS / JOBS))
      parallel=(-jobs="$JOBS" -workers="$JOBS")
      rm -f fuzz/fuzz-*.log
    fi
    (cd fuzz && nice -n "$NICE" cargo fuzz run $(build_flags "$(long_build "$t")") "$t" "work/$t" "corpus/$t" -- \
      $(target_options "$t") -runs="$runs" -max_total_time="$LONG_SECONDS" ${FORK:+-fork="$FORK"} \
      "${parallel[@]}" -print_final_stats=1) >"fuzz/work/$t.log" 2>&1 || status=$?
    # With -jobs each worker writes fuzz-<i>.log in the fuzz directory.
    for i in $(seq 0 $((${JOBS:-0} - 1))); do
      [ -f "fuzz/fuzz-$i.log" ] && mv "fuzz/fuzz-$i.log" "fuzz/work/$t.job$i.log"
    done
    if [ "$status" -ne 0 ]; then
      tail -n 40 "fuzz/work/$t.log" ${JOBS:+fuzz/work/$t.job*.log} >&2
      log "$t: FAILED; the input is in fuzz/artifacts/$t"
      exit 1
    fi
    summarize "fuzz/work/$t.log"
    for i in $(seq 0 $((${JOBS:-0} - 1))); do
      log "$t: worker $i"
      summarize "fuzz/work/$t.job$i.log"
    done
  done
}

merge() {
  local t
  for t in $(targets_or_all "$@"); do
    log "$t: merging fuzz/work/$t into fuzz/corpus/$t"
    # New edges only (-use_counters=0): with hit counts as features a long compiler run would add
    # thousands of inputs (31 MB after 10^6 executions instead of 5.7 MB).
    (cd fuzz && cargo fuzz run $(build_flags "$(long_build "$t")") "$t" "corpus/$t" "work/$t" -- \
      $(target_options "$t") -merge=1 -use_counters=0)
    du -sh "fuzz/corpus/$t"
  done
}

# The seeds of the compiler: every reference object file (no CRD schemas), the bookinfo cluster
# with each bookinfo networking and Gateway API sample and with each of fuzz/seeds/operator_compile
# (KmeshConfig modes and capacity, ServiceEntries), the Gateway API test fixtures, and JSON
# renderings of the bookinfo combinations (for Inputs::add_json).
seed_compiler() {
  local out=$1 f n=0
  while IFS= read -r f; do
    n=$((n + 1))
    cp "$f" "$out/ref-$n.yaml"
  done < <(find "$shared" -name '*.yaml' -size -16k -not -path '*/crd/*' -not -name 'crd-all.gen.yaml' | sort)
  cp tests/fixtures/bookinfo/cluster.yaml "$out/bookinfo-cluster.yaml"
  for f in tests/fixtures/gamma/*.yaml; do cp "$f" "$out/gamma-$(basename "$f")"; done
  for f in "$shared"/istio/samples/bookinfo/networking/*.yaml "$shared"/istio/samples/bookinfo/gateway-api/*.yaml \
    fuzz/seeds/operator_compile/*.yaml; do
    local name
    name=bookinfo+$(basename "$f" .yaml)
    { cat tests/fixtures/bookinfo/cluster.yaml; echo '---'; cat "$f"; } >"$out/$name.yaml"
    # One JSON object a document, one per line (Debian's yq, a jq wrapper).
    yq -c 'select(. != null)' "$out/$name.yaml" | sed '1!s/^/---\n/' >"$out/$name.json"
  done
}

# The seeds of the decoder: kmeshctl's binary output for the bookinfo combinations and the Gateway
# API fixtures, and the builder's snapshots with authorization tables (snapshot/examples/fuzz_seeds.rs).
seed_decoder() {
  local out=$1 f
  cargo run -p kmesh-snapshot --example fuzz_seeds --locked -q -- "$out"
  cargo build -p kmesh-operator --bin kmeshctl --locked -q
  for f in "$shared"/istio/samples/bookinfo/networking/{destination-rule-all,virtual-service-reviews-90-10,virtual-service-reviews-50-v3,virtual-service-all-v1}.yaml; do
    target/debug/kmeshctl compile --node node-1 -o binary -f tests/fixtures/bookinfo/cluster.yaml \
      -f "$shared/istio/samples/bookinfo/networking/destination-rule-all.yaml" -f "$f" \
      >"$out/bookinfo-$(basename "$f" .yaml).bin" 2>/dev/null || true
  done
  target/debug/kmeshctl compile --node node-2 -o binary -f tests/fixtures/bookinfo/cluster.yaml \
    >"$out/bookinfo-node-2.bin" 2>/dev/null || true
  for f in tests/fixtures/gamma/istio-*.yaml; do
    target/debug/kmeshctl compile --node node-1 -o binary -f tests/fixtures/gamma/foo.yaml -f "$f" \
      >"$out/gamma-$(basename "$f" .yaml).bin" 2>/dev/null || true
  done
  find "$out" -size 0 -delete
}

# The compiler's dictionary: the property names and enum values of the schemas of every kind the
# compiler reads (Istio networking CRDs, Gateway API HTTPRoute/TCPRoute/ReferenceGrant, KmeshConfig),
# the keys of the core objects in the fixtures, apiVersions, kinds and YAML punctuation.
seed_dictionary() {
  local out=fuzz/dict/operator_compile.dict
  {
    echo "# libFuzzer dictionary for operator_compile; generated by scripts/fuzz.sh --seed"
    {
      yq -r '.. | objects | .properties? // empty | keys[]' \
        "$shared"/gateway-api/config/crd/standard/gateway.networking.k8s.io_{httproutes,tcproutes,referencegrants}.yaml \
        crds/*.yaml
      yq -r 'select(.spec.group == "networking.istio.io") | .. | objects | .properties? // empty | keys[]' \
        "$shared/istio/manifests/charts/base/files/crd-all.gen.yaml"
      yq -r '.. | objects | .enum? // empty | .[] | strings' \
        "$shared"/gateway-api/config/crd/standard/gateway.networking.k8s.io_{httproutes,tcproutes}.yaml crds/*.yaml
      yq -r 'select(.spec.group == "networking.istio.io") | .. | objects | .enum? // empty | .[] | strings' \
        "$shared/istio/manifests/charts/base/files/crd-all.gen.yaml"
      yq -r '.. | objects | keys[]' tests/fixtures/*/*.yaml fuzz/seeds/operator_compile/*.yaml
      yq -r '.apiVersion // empty, .kind // empty' "$shared"/istio/samples/bookinfo/networking/*.yaml \
        "$shared"/gateway-api/examples/standard/*.yaml tests/fixtures/*/*.yaml fuzz/seeds/operator_compile/*.yaml
    } | grep -E '^[A-Za-z0-9_./-]{2,40}$' | sort -u | sed 's/.*/"&"/'
    printf '"%s"\n' '---' ': ' '- ' '{}' '[]' '"' 'null' 'true' '0.0.0.0' '10.96.0.1' '::1' 'fd00::1'
    # Numeric boundaries of the fields the compiler converts (ports, weights, counts).
    printf '"%s"\n' 0 -1 65535 65536 1000000 1000001 2147483647 2147483648 4294967295 4294967296 \
      9223372036854775807 18446744073709551615
  } | awk '!seen[$0]++' >"$out"
  log "$(grep -c '^"' "$out") dictionary entries in $out"
}

seed() {
  command -v yq >/dev/null || { echo "fuzz: --seed needs yq (apt-get install yq)" >&2; exit 1; }
  [ -d "$shared" ] || { echo "fuzz: $shared is missing" >&2; exit 1; }
  local t
  mkdir -p "$scratch"/{operator_compile,snapshot_decode,snapshot_roundtrip} fuzz/dict
  seed_compiler "$scratch/operator_compile"
  seed_decoder "$scratch/snapshot_decode"
  seed_dictionary
  # snapshot_roundtrip's input is an `arbitrary` plan: it starts from nothing and keeps what it
  # found in a short run.
  (cd fuzz && cargo fuzz run $(build_flags quick) snapshot_roundtrip "$scratch/snapshot_roundtrip" -- \
    $(target_options snapshot_roundtrip) -max_total_time=60 2>&1 | tail -1)
  for t in "${TARGETS[@]}"; do
    rm -rf "fuzz/corpus/$t"
    mkdir -p "fuzz/corpus/$t"
    cp "$scratch/$t"/* "fuzz/corpus/$t/"
    log "$t: $(ls "fuzz/corpus/$t" | wc -l) seeds, minimizing"
    (cd fuzz && cargo fuzz cmin $(build_flags quick) "$t" "corpus/$t" -- $(target_options "$t") 2>&1 | tail -1)
    log "$t: $(ls "fuzz/corpus/$t" | wc -l) inputs, $(du -sh "fuzz/corpus/$t" | cut -f1)"
  done
}

# Line coverage of the project's own code (the snapshot codec, kmesh-common, the operator) reached by
# each target's corpus, with the LLVM 22 tools (rustc's LLVM is the same major version).
coverage() {
  local t profdata binary
  for t in $(targets_or_all "$@"); do
    log "$t: coverage of fuzz/corpus/$t"
    (cd fuzz && cargo fuzz coverage --release --debug-assertions --llvm-path "$LLVM_BIN" "$t" "corpus/$t" -- \
      $(target_options "$t")) >"$scratch/coverage.log" 2>&1 || { tail -n 20 "$scratch/coverage.log" >&2; exit 1; }
    profdata="fuzz/coverage/$t/coverage.profdata"
    binary=$(find fuzz/target -path "*/coverage/*/release/$t" -type f | head -1)
    "$LLVM_BIN/llvm-cov" report "$binary" -instr-profile="$profdata" \
      "$repo/snapshot/src" "$repo/bpf-programs/kmesh-common/src" "$repo/operator/src" \
      | tee "fuzz/coverage/$t/report.txt"
  done
}

mode=${1:-}
[ $# -gt 0 ] && shift
require_cargo_fuzz
case "$mode" in
  --smoke) smoke ;;
  --long) long "$@" ;;
  --merge) merge "$@" ;;
  --seed) seed ;;
  --coverage) coverage "$@" ;;
  *)
    sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
