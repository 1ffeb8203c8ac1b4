"""Whole generators: eager vs torch.compile vs fastgen (pytest benchmarks --benchmark-only -k models).

One group per model; the models and what is timed are fastgen.bench.models.MODELS. Peak memory per
provider needs a process each: `python -m fastgen bench --models`.
"""

import functools
import os

import pytest
import torch

from fastgen.bench.models import MODELS


@pytest.mark.parametrize("provider", ["eager", "compile", "converted"])
@pytest.mark.parametrize("name", MODELS)
def test_models(benchmark, name, provider):
    build, make_input, run, what = MODELS[name]
    torch.manual_seed(0)
    model = build(provider == "converted").eval()
    step = functools.partial(run, model)
    if provider == "compile":
        torch._dynamo.reset()
        step = torch.compile(step)
    z = make_input()
    with torch.no_grad():
        step(z)  # compile / warm up outside the timing
        benchmark.group = f"model {name}: {what}"
        benchmark.pedantic(step, args=(z,), rounds=int(os.environ.get("FASTGEN_BENCH_ROUNDS", 5)), warmup_rounds=1)
