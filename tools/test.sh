#!/usr/bin/env bash
# README's test command: make the environment, build fastgen (CUDA sources included wherever nvcc
# exists), run every test. Triton kernels run through the interpreter when no GPU is visible.
source "$(dirname "$0")/env.sh"
cd "$root"
if ! nvidia-smi -L >/dev/null 2>&1; then export TRITON_INTERPRET=1; fi
python -m fastgen info
python -m pytest tests -q -p no:cacheprovider -rs "$@"
