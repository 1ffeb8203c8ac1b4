"""What the build and the import registered: every op, its kernels per dispatch key."""

import os

import pytest
import torch

import fastgen  # noqa: F401  (registers everything)
from fastgen.dispatch import backends

PUBLIC_OPS = ["upsample_conv2d", "group_norm_act", "batch_norm_act", "pixel_norm", "bias_act", "upfirdn2d"]
CPU_KERNELS = ["_group_norm_act_fused", "_batch_norm_act_fused", "_bias_act_fused", "_upfirdn2d_fused"]
CUDA_KERNELS = ["_upsample_conv2d_fused", "_group_norm_act_fused", "_batch_norm_act_fused", "_pixel_norm_fused", "_bias_act_fused",
                "_upfirdn2d_fused"]


def has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgen::{op}", key)


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_public_ops_have_cpu_cuda_xla_fake_and_autograd_kernels(op):
    for key in ("CPU", "CUDA", "XLA", "Meta", "Autograd"):
        assert has_kernel(op, key), f"fastgen::{op} has no {key} kernel"


@pytest.mark.parametrize("op", CPU_KERNELS)
def test_cpu_kernels_are_registered(op):
    assert has_kernel(op, "CPU")


@pytest.mark.parametrize("op", CUDA_KERNELS)
def test_cuda_kernels_are_registered_when_built_with_cuda(op):
    assert backends()["cuda"].available == has_kernel("_upsample_conv2d_fused", "CUDA")
    if os.environ.get("FASTGEN_CUDA") == "1":  # the build was told to compile the CUDA sources
        assert has_kernel(op, "CUDA"), f"FASTGEN_CUDA=1 build, but fastgen::{op} has no CUDA kernel"
