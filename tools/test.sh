#!/usr/bin/env bash
# README's test command: make the environment, build fastgen (CUDA sources included wherever nvcc
# exists), run every test, then each benchmark file once (quick); then the oldest-torch stage
# (tools/test_xla.sh: its own environment, torch 2.9 + torch_xla: the XLA tests, then every test again).
# Triton kernels run through the interpreter when no GPU is visible.
source "$(dirname "$0")/env.sh"
cd "$root"
if ! nvidia-smi -L >/dev/null 2>&1; then export TRITON_INTERPRET=1; fi
python -m fastgen info
python -m pytest tests -q -p no:cacheprovider -rs "$@"
echo "== the benchmark files, once each at their quick shapes (--benchmark-disable: run, not timed)"
python -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable
echo "== the oldest-torch stage: XLA, then the tests again on torch 2.9 + Triton 3.5"
env -u TRITON_INTERPRET bash "$root/tools/test_xla.sh"
