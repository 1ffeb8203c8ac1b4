"""What the build and the import registered: every op's custom op and its kernels per dispatch key,
as its spec (fastgen.ops.REGISTRY) says."""

import os

import pytest
import torch

from fastgen.dispatch import backends
from fastgen.ops import REGISTRY

CUSTOM_OPS = [spec.name for spec in REGISTRY.values() if spec.custom_op]
CPU_KERNELS = sorted({k for spec in REGISTRY.values() for k in spec.kernels.get("cpu", ())})
CUDA_KERNELS = sorted({k for spec in REGISTRY.values() for k in spec.kernels.get("cuda", ())})


def has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgen::{op}", key)


def test_the_lists_are_not_empty():
    assert len(CUSTOM_OPS) >= 6 and len(CPU_KERNELS) >= 5 and len(CUDA_KERNELS) >= 7
    assert "_bias_act_grad_fused" in CPU_KERNELS and "_bias_act_grad_fused" in CUDA_KERNELS


@pytest.mark.parametrize("op", CUSTOM_OPS)
def test_custom_ops_have_cpu_cuda_xla_fake_and_autograd_kernels(op):
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


def test_the_checkout_root_shadows_no_kernels_package(tmp_path):
    """kernels/ is fastgen.kernels; from the checkout root (on sys.path) a top-level `import kernels`
    reaches the real package of that name (Hugging Face's, which diffusers imports), or none."""
    import subprocess
    import sys
    from pathlib import Path

    import fastgen

    root = str(Path(fastgen.__file__).resolve().parents[1])
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("CUDAProperties = 'the real one'\n")
    code = ("from kernels import CUDAProperties; import fastgen.kernels.bias_act; print(CUDAProperties)")
    for path, want in (([root, str(tmp_path)], "the real one"), ([root], "No module named 'kernels'")):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                              timeout=300)
        assert want in done.stdout + done.stderr, done.stderr[-2000:]
