#!/usr/bin/env bash
# Check sd-rs on a CUDA GPU from a machine that has none: build here, run on the GPU host.
#
#   scripts/gpu_test.sh build             here: CUDA build of sd-rs and the GPU tests, stripped
#                                         and xz-compressed into dist/gpu/ (sd-rs 9 MB, each
#                                         test 5-7 MB)
#   scripts/gpu_test.sh remote [STAGE..]  on the GPU host, from the repository root with
#                                         dist/gpu/ beside it; stages: libs device parity
#                                         generate train bench (default: all, in that order),
#                                         profile and model (needs dist/avatars.pack, see below)
#
# A session lent a GPU runs `build`, then `bash scripts/gpu_test.sh remote` on the device
# machine with dist/gpu carried along; logs, images and the summary land in $OUT (default
# gpu-out/). The bench stage needs diffusers there (carried as a wheel); the model stage, the
# packed data set. What one 10-minute call ran on an H200 (2026-12-04):
#   bash scripts/gpu_test.sh remote libs device generate model parity bench
#
# The GPU host has no Rust and no CUDA toolkit but has PyTorch built for CUDA 13 (cu130); its
# site-packages/nvidia/*/lib folders hold exactly the libraries the binary needs
# (libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13,
# libcudnn.so.9), and the driver provides libcuda.so.1.
#
# Parity tests: `build` packages the integration tests that take their device from
# sd_rs::device::test_device() (plus tests/device.rs); `parity` runs them with
# SD_RS_TEST_DEVICE=cuda:0, so the same fixtures from diffusers are checked on the GPU.
# GPU_CUDNN=1 also builds sd-rs with cuDNN convolutions (dist/gpu/sd-rs-cudnn, for the profile
# stage). Override the list with GPU_TESTS="device unet vae", or GPU_TESTS=none for the binary alone
# (the device tool carries 64 MiB per call: the repository, dist/gpu and the `model` stage's
# data set together).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIST="${GPU_DIST:-$ROOT/dist/gpu}"
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
  if [[ "${GPU_CUDNN:-0}" == 1 ]]; then
    # The same target folder: only candle-core, candle-nn and sd-rs rebuild between the two.
    log "building sd-rs with --features cudnn (for the profile stage) into target/cuda"
    eval "$(scripts/cuda_toolchain.sh env --cudnn)"
    cargo build --release --features cudnn --target-dir target/cuda
    cp target/cuda/release/sd-rs target/cuda/sd-rs-cudnn
  else
    rm -f target/cuda/sd-rs-cudnn
  fi
  log "building sd-rs and tests (${tests[*]}) with --features cuda into target/cuda"
  cargo build --release --features cuda --target-dir target/cuda
  [[ "${tests[*]}" == none ]] && tests=()
  local test_args=() t
  for t in "${tests[@]}"; do test_args+=(--test "$t"); done
  if ((${#tests[@]})); then
    cargo test --release --features cuda --target-dir target/cuda --no-run \
      --message-format=json "${test_args[@]}" >target/cuda/gpu-tests.json
  else
    : >target/cuda/gpu-tests.json
  fi

  rm -rf "$DIST"
  mkdir -p "$DIST/tests"
  # Stripped and xz-compressed: a third of the gzipped size (most of it is the CUDA kernels'
  # PTX). The GPU host has python3's lzma to unpack them.
  python3 - target/cuda/gpu-tests.json "$DIST" target/cuda/release/sd-rs <<'EOF'
import json, lzma, os, shutil, subprocess, sys, tempfile
dest = sys.argv[2]
binaries = {"sd-rs": sys.argv[3]}
if os.path.exists("target/cuda/sd-rs-cudnn"):
    binaries["sd-rs-cudnn"] = "target/cuda/sd-rs-cudnn"
for line in open(sys.argv[1]):
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and \
            msg["target"]["kind"] == ["test"]:
        # cargo names test binaries NAME-HASH; keep NAME.
        binaries[f"tests/{msg['target']['name']}"] = msg["executable"]
for name, path in binaries.items():
    with tempfile.TemporaryDirectory() as tmp:
        stripped = os.path.join(tmp, "bin")
        shutil.copyfile(path, stripped)
        subprocess.run(["strip", stripped], check=True)
        with open(stripped, "rb") as src, lzma.open(f"{dest}/{name}.xz", "wb", preset=6) as dst:
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
  [[ -f "$DIST/sd-rs.xz" ]] || { log "no $DIST/sd-rs.xz: run 'scripts/gpu_test.sh build' first"; exit 1; }
  BIN_DIR="$(mktemp -d)"
  unxz_to() { python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"; }
  unxz_to "$DIST/sd-rs.xz" "$BIN_DIR/sd-rs"
  [[ -f "$DIST/sd-rs-cudnn.xz" ]] && unxz_to "$DIST/sd-rs-cudnn.xz" "$BIN_DIR/sd-rs-cudnn"
  local t
  for t in "$DIST"/tests/*.xz; do
    [[ -e "$t" ]] || continue
    unxz_to "$t" "$BIN_DIR/test-$(basename "$t" .xz)"
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
    --batch-size 4 --overwrite -o "$OUT/generate/cpu-f32" || return 1
  # Same seed, same weights: how far each GPU run's pixels are from the CPU's (0-255).
  python3 - "$OUT/generate" <<'EOF'
import glob, os, sys
import numpy as np
from PIL import Image
root = sys.argv[1]
for dtype in ("f32", "bf16", "f16"):
    diffs = []
    for cpu in sorted(glob.glob(f"{root}/cpu-f32/*.png")):
        gpu = os.path.join(root, f"cuda-{dtype}", os.path.basename(cpu))
        a, b = (np.asarray(Image.open(f).convert("RGB"), dtype=np.int16) for f in (cpu, gpu))
        diffs.append(np.abs(a - b))
    d = np.stack(diffs)
    print(f"cuda {dtype} vs cpu f32: mean |diff| {d.mean():.3f}, max {d.max()} (of 255), {len(diffs)} images")
EOF
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

# The default model's first-stage recipe on a GPU (configs in $MODEL_CONFIGS): the data set
# travels packed ($MODEL_DATA_PACK, from `scripts/dataset_pack.py pack`: the GPU host has no
# Node.js to render it), then a VAE and the U-Net with its text encoder are trained from scratch.
# Each gets a time budget: a short run ($MODEL_RATE_STEPS steps) measures samples/s and the real
# run takes the step count that fits (rounded down to 100, at least $MODEL_MIN_STEPS, at most the
# config's `steps`; the log says which). Then the 320 evaluation prompts are generated (f32) and
# scored; the model comes back as model.tgz.* (split to the device tool's file size).
MODEL_CONFIGS="${MODEL_CONFIGS:-configs/sd-rs-anime}"
MODEL_DATA_PACK="${MODEL_DATA_PACK:-$ROOT/dist/avatars.pack}"
MODEL_VAE_SECONDS="${MODEL_VAE_SECONDS:-150}"
MODEL_UNET_SECONDS="${MODEL_UNET_SECONDS:-240}"
MODEL_MIN_STEPS="${MODEL_MIN_STEPS:-500}"
MODEL_DEVICE="${MODEL_DEVICE:-cuda:0}"
MODEL_RATE_STEPS="${MODEL_RATE_STEPS:-60}"
MODEL_EVAL_PROMPTS="${MODEL_EVAL_PROMPTS:-prompts/eval-default-model.txt}"

# samples/s of the last line of a run's metrics.jsonl
metrics_rate() {
  python3 -c 'import json, sys; print(json.loads(open(sys.argv[1]).readlines()[-1])["samples_per_sec"])' \
    "$1/metrics.jsonl"
}
train_option() {
  python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["train"][sys.argv[2]])' "$1" "$2"
}
# samples/s, seconds, batch size, most steps -> steps
fit_steps() {
  python3 -c 'import sys; r, s, b, most, least = map(float, sys.argv[1:]); print(int(max(least, min(most, r * s / b // 100 * 100))))' \
    "$@" "$MODEL_MIN_STEPS"
}

stage_model() {
  need_subcommand train-vae || return 1
  [[ -f "$MODEL_DATA_PACK" ]] || { echo "MISSING: $MODEL_DATA_PACK (scripts/dataset_pack.py pack)"; return 1; }
  local work="${MODEL_WORK:-/tmp/sd-rs-model}"
  local data="$work/avatars" vae_cfg="$MODEL_CONFIGS/vae.toml" unet_cfg="$MODEL_CONFIGS/unet.toml"
  local dev=(--device "$MODEL_DEVICE")
  local short=(--steps "$MODEL_RATE_STEPS" --set train.log_every=10 --set train.validate_every=1000000
    --set train.checkpoint_every=1000000)
  rm -rf "$work" && mkdir -p "$work"
  run python3 scripts/dataset_pack.py unpack "$MODEL_DATA_PACK" "$data" || return 1

  local rate batch most steps
  run "$SDRS" train-vae --config "$vae_cfg" --images "$data/data.jsonl" -o "$work/vae-rate" \
    "${short[@]}" "${dev[@]}" || return 1
  rate="$(metrics_rate "$work/vae-rate")" batch="$(train_option "$vae_cfg" batch_size)"
  most="$(train_option "$vae_cfg" steps)"
  steps="$(fit_steps "$rate" "$MODEL_VAE_SECONDS" "$batch" "$most")"
  echo "VAE: $rate samples/s -> $steps steps of batch $batch (budget ${MODEL_VAE_SECONDS} s)"
  run timeout $((MODEL_VAE_SECONDS * 2 + 60)) "$SDRS" train-vae --config "$vae_cfg" \
    --images "$data/data.jsonl" -o "$work/vae" --steps "$steps" "${dev[@]}" || return 1

  local unet=(--config "$unet_cfg" --captions "$data/data.jsonl" --vae "$work/vae"
    --cache-dir "$work/cache")
  run "$SDRS" train "${unet[@]}" -o "$work/unet-rate" "${short[@]}" "${dev[@]}" || return 1
  rate="$(metrics_rate "$work/unet-rate")" batch="$(train_option "$unet_cfg" batch_size)"
  most="$(train_option "$unet_cfg" steps)"
  steps="$(fit_steps "$rate" "$MODEL_UNET_SECONDS" "$batch" "$most")"
  echo "U-Net: $rate samples/s -> $steps steps of batch $batch (budget ${MODEL_UNET_SECONDS} s)"
  run timeout $((MODEL_UNET_SECONDS * 2 + 60)) "$SDRS" train "${unet[@]}" -o "$work/model" \
    --steps "$steps" --save-f16 "${dev[@]}" || return 1

  run "$SDRS" generate --model "$work/model" --from-file "$MODEL_EVAL_PROMPTS" \
    -o "$work/eval" "${dev[@]}" --dtype f32 || return 1
  run python3 scripts/eval_prompt_following.py "$work/eval" --grid "$OUT/model-grid.png" || return 1
  cp "$work/vae/metrics.jsonl" "$work/model/vae-metrics.jsonl"
  cp -r "$work/vae/samples" "$work/model/vae-samples"
  tar czf - -C "$work" --exclude=checkpoints model | split -b 15m - "$OUT/model.tgz."
}

# sd-rs against diffusers on CUDA (scripts/bench.py, random SD 1.5-shaped weights built there):
# one table per dtype in $BENCH_DTYPES, as JSON (bench-cuda-DTYPE.json, rewritten after each
# case, so a run cut short keeps what it measured). Back here, `bench.py --from-json FILE
# --markdown` writes it into BENCHMARKS.md. Both sides train in the dtype throughout
# (--torch-train pure), as `sd-rs bench --case train --dtype` does.
stage_bench() {
  need_subcommand bench || return 1
  python3 -c 'import diffusers' 2>/dev/null ||
    { echo "MISSING: diffusers for python3 (carry its wheel: the device tool's notes say how)"; return 1; }
  HF_HUB_OFFLINE=1 run python3 scripts/make_bench_models.py || return 1
  local dtype
  for dtype in ${BENCH_DTYPES:-bf16}; do
    # shellcheck disable=SC2086 # BENCH_ARGS is a list of arguments
    HF_HUB_OFFLINE=1 run python3 scripts/bench.py --device cuda --dtype "$dtype" --sd-rs "$SDRS" \
      --torch-train pure --timeout 240 --json-out "$OUT/bench-cuda-$dtype.json" ${BENCH_ARGS:-} ||
      return 1
  done
}

# Where the GPU time goes, by kind of layer (`sd-rs bench --profile`: each layer waits for the
# device before and after, so these runs are slower than bench's): the 512x512 U-Net step and
# VAE decode on the bench stage's SD 1.5-shaped models, in each dtype of $BENCH_DTYPES. A
# binary built with cuDNN (dist/gpu/sd-rs-cudnn.xz, if `build` made one) is profiled too.
stage_profile() {
  need_subcommand bench || return 1
  if [[ ! -d data/bench/sd15 ]]; then
    python3 -c 'import diffusers' 2>/dev/null ||
      { echo "MISSING: diffusers for python3 (to build data/bench)"; return 1; }
    HF_HUB_OFFLINE=1 run python3 scripts/make_bench_models.py || return 1
  fi
  local bins=("$SDRS") bin dtype case
  [[ -x "$BIN_DIR/sd-rs-cudnn" ]] && bins+=("$BIN_DIR/sd-rs-cudnn")
  for bin in "${bins[@]}"; do
    for dtype in ${BENCH_DTYPES:-bf16}; do
      for case in unet vae-decode; do
        echo "=== $(basename "$bin") $case $dtype"
        run "$bin" bench --model data/bench/sd15 --case "$case" --device cuda:0 --dtype "$dtype" \
          --width 512 --height 512 --warmup 1 --repeat 3 --profile >>"$OUT/profile.jsonl" || return 1
      done
    done
  done
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
