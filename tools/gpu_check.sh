#!/usr/bin/env bash
# The project's one prepared script for a GPU machine: a plan of stages that fits 8 minutes (450 s), the
# build included (tools/gpu_check.py: budgets, the outcomes passed / FAILED / cut by time per stage, the
# verdict PASSED / INCOMPLETE / FAILED / NOT VERIFIED). Only python3 is assumed.
#   bash tools/gpu_check.sh                # OUT=<folder> for the results (default /tmp/fastgen-gpu)
# From a copy of the tree without .git (a lent machine): `git rev-parse HEAD > .git_sha` first and take
# the file along, so the records carry the commit. With the device tool, the machine's start included,
# the whole run fits its 10-minute command limit: run(command="bash tools/gpu_check.sh", carry=[".git_sha"],
# timeout_s=540).
# Afterwards commit $OUT/gpu_verified.json as fastgen/gpu_verified.json (what auto may pick on CUDA)
# and bench_*.json / models.json / summary.json under benchmarks/results/.
# --dry-run rehearses the same plan on the CPU (tests/test_gpu_check.py runs it in CI).
# --sanitize: instead, the build then every CUDA and Triton kernel (fastgen verify, untimed) under
# compute-sanitizer's memcheck, then the CUDA C++ kernels with shared memory under racecheck.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/fastgen-gpu}
mkdir -p "$OUT"
dry=0 sanitize=0 ops=""
args=("$@")
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry=1 ;;
    --sanitize) sanitize=1 ;;
    --ops) ops=$2; shift ;;
  esac
  shift
done
if [ $dry = 1 ]; then
  export TRITON_INTERPRET=1  # the rehearsal runs the Triton kernels through the interpreter
else
  export TRITON_INTERPRET=0
  # diffusers (the SD-VAE row) is not on the GPU machine: carried as wheels in .whl/ (device README)
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target build/pydeps .whl/*.whl >/dev/null 2>&1 &&
      export PYTHONPATH=$PWD/build/pydeps${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
if [ $sanitize = 0 ]; then
  exec python3 tools/gpu_check.py "${args[@]}"
fi

status=0
stage() {  # name, time limit (s), command...: logs to $OUT/<name>.log
  local name=$1 limit=$2 rc
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -4 "$OUT/$name.log"
  case $rc in
    0) echo "   $name passed" ;;
    124) echo "   $name cut by time" ;;
    *) echo "   $name FAILED (exit $rc)"; status=1 ;;
  esac
}
[ $dry = 1 ] || stage build 200 bash tools/gpu_build.sh "$OUT/build.log"
device=$([ $dry = 1 ] && echo cpu || echo cuda)
# compute-sanitizer ships with the toolkit; the rehearsal runs the same commands without it
sanitizer() { [ $dry = 1 ] || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer --tool $1 --error-exitcode 86 --print-limit 20"; }
all_ops=$(python3 -c 'from fastgen.ops import REGISTRY; print(",".join(REGISTRY))')
stage memcheck 180 $(sanitizer memcheck) \
  python3 -m fastgen verify --device "$device" --untimed --in-process --ops "${ops:-$all_ops}"
# the CUDA C++ kernels with __shared__ (csrc/*.cu): block reductions and the conv tiles
stage racecheck 100 $(sanitizer racecheck) \
  python3 -m fastgen verify --device "$device" --untimed --in-process --ops "${ops:-group_norm_act,batch_norm_act,upsample_conv2d}"
echo "gpu_check --sanitize: $([ $status = 0 ] && echo PASSED || echo FAILED)"
exit $status
