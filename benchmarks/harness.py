"""One pytest-benchmark test per fastgen.bench suite: every provider, shape, layout and pass."""

import os

import pytest
import torch

import fastgen
from fastgen.bench import make_inputs, providers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def benchmark_suite(suite):
    shapes = suite.gpu_shapes if DEVICE == "cuda" else suite.cpu_shapes
    names = list(providers(suite, DEVICE)) + ["auto"]  # auto: what a user gets without choosing

    @pytest.mark.parametrize("provider", names)
    @pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
    @pytest.mark.parametrize("shape", shapes, ids=lambda s: s.name)
    @pytest.mark.parametrize("kind", ["fwd", "fwd+bwd"])
    def test(benchmark, provider, channels_last, shape, kind):
        if kind == "fwd+bwd" and shape is not shapes[0]:
            pytest.skip("fwd+bwd at the first shape only, to keep the CPU run short")
        torch._dynamo.reset()
        f = suite.fused(None) if provider == "auto" else providers(suite, DEVICE)[provider]
        inputs = make_inputs(suite, shape, DTYPE, DEVICE, channels_last, requires_grad=kind != "fwd")

        def step():
            out = f(*inputs, shape)
            if kind != "fwd":
                out.backward(torch.ones_like(out))
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            return out

        step()  # compile / autotune outside the timing
        benchmark.group = f"{suite.op} {shape.name} {DTYPE} {'nhwc' if channels_last else 'nchw'} {kind}"
        benchmark.extra_info.update(suite.work(shape, inputs[0].element_size()))
        benchmark.extra_info["fastgen"] = fastgen.__version__
        rounds = int(os.environ.get("FASTGEN_BENCH_ROUNDS", 30 if DEVICE == "cpu" else 50))
        benchmark.pedantic(step, rounds=rounds, warmup_rounds=3)

    return test
