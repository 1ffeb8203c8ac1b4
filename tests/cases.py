"""The backend x device cases the op tests run, read from the op's spec (fastgen.ops.REGISTRY), and
the one reason a CPU case is skipped.

Which Triton path runs where: the triton-cpu cases run the kernels through the interpreter, which
gets bf16 wrong, so there the launchers set EMULATE_BF16 (rounding by hand) and DOT_IN_FP32 (bf16
tiles through an fp32 tl.dot); the triton-cuda cases (marked cuda, run by tools/gpu_check.sh) run
the native path: bf16 casts and bf16 tl.dot on tensor cores, with both flags off."""

import copy
import os

import pytest
import torch

import fastgen

from fastgen.dispatch import DEVICES
from fastgen.ops import REGISTRY
from fastgen.tolerances import judge


def f64(*ts):
    """Float64 copies for the oracle, leaves that keep each tensor's requires_grad (None stays None)."""
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in ts]


def fast_backends(op: str) -> list:
    """pytest params (backend, device): every fast backend of `op` on CPU tensors, then on CUDA
    tensors (marked `cuda`, skipped cleanly without a GPU)."""
    names = sorted(REGISTRY[op].impls, key=("composite", "cpu", "triton", "cuda").index)
    return [pytest.param(b, "cpu", id=f"{b}-cpu") for b in names if "cpu" in DEVICES[b]] + [
        pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.cuda) for b in names if "cuda" in DEVICES[b]]


def cpu_backends(op: str, dtype: torch.dtype | None = None) -> list[str]:
    """The fast backends of `op` that run on CPU tensors (and take `dtype`, when given)."""
    impls = REGISTRY[op].impls
    return [p.values[0] for p in fast_backends(op)
            if p.values[1] == "cpu" and (dtype is None or dtype in impls[p.values[0]].dtypes)]


def skip_unavailable(backend: str, device: str) -> None:
    if device == "cpu" and backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1")


def check_compiled_layer(layer, x: torch.Tensor, backend: str, *more: torch.Tensor) -> None:
    """torch.compile(fullgraph=True) of the layer (inputs x, *more) gives eager's output, is within the
    unfused layers' own error of the float64 oracle (the layer in float64 on the reference path), and
    its backward runs (when x requires grad)."""
    skip_unavailable(backend, "cpu")
    torch._dynamo.reset()
    with fastgen.use_backend(backend):
        eager = layer(x, *more)
        compiled = torch.compile(layer, fullgraph=True)(x, *more)
    torch.testing.assert_close(compiled, eager)
    with fastgen.use_backend("reference"), torch.no_grad():
        oracle = copy.deepcopy(layer).double()(x.detach().double(), *[t.double() for t in more])
        unfused = layer(x.detach(), *more)
    problems = judge([compiled.detach()], [unfused], [oracle], x.dtype)
    assert not problems, problems
    if x.requires_grad:
        compiled.sum().backward()
        assert x.grad is not None and x.grad.isfinite().all()
