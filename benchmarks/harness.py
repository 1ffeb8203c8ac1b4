"""pytest-benchmark over fastgen.bench's suites: one test per op (benchmarks/bench_<op>.py), one
benchmark group per op, shape, dtype, layout and pass, with every provider of that row in it (eager,
torch.compile, auto, each fastgen backend), so `--benchmark-compare` matches rows across runs.

`pytest benchmarks --benchmark-only` times every shape; `pytest benchmarks --benchmark-disable`
(README's test command) runs each op's quick shape once per provider, so the files cannot rot.
"""

import os

import pytest
import torch

import fastgen
from fastgen.bench import make_inputs, providers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def cases(suite, quick: bool) -> list[tuple]:
    """(shape, provider) pairs: every shape of the device (quick: the suite's quick one) with the
    providers that run at it."""
    shapes = suite.gpu_shapes if DEVICE == "cuda" else suite.cpu_shapes
    return [(s, name) for s in shapes if s.quick or not quick for name in providers(suite, DEVICE, s)]


def benchmark_suite(suite):
    """The test for one suite; benchmarks/conftest.py parametrizes `case` from cases(suite, quick)."""

    @pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
    @pytest.mark.parametrize("kind", ["fwd", "fwd+bwd"])
    def test(benchmark, case, channels_last, kind):
        shape, provider = case
        torch._dynamo.reset()
        f = providers(suite, DEVICE, shape)[provider]
        need_grad = kind != "fwd"
        inputs = make_inputs(suite, shape, DTYPE, DEVICE, channels_last, need_grad)

        def step():
            out = f(*inputs, shape)
            if need_grad:
                torch.autograd.grad(out, [inputs[i] for i in suite.grad_of], torch.ones_like(out))
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            return out

        out = step()  # compile / autotune outside the timing
        assert out.isfinite().all(), f"{provider} gave a non-finite result"
        benchmark.group = f"{suite.op} {shape.name} {DTYPE} {'nhwc' if channels_last else 'nchw'} {kind}"
        benchmark.extra_info.update(suite.work(shape, inputs[0].element_size()))
        benchmark.extra_info["fastgen"] = fastgen.__version__
        rounds = int(os.environ.get("FASTGEN_BENCH_ROUNDS", 30 if DEVICE == "cpu" else 50))
        benchmark.pedantic(step, rounds=rounds, warmup_rounds=3)

    test.suite = suite
    return test
