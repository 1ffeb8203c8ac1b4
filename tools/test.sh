#!/usr/bin/env bash
# README's test command (CI runs exactly this: .ci/run), on a fresh machine in about 25 minutes:
#   1. the main environment (torch 2.14) and fastgen built into it, the CUDA sources compiled for sm_90
#      (and sm_80 when they changed since the last AOT run, 3.; no GPU needed); meanwhile, in the
#      background, the oldest-torch stage's environment is downloaded (torch 2.9 + torch_xla, ~4 GB);
#   2. every test (each sweep as a greedy all-pairs subset: tests/conftest.py) and the benchmark files
#      once at their quick shapes (run, not timed), on two pytest-xdist workers, then the tests marked
#      serial alone (the oldest-torch build compiles beside them; the 2^31-element ones only when what
#      they test changed since their last passing run: tools/aot_record.py); Triton kernels through the
#      interpreter when no GPU is visible;
#   3. every Triton variant compiled for sm_80 and sm_90, and with the GPU machine's Triton (3.6) for
#      sm_90, with a resource report (tools/triton_aot.py) -- only when what they compile changed since
#      the last passing run (tools/aot_record.py, benchmarks/results/triton-aot-passed.json);
#   4. the oldest-torch stage (tools/test_xla.sh): the XLA tests, then the API and ABI checks on
#      torch 2.9 + Triton 3.5.
# At the end (or at a failure) each stage's seconds; pytest prints its slowest tests (--durations).
# Arguments go to the main tests' pytest.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
stages=()
t=$SECONDS
lap() { stages+=("$(printf '  %-58s %5d s' "$1" $((SECONDS - t)))"); t=$SECONDS; }
report() {
  local rc=$?
  echo "== stages (seconds)"
  [ ${#stages[@]} = 0 ] || printf '%s\n' "${stages[@]}"
  printf '  %-58s %5d s\n' "total" "$SECONDS"
  [ $rc = 0 ] || echo "test.sh: FAILED (exit $rc) after the stages above"
}
trap report EXIT

# The oldest-torch stage's environment (4. below), downloaded in the background from the start
xla_log=$(mktemp) xla_env_rc=$(mktemp -u)
(if FASTGEN_ENV_ONLY=1 FASTGEN_REQUIREMENTS="$root/requirements-xla.txt" bash "$here/env.sh" >"$xla_log" 2>&1
 then echo 0 >"$xla_env_rc"; else echo 1 >"$xla_env_rc"; fi) &

# The Triton AOT stages (3. below) compile only what changed since their last passing run
FASTGEN_ENV_ONLY=1 bash "$here/env.sh"
read -r torch_version triton_version < <(FASTGEN_ENV_ONLY=1 bash -c 'source "$1" >&2 &&
  python -c "import importlib.metadata as m; print(m.version(\"torch\"), m.version(\"triton\"))"' _ "$here/env.sh")
unchanged() {  # triton version, profile, archs: 0 when that compile passed for these very sources
  python3 "$here/aot_record.py" check --torch "$torch_version" --triton "$1" --profile "$2" --arch "$3"
}
aot_ci=1 aot_36=1
if unchanged "$triton_version" ci 80,90; then aot_ci=0; fi
if unchanged 3.6.0 quick 90; then aot_36=0; fi
# The CUDA sources compile for sm_90 (the GPU checks gate H100 and H200), and for sm_80 too when the AOT
# stage runs (it reports the CUDA kernels' resources on both): it runs whenever a CUDA source changed,
# so every version of them compiles for sm_80 once (these very sources did, if it does not run now).
# Blackwell is reported by the record's refresh, never gated (docs/gpu.md).
if [ $aot_ci = 1 ]; then cuda_archs="8.0;9.0"; else cuda_archs="9.0"; fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cuda_archs}
source "$here/env.sh"
cd "$root"
lap "main environment and build (CUDA ${TORCH_CUDA_ARCH_LIST})"
if ! nvidia-smi -L >/dev/null 2>&1; then export TRITON_INTERPRET=1; fi
python -m fastgen info
# two pytest-xdist workers of one thread each (measured 24% faster than one process of two threads);
# the tests marked serial (threads, processes, the 2^31-element tests) after them, alone
# and the benchmark files, once each at their quick shapes (--benchmark-disable: run, not timed)
OMP_NUM_THREADS=1 python -m pytest tests benchmarks -q -p no:cacheprovider -rs --durations=25 -n 2 -m "not serial" \
  --benchmark-disable "$@"
lap "main tests and benchmark files (2 workers)"
# the oldest-torch stage's build compiles meanwhile: the serial tests keep one core busy at times, never
# two (measured: started from the beginning at nice 19, it slowed the main tests by more than it saved)
(while [ ! -s "$xla_env_rc" ]; do sleep 2; done
 [ "$(cat "$xla_env_rc")" = 0 ] && env -u TRITON_INTERPRET -u TORCH_CUDA_ARCH_LIST FASTGEN_XLA_BUILD_ONLY=1 \
   bash "$here/test_xla.sh" >>"$xla_log" 2>&1) &
xla_build=$!
# the 2^31-element tests (about 3 minutes, alone) when what they test changed since their last passing run
if python3 "$here/aot_record.py" huge-check --torch "$torch_version"; then
  python -m pytest tests -q -p no:cacheprovider -rs --durations=10 -m serial --ignore=tests/test_huge.py "$@"
else
  huge_start=$SECONDS
  python -m pytest tests -q -p no:cacheprovider -rs --durations=10 -m serial "$@"
  python3 "$here/aot_record.py" huge-pass --torch "$torch_version" --seconds $((SECONDS - huge_start)) \
    --git-sha "$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
fi
lap "main tests marked serial (alone; the oldest-torch build beside them)"

echo "== GPU code without a GPU: every Triton variant compiled for sm_80 and sm_90, with the CUDA kernels' resources"
if [ $aot_ci = 1 ]; then
  env -u TRITON_INTERPRET python "$here/triton_aot.py" --out "$root/build/gpu-resources.json"
fi
lap "Triton AOT, sm_80 + sm_90 (when its inputs changed)"
echo "== the same with the GPU machine's Triton (3.6.0), sm_90, one activation and size class (--quick)"
if [ $aot_36 = 1 ]; then
  # a small environment on top of the main one: its own Triton first, then the main site-packages (torch, fastgen)
  t36=$HOME/.cache/fastgen/triton-3.6.0
  if [ ! -f "$t36/.complete" ]; then
    rm -rf "$t36" && python3 -m venv "$t36" && "$t36/bin/python" -m pip install -q --no-deps triton==3.6.0
    purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
    echo "import site; site.addsitedir('$(purelib python)')" > "$(purelib "$t36/bin/python")/zz-main.pth"
    touch "$t36/.complete"
  fi
  env -u TRITON_INTERPRET "$t36/bin/python" "$here/triton_aot.py" --arch 90 --quick \
    --out "$root/build/gpu-resources-triton3.6.json"
fi
lap "Triton 3.6 AOT, sm_90 quick (when its inputs changed)"

echo "== the oldest-torch stage: XLA, then the API and ABI checks on torch 2.9 + Triton 3.5"
if ! wait $xla_build; then
  cat "$xla_log"
  echo "the oldest-torch stage's environment or build failed"
  exit 1
fi
lap "waiting for the oldest-torch environment and build (made in the background)"
env -u TRITON_INTERPRET -u TORCH_CUDA_ARCH_LIST bash "$here/test_xla.sh"
lap "oldest-torch stage (its build, XLA tests, API checks)"
