#!/usr/bin/env bash
# The project's one prepared script for the GPU machine (device tool; see README). From the copied
# tree: build with CUDA (torch 2.11 there, nothing downloadable), run the CUDA tests, run the GPU
# sweep; write logs and benchmark JSON to $OUT and print a short table last. Fits in 8 minutes:
#   run(command="bash tools/gpu_check.sh", timeout_s=540)
set -uo pipefail
OUT=${OUT:-/tmp/fastgen-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
start=$SECONDS
left() { echo $((470 - (SECONDS - start))); }
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

echo "== CUDA tests: the cuda backend first, then triton and composite on CUDA tensors"
timeout 100 python -m pytest tests -m cuda -k "cuda-cuda or test_batch_norm_act or test_build" -q -p no:cacheprovider \
  >"$OUT/tests_cuda.log" 2>&1; tail -4 "$OUT/tests_cuda.log"
timeout 150 python -m pytest tests -m cuda -k "not cuda-cuda and not test_batch_norm_act" -q -p no:cacheprovider -x \
  >"$OUT/tests_triton.log" 2>&1; tail -4 "$OUT/tests_triton.log"
echo "tests done at $((SECONDS - start)) s"

echo "== sweep, bf16: SD-VAE upsample convs against max-autotune; every other op (the registry's) against default compile"
timeout $(( $(left) / 3 )) python -m fastgen bench --device cuda --dtype bfloat16 --passes fwd --ops upsample_conv2d \
  --shapes sdvae-up1,sdvae-up2,sdvae-up3 --layouts nhwc,nchw --out "$OUT/bench_upsample.json" >"$OUT/bench.log" 2>&1
timeout "$(left)" python -m fastgen bench --device cuda --dtype bfloat16 --passes fwd,fwd+bwd --compile-mode default \
  --skip-ops upsample_conv2d --out "$OUT/bench_ops.json" >>"$OUT/bench.log" 2>&1
echo "all done at $((SECONDS - start)) s; the table (also in $OUT/bench.log):"
python - "$OUT" <<'PY' || tail -20 "$OUT/bench.log"
import json, pathlib, sys
from fastgen.bench import summary_table
rows = [r for f in sorted(pathlib.Path(sys.argv[1]).glob("bench_*.json")) for r in json.loads(f.read_text())["rows"]]
print(summary_table(rows))
for r in rows:
    if "copy_gbps" in r:
        gb = {n: p.get("gbps") for n, p in r["providers"].items() if p.get("gbps")}
        print(f"{r['op']} {r['shape']['name']} {'nhwc' if r['channels_last'] else 'nchw'} {r['pass']}: copy "
              f"{r['copy_gbps']:.0f} GB/s; " + ", ".join(f"{n} {v:.0f} GB/s ({v / r['copy_gbps']:.0%})" for n, v in gb.items()))
PY
