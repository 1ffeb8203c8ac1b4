#!/usr/bin/env bash
# The oldest-torch stage of README's test command (tools/test.sh runs it after the main tests), in
# its own environment (requirements-xla.txt: torch 2.9.0, Triton 3.5.0, torch_xla 2.9.0) with its
# own CPU-only build of fastgen, made in a copy of the tree so that its fastgen._C (built for torch
# 2.9) never replaces the main environment's in this checkout:
#   1. XLA: every op, layer and reference model on an XLA device (torch_xla on the CPU, PJRT_DEVICE=CPU)
#      against CPU eager, with no CPU fallback allowed; the training command on one XLA device against
#      the CPU, and with SPMD / SPMD FSDP over 4 XLA CPU devices against one device on the whole batch;
#   2. the API and ABI of the oldest torch and Triton README promises, not the numerics again (the main run
#      has those): the build, the registry, backend and convert files, each op's opcheck / compile /
#      gradcheck / export tests, and each sweep once per core combination (backend, dtype, memory
#      format): --api-only, tests/conftest.py.
set -euo pipefail
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
copy=${FASTGEN_XLA_TREE:-$HOME/.cache/fastgen/xla-tree}
rm -rf "$copy" && mkdir -p "$copy"  # a fresh copy: no file deleted here survives there
(cd "$src" && tar --exclude=.git --exclude='*.so' --exclude=build --exclude='*.egg-info' --exclude=__pycache__ -cf - .) \
  | (cd "$copy" && tar -xf -)
export FASTGEN_REQUIREMENTS="$src/requirements-xla.txt" FASTGEN_CUDA=0 PJRT_DEVICE=CPU
# the copy is made anew each time, its objects are not: ninja recompiles only what changed
export FASTGEN_BUILD_DIR=${FASTGEN_XLA_BUILD_DIR:-$HOME/.cache/fastgen/xla-build}
source "$copy/tools/env.sh"
cd "$copy"
echo "   (oldest-torch environment and CPU-only build: $SECONDS s)"
# FASTGEN_XLA_BUILD_ONLY=1: the build alone (tools/test.sh compiles it beside the serial tests, which
# leave a core idle); the next run copies the tree anew and only links
if [ "${FASTGEN_XLA_BUILD_ONLY:-0}" = 1 ]; then exit 0; fi
start=$SECONDS
echo "== XLA (torch $(python -c 'import torch; print(torch.__version__)'))"
# XLA:CPU compiles 3-5x faster at LLVM's -O0 (a VAE training step: 7 s instead of 35 s); what the
# tests compare is the values (the same at either level), not XLA:CPU's speed
# Two pytest-xdist workers of one thread each (torch's and XLA:CPU's Eigen): one process kept 1.4 of the
# 2 cores busy (its compiles are one thread); two workers of two threads each took 337 s, of one, 279 s
# (one process: 380 s). worksteal: the long SPMD cases do not queue behind each other.
OMP_NUM_THREADS=1 XLA_FLAGS="--xla_backend_optimization_level=0 --xla_cpu_multi_thread_eigen=false ${XLA_FLAGS:-}" \
  python -m pytest tests/xla -q -p no:cacheprovider -rs --durations=10 -n 2 --dist worksteal "$@"
echo "   (XLA tests: $((SECONDS - start)) s)"
start=$SECONDS
echo "== the API and ABI checks on torch $(python -c 'import torch, triton; print(torch.__version__, "+ Triton", triton.__version__)')"
# (the tests marked serial among them too: they set thread counts, which only slows them beside a worker)
OMP_NUM_THREADS=1 python -m pytest tests -q -p no:cacheprovider --api-only --ignore=tests/xla -n 2 "$@"
echo "   (API and ABI checks: $((SECONDS - start)) s)"
