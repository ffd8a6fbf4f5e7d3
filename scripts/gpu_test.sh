#!/usr/bin/env bash
# Check sd-rs on a CUDA GPU from a machine that has none: build here, run on the GPU host.
#
#   scripts/gpu_test.sh build             here: CUDA build of sd-rs and the GPU tests, gzipped
#                                         into dist/gpu/ (sd-rs 18 MB, each test 11 MB)
#   scripts/gpu_test.sh remote [STAGE..]  on the GPU host, from the repository root with
#                                         dist/gpu/ beside it; stages: libs device parity
#                                         generate train bench (default: all, in that order)
#
# A session lent a GPU runs `build`, then `bash scripts/gpu_test.sh remote` on the device
# machine with dist/gpu carried along; logs, images and the summary land in $OUT (default
# gpu-out/).
#
# The GPU host has no Rust and no CUDA toolkit but has PyTorch built for CUDA 13 (cu130); its
# site-packages/nvidia/*/lib folders hold exactly the libraries the binary needs
# (libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13,
# libcudnn.so.9), and the driver provides libcuda.so.1.
#
# Parity tests: `build` packages the integration tests that take their device from
# sd_rs::device::test_device() (plus tests/device.rs); `parity` runs them with
# SD_RS_TEST_DEVICE=cuda:0, so the same fixtures from diffusers are checked on the GPU.
# Override the list with GPU_TESTS="device unet vae".
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIST="$ROOT/dist/gpu"
PROMPT="anime girl, red hair"

log() { echo "gpu_test: $*" >&2; }

# ---------------------------------------------------------------------------------------------
# Here (no GPU needed)

build() {
  set -e
  cd "$ROOT"
  eval "$(scripts/cuda_toolchain.sh env)"
  local tests=()
  if [[ -n "${GPU_TESTS:-}" ]]; then
    read -r -a tests <<<"$GPU_TESTS"
  else
    tests=(device)
    local f
    for f in tests/*.rs; do
      [[ "$f" == tests/device.rs ]] && continue
      grep -q 'test_device()' "$f" && tests+=("$(basename "$f" .rs)")
    done
  fi
  log "building sd-rs and tests (${tests[*]}) with --features cuda into target/cuda"
  cargo build --release --features cuda --target-dir target/cuda
  local test_args=() t
  for t in "${tests[@]}"; do test_args+=(--test "$t"); done
  cargo test --release --features cuda --target-dir target/cuda --no-run \
    --message-format=json "${test_args[@]}" >target/cuda/gpu-tests.json

  rm -rf "$DIST"
  mkdir -p "$DIST/tests"
  gzip -c target/cuda/release/sd-rs >"$DIST/sd-rs.gz"
  # cargo names test binaries NAME-HASH; keep NAME.
  python3 - target/cuda/gpu-tests.json "$DIST/tests" <<'EOF'
import gzip, json, shutil, sys
dest = sys.argv[2]
for line in open(sys.argv[1]):
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and \
            msg["target"]["kind"] == ["test"]:
        with open(msg["executable"], "rb") as src, gzip.open(f"{dest}/{msg['target']['name']}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
EOF
  # Test binaries find fixtures through the source path they were compiled in.
  echo "$ROOT" >"$DIST/BUILD_ROOT"
  ls -l "$DIST" "$DIST/tests" >&2
  local mb
  mb=$(du -sm "$DIST" | cut -f1)
  log "dist/gpu is ${mb} MB"
  if ((mb > 60)); then
    log "warning: over the device tool's 64 MiB carry limit; set GPU_TESTS to fewer tests"
  fi
}

# ---------------------------------------------------------------------------------------------
# On the GPU host

setup_remote() {
  OUT="${OUT:-$ROOT/gpu-out}"
  mkdir -p "$OUT"
  [[ -f "$DIST/sd-rs.gz" ]] || { log "no $DIST/sd-rs.gz: run 'scripts/gpu_test.sh build' first"; exit 1; }
  BIN_DIR="$(mktemp -d)"
  gunzip -c "$DIST/sd-rs.gz" >"$BIN_DIR/sd-rs"
  local t
  for t in "$DIST"/tests/*.gz; do
    [[ -e "$t" ]] || continue
    gunzip -c "$t" >"$BIN_DIR/test-$(basename "$t" .gz)"
  done
  chmod +x "$BIN_DIR"/*
  SDRS="$BIN_DIR/sd-rs"

  local site
  site="$(python3 -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))')" ||
    { log "python3 cannot import torch: no PyTorch to borrow CUDA libraries from"; exit 1; }
  local libs
  libs="$(ls -d "$site"/nvidia/*/lib 2>/dev/null | paste -sd:)"
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

  # Tests locate tests/fixtures from the folder they were built in; make that path lead here.
  local built_root
  built_root="$(cat "$DIST/BUILD_ROOT")"
  export CARGO_MANIFEST_DIR="$ROOT"
  if [[ "$built_root" != "$ROOT" && ! -e "$built_root" ]]; then
    mkdir -p "$(dirname "$built_root")" && ln -s "$ROOT" "$built_root" ||
      log "warning: could not link $built_root -> $ROOT; tests may not find their fixtures"
  fi
  cd "$ROOT"
}

# Each stage prints what it runs; a failing command fails the stage.
run() {
  echo "+ $*"
  "$@"
}

# A subcommand that is missing (or not yet built) fails the stage with that reason.
need_subcommand() {
  local out
  if ! out="$("$SDRS" --version 2>&1)"; then
    echo "sd-rs does not start: $out"
    return 1
  fi
  if ! "$SDRS" "$1" --help >/dev/null 2>&1; then
    echo "MISSING: this sd-rs ($out) has no '$1' subcommand"
    return 1
  fi
}

stage_libs() {
  run nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || true
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  local missing
  missing="$(ldd "$SDRS" | grep 'not found' || true)"
  ldd "$SDRS" | grep -E 'cuda|cublas|curand|nvrtc|cudnn'
  if [[ -n "$missing" ]]; then
    echo "libraries not found:"
    echo "$missing"
    return 1
  fi
}

# tests/device.rs built with `cuda`: opens cuda:0 and checks the kernels' compute capability.
stage_device() {
  [[ -x "$BIN_DIR/test-device" ]] || { echo "MISSING: test binary 'device'"; return 1; }
  run "$BIN_DIR/test-device" --test-threads 1
}

stage_parity() {
  local t status=0 ran=0
  for t in "$BIN_DIR"/test-*; do
    [[ "$t" == "$BIN_DIR/test-device" ]] && continue
    ran=$((ran + 1))
    echo "=== $(basename "$t") on cuda:0"
    SD_RS_TEST_DEVICE=cuda:0 run "$t" || status=1
  done
  if ((ran == 0)); then
    echo "MISSING: no parity test binaries in dist/gpu/tests (none uses test_device()?)"
    return 1
  fi
  return $status
}

# The shipped default model on the GPU and on the CPU with the same seed, to compare by eye.
stage_generate() {
  need_subcommand generate || return 1
  local dtype
  for dtype in f32 bf16 f16; do
    run "$SDRS" generate "$PROMPT" --device cuda:0 --dtype "$dtype" --seed 42 --num-images 4 \
      --batch-size 4 --overwrite -o "$OUT/generate/cuda-$dtype" || return 1
  done
  run "$SDRS" generate "$PROMPT" --device cpu --dtype f32 --seed 42 --num-images 4 \
    --batch-size 4 --overwrite -o "$OUT/generate/cpu-f32"
}

# A short fine-tune on the GPU, from images the shipped model makes (no dataset needed), then
# generation from the trained model.
stage_train() {
  need_subcommand train || return 1
  local data="$OUT/train/data"
  mkdir -p "$data"
  run "$SDRS" generate "$PROMPT" --device cuda:0 --seed 1 --num-images 16 --batch-size 16 \
    --overwrite -o "$data" --name-pattern "{index}.png" || return 1
  local f
  for f in "$data"/*.png; do
    printf '{"file_name": "%s", "text": "%s"}\n' "$(basename "$f")" "$PROMPT"
  done >"$data/metadata.jsonl"
  run "$SDRS" train --model models/sd-rs-anime --captions "$data/metadata.jsonl" \
    -o "$OUT/train/model" --steps 200 \
    --batch-size 16 --seed 0 --device cuda:0 || return 1
  run "$SDRS" generate "$PROMPT" --model "$OUT/train/model" --device cuda:0 --seed 42 \
    --num-images 4 --batch-size 4 --overwrite -o "$OUT/train/samples" || return 1
  # The same run with the U-Net in bf16 (f32 master weights): compare the metrics.jsonl losses.
  run "$SDRS" train --model models/sd-rs-anime --captions "$data/metadata.jsonl" \
    -o "$OUT/train/model-bf16" --steps 200 \
    --batch-size 16 --seed 0 --device cuda:0 --mixed-precision bf16
}

stage_bench() {
  need_subcommand bench || return 1
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of arguments
  run "$SDRS" bench --device cuda:0 ${BENCH_ARGS:-}
}

remote() {
  setup_remote
  local stages=("$@")
  ((${#stages[@]})) || stages=(libs device parity generate train bench)
  local s rc start summary=()
  for s in "${stages[@]}"; do
    declare -F "stage_$s" >/dev/null || { log "unknown stage '$s'"; exit 2; }
    echo "##### stage $s" | tee "$OUT/$s.log"
    start=$SECONDS
    "stage_$s" 2>&1 | tee -a "$OUT/$s.log"
    rc=${PIPESTATUS[0]}
    if ((rc == 0)); then
      summary+=("$s: PASS ($((SECONDS - start)) s)")
    elif grep -q '^MISSING:' "$OUT/$s.log"; then
      summary+=("$s: MISSING, $(grep -m1 '^MISSING:' "$OUT/$s.log" | cut -d' ' -f2-)")
    else
      summary+=("$s: FAIL, exit $rc ($((SECONDS - start)) s; see $s.log)")
    fi
  done
  printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
  ! grep -qv ': PASS' "$OUT/summary.txt"
}

case "${1:-}" in
  build) build ;;
  remote)
    shift
    remote "$@"
    ;;
  *)
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
