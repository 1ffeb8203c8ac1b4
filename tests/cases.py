"""The backend x device cases the op tests run, and the one reason a CPU case is skipped."""

import os

import pytest


def fast_backends(cpu: tuple[str, ...], cuda: tuple[str, ...] = ("composite", "triton", "cuda")) -> list:
    """pytest params (backend, device): the op's fast backends on CPU tensors, and on CUDA tensors
    (marked `cuda`, skipped cleanly without a GPU)."""
    return [pytest.param(b, "cpu", id=f"{b}-cpu") for b in cpu] + [
        pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.cuda) for b in cuda]


def skip_unavailable(backend: str, device: str) -> None:
    if device == "cpu" and backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1")
