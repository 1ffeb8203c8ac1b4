"""upsample_conv2d: eager vs torch.compile vs fastgen, side by side (pytest benchmarks --benchmark-only).

Each group is one shape x dtype x layout x pass; compare the medians inside a group. The GPU
sweep with achieved TFLOP/s, errors and peak memory is `python -m fastgen bench`.
"""

import pytest
import torch

from fastgen.bench import CPU_SHAPES, GPU_SHAPES, make_inputs, providers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = GPU_SHAPES if DEVICE == "cuda" else CPU_SHAPES
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
PROVIDERS = providers(DEVICE)
# auto: what a user gets without choosing (the done-when figure of the foundation issue)
PROVIDERS["auto"] = lambda x, w, b, s: __import__("fastgen").ops.upsample_conv2d(
    x, w, b, scale_factor=s.scale, mode=s.mode)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("kind", ["fwd", "fwd+bwd"])
def test_upsample_conv2d(benchmark, provider, channels_last, shape, kind):
    if kind == "fwd+bwd" and shape is not SHAPES[0]:
        pytest.skip("fwd+bwd at the first shape only, to keep the CPU run short")
    x, w, b = make_inputs(shape, DTYPE, DEVICE, channels_last, requires_grad=kind != "fwd")
    f = PROVIDERS[provider]

    def step():
        out = f(x, w, b, shape)
        if kind != "fwd":
            out.backward(torch.ones_like(out))
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    step()  # compile / autotune outside the timing
    benchmark.group = f"upsample_conv2d {shape.name} {DTYPE} {'nhwc' if channels_last else 'nchw'} {kind}"
    benchmark.extra_info["gflop"] = shape.flops() * (3 if kind != "fwd" else 1) / 1e9
    benchmark.pedantic(step, rounds=30 if DEVICE == "cpu" else 50, warmup_rounds=3)
