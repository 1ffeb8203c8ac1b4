#!/usr/bin/env bash
# The build stage of tools/gpu_check.py on the GPU machine (torch 2.11 there, nothing downloadable):
# fastgen._C for this GPU's architecture only, 16 parallel jobs; `pip install -e`, else an in-place
# build with fastgen/kernels linked as package_dir would. Its log: $1.
set -uo pipefail
log=${1:-/dev/stdout}
cd "$(dirname "$0")/.."
# the toolkit's nvcc (torch alone would guess CUDA_HOME=/usr/local: shared/TOOLCHAIN.md)
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=/usr/local/cuda
  [ -x "$CUDA_HOME/bin/nvcc" ] || CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
fi
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' ')
export CUDA_HOME FASTGEN_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${arch:-9.0}} MAX_JOBS=${MAX_JOBS:-16}
echo "building for sm ${TORCH_CUDA_ARCH_LIST} with CUDA_HOME=$CUDA_HOME, $MAX_JOBS jobs" | tee -a "$log"
start=$SECONDS
if ! python3 -m pip install --no-build-isolation --no-deps --no-index -e . >>"$log" 2>&1; then
  echo "pip install -e failed; building in place instead" | tee -a "$log"
  python3 setup.py build_ext --inplace >>"$log" 2>&1 || { tail -40 "$log"; exit 1; }
  ln -sfn ../kernels fastgen/kernels  # what package_dir does for an install
fi
echo "built in $((SECONDS - start)) s" | tee -a "$log"
python3 -c "import fastgen.kernels.bias_act, fastgen; print(fastgen.summary())" || { echo "fastgen is not importable"; exit 1; }
