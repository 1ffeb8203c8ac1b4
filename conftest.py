"""Shared by tests/ and benchmarks/: anything marked `cuda` is skipped cleanly without a GPU."""

import os

# Without a GPU, the tests run Triton kernels on CPU tensors through the interpreter; the variable
# must be set before torch, triton or fastgen is imported.
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
