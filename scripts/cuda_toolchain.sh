#!/usr/bin/env bash
# Install a CUDA 13.0 toolkit from PyPI's NVIDIA wheels, so that `--features cuda` builds on a
# machine with no GPU, no driver and no system CUDA (Debian main ships no toolkit).
#
#   scripts/cuda_toolchain.sh install [--cudnn]   install (or reuse) the toolchain
#   scripts/cuda_toolchain.sh env [--cudnn]       install if needed, then print the exports
#   scripts/cuda_toolchain.sh check [--cudnn]     print what is installed and nvcc's version
#
#   eval "$(scripts/cuda_toolchain.sh env)"
#   cargo build --release --features cuda --target-dir target/cuda
#
# The toolchain lives in $SD_RS_CUDA_TOOLCHAIN (default: <repo>/.cuda-toolchain, git-ignored),
# with its own Python venv. A second run finds the pinned wheels already installed and only
# prints the exports, so CI can cache the folder.
#
# Why these versions (all pinned, never "latest"):
# - nvcc 13.0: the GPU hosts run a CUDA 13.0 driver, which refuses PTX from a newer nvcc, and
#   cudarc 0.19 (candle 0.11) rejects toolkits above 13.4.
# - CUDA 13 rather than 12: CUDA 12 wheels link libraries with .so.12 sonames that the GPU hosts'
#   PyTorch (cu130) does not carry.
# - nvidia-cuda-cccl: cuda_fp16.h includes <nv/target>, which only this wheel ships.
#
# Nothing here ships the driver (libcuda.so.1), yet candle-core links it directly. We build a
# link-time stub with one symbol per cu* function of cuda.h; each returns
# CUDA_ERROR_STUB_LIBRARY (34) in case it is ever loaded. The binary's NEEDED entry is the
# soname libcuda.so.1, so at run time the GPU host's real driver library is used.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TC="${SD_RS_CUDA_TOOLCHAIN:-$ROOT/.cuda-toolchain}"
PYTHON="${PYTHON:-python3}"

# Compute capability the kernels are compiled for. 90 = Hopper (H100/H200); nvcc then
# targets sm_90a. Without nvidia-smi, candle-kernels' build cannot detect it and fails.
COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

BASE_WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
)
CUDNN_WHEELS=(nvidia-cudnn-cu13==9.21.0.82)

log() { echo "cuda_toolchain: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# The wheels unpack into site-packages/nvidia/cu13/{bin,include,lib,nvvm}; $TC/cuda points there
# so the exported paths do not depend on the venv's Python version.
cuda_home() { echo "$TC/cuda"; }

# Install one set of wheels unless a stamp file records exactly this pinned list.
install_wheels() {
  local name="$1"
  shift
  local stamp="$TC/.stamp-$name" want
  want="$(printf '%s\n' "$@")"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    log "$name wheels already installed (reusing $TC)"
    return
  fi
  log "installing $name wheels into $TC/venv: $*"
  # --no-deps: the pins are the whole set; letting pip resolve would pull newer CUDA 13.x
  # components (e.g. a cuda-toolkit metapackage) that the driver on the GPU hosts rejects.
  "$TC/venv/bin/pip" install --quiet --no-deps "$@" >&2
  echo "$want" >"$stamp"
}

make_links() {
  local home lib
  home="$(cuda_home)"
  lib="$home/lib"
  # The wheels ship only versioned sonames (libcudart.so.13); the linker's -lcudart wants
  # libcudart.so.
  local so target
  for so in libcudart libcublas libcublasLt libnvrtc libcurand; do
    link_unversioned "$lib" "$so"
  done
  # Build scripts look in $CUDA_HOME/lib64 as often as in lib.
  [[ -e "$home/lib64" ]] || ln -sfn lib "$home/lib64"
  # cuDNN has its own folder (site-packages/nvidia/cudnn); cudarc searches $CUDNN_LIB/lib.
  if [[ -d "$TC/cudnn/lib" ]]; then
    link_unversioned "$TC/cudnn/lib" libcudnn
  fi
}

link_unversioned() {
  local dir="$1" so="$2" target
  [[ -e "$dir/$so.so" ]] && return
  target="$(cd "$dir" && ls "$so".so.[0-9]* 2>/dev/null | sort -V | head -n1 || true)"
  [[ -n "$target" ]] || die "no $so.so.* under $dir"
  ln -sfn "$target" "$dir/$so.so"
}

# Link-time stand-in for the driver library (see the header comment).
make_stub_libcuda() {
  local home stub
  home="$(cuda_home)"
  stub="$home/lib/libcuda.so"
  if [[ ! -f "$stub" || "$home/include/cuda.h" -nt "$stub" ]]; then
    build_stub "$home/include/cuda.h" "$stub"
  fi
  # The same stub under its run-time name, kept apart from the toolkit's lib folder: with
  # LD_LIBRARY_PATH=$SD_RS_NO_GPU_LIBS a cuda build starts on a machine without a driver, every
  # CUDA call fails with CUDA_ERROR_STUB_LIBRARY, and `--device auto` falls back to the CPU.
  mkdir -p "$TC/no-gpu"
  ln -sfn ../cuda/lib/libcuda.so "$TC/no-gpu/libcuda.so.1"
}

build_stub() {
  local header="$1" stub="$2" src="$TC/stub_libcuda.c"
  command -v gcc >/dev/null || die "gcc is needed to build the stub libcuda.so"
  # Every token cu[A-Z]... in cuda.h is a driver function or a macro naming one
  # (`#define cuMemAlloc cuMemAlloc_v2`); both spellings become symbols, so the stub covers
  # whichever name a binding generator saw.
  {
    echo "/* Generated by scripts/cuda_toolchain.sh from $header: link-time stub only. */"
    echo "/* 34 = CUDA_ERROR_STUB_LIBRARY */"
    grep -oE '\bcu[A-Z][A-Za-z0-9_]*\b' "$header" | sort -u |
      sed 's/.*/int &(void) { return 34; }/'
  } >"$src"
  gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$stub" "$src"
  log "stub libcuda.so built with $(grep -c 'return 34' "$src") symbols"
}

install() {
  local cudnn="$1"
  mkdir -p "$TC"
  if [[ ! -x "$TC/venv/bin/pip" ]]; then
    log "creating venv $TC/venv"
    "$PYTHON" -m venv "$TC/venv" >&2
  fi
  install_wheels base "${BASE_WHEELS[@]}"
  if [[ "$cudnn" == 1 ]]; then
    install_wheels cudnn "${CUDNN_WHEELS[@]}"
  fi
  local site
  site="$("$TC/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  [[ -e "$TC/cuda" ]] || ln -sfn "$site/nvidia/cu13" "$TC/cuda"
  if [[ "$cudnn" == 1 && ! -e "$TC/cudnn" ]]; then
    ln -sfn "$site/nvidia/cudnn" "$TC/cudnn"
  fi
  [[ -x "$(cuda_home)/bin/nvcc" ]] || die "no nvcc under $(cuda_home)/bin after install"
  make_links
  make_stub_libcuda
}

print_env() {
  local cudnn="$1" home
  home="$(cuda_home)"
  echo "export CUDA_HOME='$home'"
  # cudarc and candle-kernels run plain `nvcc`.
  echo "export PATH='$home/bin':\"\$PATH\""
  echo "export CUDA_COMPUTE_CAP='$COMPUTE_CAP'"
  # Not used by the build: LD_LIBRARY_PATH for running a cuda build here (see make_stub_libcuda).
  echo "export SD_RS_NO_GPU_LIBS='$TC/no-gpu:$home/lib'"
  if [[ "$cudnn" == 1 ]]; then
    # cudarc adds $CUDNN_LIB/lib to the link search path.
    echo "export CUDNN_LIB='$TC/cudnn'"
  fi
}

check() {
  local cudnn="$1" home
  home="$(cuda_home)"
  [[ -x "$home/bin/nvcc" ]] || die "not installed: run scripts/cuda_toolchain.sh install"
  "$home/bin/nvcc" --version | tail -n2
  ls -l "$home/lib" | grep -E 'lib(cuda|cudart|cublas|cublasLt|nvrtc|curand)\.so( |$)' || true
  if [[ "$cudnn" == 1 ]]; then
    [[ -e "$TC/cudnn/lib/libcudnn.so" ]] || die "cuDNN not installed (install --cudnn)"
    ls -l "$TC/cudnn/lib/libcudnn.so"
  fi
  du -sh "$TC" | cut -f1 | sed 's/^/toolchain size: /'
}

cmd="${1:-}"
[[ -n "$cmd" ]] || usage
shift
cudnn=0
for arg in "$@"; do
  case "$arg" in
    --cudnn) cudnn=1 ;;
    *) usage ;;
  esac
done
case "$cmd" in
  install) install "$cudnn" ;;
  env)
    install "$cudnn"
    print_env "$cudnn"
    ;;
  check) check "$cudnn" ;;
  *) usage ;;
esac
