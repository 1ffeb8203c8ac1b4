#!/usr/bin/env bash
# README's main command: make the environment, build fastgen, and compare every provider
# (eager, torch.compile, each fastgen backend) at generator shapes, writing the results under
# benchmarks/results/.
source "$(dirname "$0")/env.sh"
cd "$root"
device=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu')")
python -m fastgen bench --out "benchmarks/results/bench-$device.json" "$@"
