#!/usr/bin/env bash
# README's main command: make the environment, build fastgen (once: an unchanged tree is not rebuilt),
# and run `python -m fastgen bench`: eager vs torch.compile vs auto vs each fastgen backend, side by
# side, every result checked against the float64 oracle; JSON + PNG under runs/bench/ (--record: the
# committed records under benchmarks/results/).
# Arguments go to the command (--full for the whole sweep, --ops, --shapes, --models, ...).
source "$(dirname "$0")/env.sh"
cd "$root"
python -m fastgen bench "$@"
