#!/usr/bin/env bash
# The project's one prepared script for the GPU machine (device tool; see README). From the copied
# tree: build with CUDA (torch 2.11 there, nothing downloadable), run the CUDA tests, run the GPU
# sweep; write logs and benchmarks JSON to $OUT and print a short table last. Fits in 8 minutes:
#   run(command="bash tools/gpu_check.sh", timeout_s=540)
set -uo pipefail
OUT=${OUT:-/tmp/fastgen-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
start=$SECONDS
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"

echo "== build"
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
export FASTGEN_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16
if ! python -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1; then
  echo "pip install -e failed (tail of build.log below); building in place instead"
  tail -5 "$OUT/build.log"
  python setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  ln -sfn ../kernels fastgen/kernels  # what package_dir does for an install
  export PYTHONPATH=$PWD
fi
python -m fastgen info || exit 1
echo "build done at $((SECONDS - start)) s"

echo "== CUDA tests: the cuda backend, then triton and composite on CUDA tensors"
timeout 120 python -m pytest tests -m cuda -k "cuda-cuda" -q -p no:cacheprovider 2>&1 | tee "$OUT/tests_cuda_backend.log" | tail -8
timeout 150 python -m pytest tests -m cuda -k "not cuda-cuda" -q -p no:cacheprovider -x 2>&1 | tee "$OUT/tests_triton_composite.log" | tail -8
echo "tests done at $((SECONDS - start)) s"

echo "== sweep (bf16, SD-VAE decoder and DCGAN shapes, both layouts)"
timeout $((470 - (SECONDS - start))) python -m fastgen bench --device cuda --dtype bfloat16 --passes fwd \
  --out "$OUT/upsample_conv2d-h200.json" >"$OUT/bench.log" 2>&1
echo "all done at $((SECONDS - start)) s; the table (also in $OUT/bench.log):"
python -c "import json, sys; from fastgen.bench import summary_table
print(summary_table(json.load(open(sys.argv[1]))['rows']))" "$OUT/upsample_conv2d-h200.json" || tail -20 "$OUT/bench.log"
