#!/usr/bin/env bash
# The project's one prepared script for the GPU machine (device tool; see README), and a gate: it
# exits non-zero when any stage fails or runs out of time. From the copied tree: build with CUDA
# (torch 2.11 there, nothing downloadable), verify every op / backend / dtype against the float64
# reference (writes $OUT/gpu_verified.json, the record that decides what `auto` may pick on CUDA:
# commit it as fastgen/gpu_verified.json), the build test, the CUDA tests in parallel, the GPU sweep;
# logs and JSON to $OUT, a short table last. Fits in 8 minutes:
#   run(command="bash tools/gpu_check.sh", timeout_s=540)
# --dry-run rehearses the same stages on the CPU (no build, Triton through the interpreter, small
# sizes; tests/test_gpu_check.py runs it in CI). --ops a,b limits verify and the sweep to those ops.
# --sanitize: instead of the tests and the sweep, every CUDA and Triton kernel (fastgen verify: each
# op's examples, forward and backward, every dtype) under compute-sanitizer's memcheck, then the
# CUDA C++ kernels that use shared memory under racecheck; any report fails the gate. A second run:
#   run(command="bash tools/gpu_check.sh --sanitize", timeout_s=540)
set -uo pipefail
dry=0
sanitize=0
ops=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry=1 ;;
    --sanitize) sanitize=1 ;;
    --ops) ops=$2; shift ;;
    *) echo "usage: tools/gpu_check.sh [--dry-run] [--sanitize] [--ops op1,op2]"; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-/tmp/fastgen-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
start=$SECONDS
status=0
left() { local l=$((470 - (SECONDS - start))); echo $((l < 10 ? 10 : l)); }  # never under 10 s

stage() {  # name, time limit (s), command...: logs to $OUT/<name>.log; a failure or time-out fails the gate
  local name=$1 limit=$2 rc
  shift 2
  echo "== $name (at $((SECONDS - start)) s, limit ${limit} s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -4 "$OUT/$name.log"
  if [ $rc -ne 0 ]; then
    echo "!! $name FAILED (exit $rc$([ $rc -eq 124 ] && echo ': timed out'))"
    status=1
  fi
}

if [ $dry = 1 ]; then
  device=cpu
  export TRITON_INTERPRET=1  # the rehearsal runs the Triton kernels through the interpreter
else
  device=cuda
  export TRITON_INTERPRET=0
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$OUT/device.txt"
  # the toolkit's nvcc (torch alone would guess CUDA_HOME=/usr/local: shared/TOOLCHAIN.md)
  if [ -z "${CUDA_HOME:-}" ]; then
    CUDA_HOME=/usr/local/cuda
    [ -x "$CUDA_HOME/bin/nvcc" ] || CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
  fi
  export CUDA_HOME FASTGEN_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16
  echo "== build (CUDA_HOME=$CUDA_HOME)"
  if ! python -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1; then
    echo "pip install -e failed (tail of build.log below); building in place instead"
    tail -5 "$OUT/build.log"
    python setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
    ln -sfn ../kernels fastgen/kernels  # what package_dir does for an install
    export PYTHONPATH=$PWD
  fi
  python -c "import fastgen.kernels.bias_act" || { echo "!! fastgen.kernels is not importable"; exit 1; }
fi

stage info 120 python -m fastgen info
if [ $sanitize = 1 ]; then
  # compute-sanitizer ships with the toolkit; the rehearsal runs the same commands without it
  sanitizer() { [ $dry = 1 ] || echo "$CUDA_HOME/bin/compute-sanitizer --tool $1 --error-exitcode 86 --target-processes all --print-limit 20"; }
  all_ops=$(python -c 'from fastgen.ops import REGISTRY; print(",".join(REGISTRY))')
  stage memcheck $(($(left) * 2 / 3)) $(sanitizer memcheck) \
    python -m fastgen verify --device "$device" --untimed --ops "${ops:-$all_ops}"
  # the CUDA C++ kernels with __shared__ (csrc/*.cu): block reductions and the conv tiles
  stage racecheck "$(left)" $(sanitizer racecheck) \
    python -m fastgen verify --device "$device" --untimed --ops "${ops:-group_norm_act,batch_norm_act,upsample_conv2d}"
  echo "gpu_check --sanitize: $([ $status = 0 ] && echo PASSED || echo FAILED) in $((SECONDS - start)) s"
  exit $status
fi
stage verify $(($(left) / 3)) python -m fastgen verify --device "$device" --out "$OUT/gpu_verified.json" \
  ${ops:+--ops "$ops"}
stage test_build 120 python -m pytest tests/test_build.py -q -p no:cacheprovider
if [ $device = cuda ]; then
  # every test marked cuda, in parallel; the Triton-heavy files first (they compile the most)
  stage tests_cuda $(($(left) / 2)) python -m pytest -m cuda -q -p no:cacheprovider -n 8 \
    tests/test_upsample_conv2d.py tests/test_group_norm_act.py tests/test_batch_norm_act.py tests/test_upfirdn2d.py \
    tests/test_bias_act.py tests/test_pixel_norm.py tests/test_modulated_conv2d.py tests/test_instance_norm_act.py \
    tests/test_norm_backward.py tests/test_hardening.py --junitxml="$OUT/tests_cuda.xml"
  # above 2^31 elements: one at a time (up to ~30 GB each)
  stage tests_huge $(($(left) / 3)) python -m pytest -m cuda -q -p no:cacheprovider tests/test_huge.py \
    --junitxml="$OUT/tests_huge.xml"
  stage sweep_upsample $(($(left) / 3)) python -m fastgen bench --full --device cuda --dtype bfloat16 --passes fwd \
    --ops upsample_conv2d --shapes sdvae-up1,sdvae-up2,sdvae-up3 --layouts nhwc,nchw --out "$OUT/bench_upsample.json"
  stage sweep_ops "$(left)" python -m fastgen bench --full --device cuda --dtype bfloat16 --passes fwd,fwd+bwd \
    --compile-mode default ${ops:+--ops "$ops"} --skip-ops upsample_conv2d --out "$OUT/bench_ops.json"
else
  stage tests_launchers 240 python -m pytest tests/test_launchers.py tests/test_backends.py -q -p no:cacheprovider
  stage sweep_ops 240 python -m fastgen bench --device cpu --passes fwd --layouts nchw --compile-mode default \
    --ops "${ops:-pixel_norm}" --shapes c512-32x32 --out "$OUT/bench_ops.json"
fi

echo "== the table (at $((SECONDS - start)) s)"
python - "$OUT" <<'PY' || status=1
import json, pathlib, sys
from fastgen.bench.report import summary_table
runs = sorted(pathlib.Path(sys.argv[1]).glob("bench_*.json"))
for f in runs:
    record = json.loads(f.read_text())
    print(f"{f.name}:\n{summary_table(record['rows'])}")
print("" if runs else "no benchmark rows")
PY
echo "gpu_check: $([ $status = 0 ] && echo PASSED || echo FAILED) in $((SECONDS - start)) s"
exit $status
