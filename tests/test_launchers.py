"""The Triton launchers' arguments and grids, checked on the CPU without launching anything: the
kernel is replaced by a recorder, the tensors live on the meta device (no memory), so even the
largest generator shapes cost nothing. What the GPU needs and the interpreter does not check."""

from types import SimpleNamespace

import pytest
import torch

import fastgen.ops._registry as registry
from fastgen.ops import bias_act
from fastgen.ops.batch_norm_act import _batch_norm_act_triton
from fastgen.ops.bias_act import _bias_act_triton
from fastgen.ops.pixel_norm import _pixel_norm_triton
from fastgen.ops.upfirdn2d import _upfirdn2d_triton, setup_filter
from fastgen.ops.upsample_conv2d import _upsample_conv2d_triton

GRID_X, GRID_YZ = 2 ** 31 - 1, 65535  # CUDA's limits per grid dimension


class Recorder:
    """Stands for a @triton.jit kernel: kernel[grid](*args, **meta) records instead of launching."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((tuple(grid), args, meta))


@pytest.fixture
def record(monkeypatch):
    def patch(module: str, name: str) -> Recorder:
        recorder = Recorder()
        monkeypatch.setattr(f"fastgen.kernels.{module}.{name}", recorder)
        return recorder
    return patch


def assert_grid_fits(grid):
    assert 1 <= grid[0] <= GRID_X and all(1 <= g <= GRID_YZ for g in grid[1:]), f"grid {grid} is over CUDA's limits"


def meta(*shape, dtype=torch.bfloat16, fmt=torch.contiguous_format):
    return torch.empty(shape, dtype=dtype, device="meta").to(memory_format=fmt)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_pixel_norm_grid_at_1024x1024_with_512_channels(record, fmt):
    kernel = record("pixel_norm", "_pixel_norm_fwd_kernel")
    _pixel_norm_triton(meta(4, 512, 1024, 1024, fmt=fmt), 1e-8)  # 65536 blocks of 16 positions a sample
    (grid, _, m), = kernel.calls
    assert_grid_fits(grid)
    assert grid[0] * m["BLOCK_L"] >= 4 * 1024 * 1024


@pytest.mark.parametrize("up,down", [(2, 1), (1, 2), (1, 1)])
def test_upfirdn2d_grid_above_4096x4096(record, up, down):
    kernel = record("upfirdn2d", "_upfirdn2d_fwd_kernel")
    x = meta(2, 64, 4096 // up * 2, 4096 // up * 2)  # outputs past 4096x4096
    _upfirdn2d_triton(x, setup_filter((1, 3, 3, 1)), (up, up), (down, down), (1, 2, 1, 2), False, 1.0)
    (grid, _, m), = kernel.calls
    assert_grid_fits(grid)


@pytest.mark.parametrize("shape", [(1, 512, 128, 128), (4, 256, 1024, 1024), (32, 128, 256, 256)])
def test_upsample_conv2d_grid_at_generator_shapes(record, shape):
    kernel = record("upsample_conv2d", "_upsample_conv2d_fwd_kernel")
    x = meta(*shape)
    _upsample_conv2d_triton(x, meta(shape[1], shape[1], 3, 3), meta(shape[1]), 2, "nearest", 1)
    (grid, _, _), = kernel.calls
    assert_grid_fits(grid)


def test_one_dimensional_parameters_reach_triton_contiguous(record):
    """A strided view read as if contiguous would silently give wrong results on the GPU."""
    kernel = record("bias_act", "_bias_act_fwd_kernel")
    b = torch.randn(16)[::2]  # 8 values, stride 2
    _bias_act_triton(torch.randn(2, 8, 3, 3), b, 1, "lrelu", 0.2, 1.0, -1.0)
    (_, args, _), = kernel.calls
    assert args[1].is_contiguous() and torch.equal(args[1], b)
    bn = record("batch_norm_act", "_batch_norm_act_fwd_kernel")
    record("batch_norm_act", "_batch_norm_stats_kernel")
    w = torch.randn(12)[::2]
    _batch_norm_act_triton(torch.randn(2, 6, 3, 3), w, w, None, None, True, 1e-5, "relu", 0.0)
    (_, args, _), = bn.calls
    assert args[2].is_contiguous() and args[3].is_contiguous()
    conv = record("upsample_conv2d", "_upsample_conv2d_fwd_kernel")
    _upsample_conv2d_triton(torch.randn(1, 4, 3, 3), torch.randn(6, 4, 3, 3), torch.randn(12)[::2], 2, "nearest", 1)
    (_, args, _), = conv.calls
    assert args[2].is_contiguous()


def test_implementations_run_on_the_inputs_cuda_device(monkeypatch):
    """Every implementation runs with x's device current (a tensor on cuda:1 with cuda:0 current
    would make a Triton launch fault); on the CPU nothing changes."""
    entered = []

    class FakeDevice:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    with registry.on_device(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))):
        pass
    assert entered == [torch.device("cuda", 1)]
    seen = []
    monkeypatch.setattr(registry, "on_device", lambda x: seen.append(x) or torch.autograd.graph.saved_tensors_hooks(
        lambda t: t, lambda t: t))
    x = torch.randn(2, 3, 4, 4)
    bias_act(x, torch.randn(3), act="relu", backend="composite")
    assert len(seen) == 1 and seen[0] is x
