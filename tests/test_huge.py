"""Tensors above 2^31 elements: every offset a kernel computes is int64 (C++, CUDA, Triton).

Each case is four samples whose output holds more than 2^31 elements, so the last sample's tail lies
beyond any int32 offset; that sample must equal the op run on it alone (a quarter of the size, where
int32 would still do; four samples, not two: the reference runs one sample, on one thread). bf16 keeps a case near 4.3 GB per tensor: the C++ CPU kernels run here (about 10
GB at peak, 5-15 s each); the composites upcast to fp32 and do not fit in the CI machine's 24 GiB
(20-34 GB measured), nor does modulated_conv2d's transposed convolution, so they run on the GPU only
(tools/gpu_check.sh), with every CUDA and Triton kernel. Batch norm's statistics span the batch: its
four samples are equal, so the outputs must be, and match the op on one sample."""

import pytest
import torch

from fastgen import ops
from fastgen.ops.upfirdn2d import setup_filter

from cases import skip_unavailable

pytestmark = pytest.mark.serial  # ~10 GB each: alone, never beside another test

PERIOD = 1_000_003  # a prime period for the values: an offset wrapped at 2^32 would read other values


def _big(n, c, h, w, device, layout="nchw"):
    """bf16 (n, c, h, w) filled with a random prime-period pattern (fast to make, no fp32 copy)."""
    x = torch.empty(n, c, h, w, dtype=torch.bfloat16, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x
    flat = _flat(x)
    tile = torch.randn(PERIOD, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    whole = flat.numel() // PERIOD
    flat[: whole * PERIOD].view(whole, PERIOD).copy_(tile.expand(whole, PERIOD))
    flat[whole * PERIOD:].copy_(tile[: flat.numel() - whole * PERIOD])
    return x


def _flat(t):
    """A dense tensor's elements in memory order, as a view."""
    return (t.permute(0, 2, 3, 1) if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
            and not t.is_contiguous() else t).reshape(-1)


def _assert_same(got, want, exact):
    """Chunk by chunk (a float copy of the whole would not fit)."""
    assert got.shape == want.shape
    a, b = _flat(got), _flat(want)
    step = 1 << 26
    for i in range(0, a.numel(), step):
        if exact:
            assert torch.equal(a[i:i + step], b[i:i + step]), f"differs in elements {i}..{i + step}"
        else:
            torch.testing.assert_close(a[i:i + step], b[i:i + step])


S = 16385  # odd: no size a power of two (4 x C x S x W > 2^31 below, W = 2^31 / (4 C S) rounded up)
FIR = setup_filter([1, 3, 3, 1])
CASES = {  # name: (make the input, the op, the backends that fit on the CPU)
    "bias_act": (lambda d, lay: _big(4, 2, S, S - 1, d, lay),
                 lambda x, be: ops.bias_act(x, torch.linspace(-1, 1, 2, device=x.device).to(x.dtype), act="lrelu",
                                            backend=be), ("cpu",)),
    "upfirdn2d": (lambda d, lay: _big(4, 1, S, 8192, d, lay),  # up 2: 4 x 1 x 2S x 16384
                  lambda x, be: ops.upfirdn2d(x, FIR.to(x.device), up=2, padding=[2, 1, 2, 1], gain=4, backend=be),
                  ("cpu",)),
    "group_norm_act": (lambda d, lay: _big(4, 4, S, 8192, d, lay),
                       lambda x, be: ops.group_norm_act(x, 2, activation="silu", backend=be), ("cpu",)),
    "instance_norm_act": (lambda d, lay: _big(4, 2, S, S, d, lay),
                          lambda x, be: ops.instance_norm_act(x, activation="lrelu", backend=be), ()),
    "pixel_norm": (lambda d, lay: _big(4, 4, S, 8192, d, lay), lambda x, be: ops.pixel_norm(x, backend=be), ()),
    # 8 channels: its per-position statistics (fp32, returned for the backward) stay near 1 GB
    "rms_norm_act": (lambda d, lay: _big(4, 8, S, 4096, d, lay),
                     lambda x, be: ops.rms_norm_act(x, torch.linspace(0.5, 1.5, 8, device=x.device).to(x.dtype),
                                                    None, 1e-6, "silu", backend=be), ("cpu",)),
    "upsample_conv2d": (lambda d, lay: _big(4, 1, S, 8192, d, lay),
                        lambda x, be: ops.upsample_conv2d(x, torch.full((1, 1, 3, 3), 0.1, device=x.device).to(x.dtype),
                                                          scale_factor=2, padding=1, backend=be), ()),
    "modulated_conv2d": (lambda d, lay: _big(4, 1, S, 8192, d, lay),
                         lambda x, be: ops.modulated_conv2d(
                             x, torch.full((1, 1, 3, 3), 0.1, device=x.device).to(x.dtype),
                             torch.ones(x.shape[0], 1, device=x.device, dtype=x.dtype), True, 2, 1,
                             FIR.to(x.device), 1, flip_weight=False, backend=be), ()),
}


def _params():
    out = []
    for name, (_, _, on_cpu) in CASES.items():
        for layout in ("nchw", "nhwc"):
            out += [pytest.param(name, be, "cpu", layout, id=f"{name}-{be}-cpu-{layout}") for be in on_cpu]
            out += [pytest.param(name, be, "cuda", layout, id=f"{name}-{be}-cuda-{layout}", marks=pytest.mark.cuda)
                    for be in ("composite", "triton", "cuda") if be in ops.REGISTRY[name].impls]
    return out


@pytest.mark.parametrize("name, backend, device, layout", _params())
@torch.no_grad()
def test_beyond_int32(name, backend, device, layout):
    skip_unavailable(backend, device)
    make, op, _ = CASES[name]
    x = make(device, layout)
    y = op(x, backend)
    assert y.numel() > 2 ** 31
    # the CPU kernels split work by sample alone: bitwise; GPU reductions split by size: rounding
    _assert_same(y[-1:], op(x[-1:], backend), exact=device == "cpu")


@pytest.mark.parametrize("backend, device", [pytest.param("cpu", "cpu", id="cpu-cpu")] + [
    pytest.param(be, "cuda", id=f"{be}-cuda", marks=pytest.mark.cuda) for be in ("composite", "triton", "cuda")])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@torch.no_grad()
def test_batch_norm_beyond_int32(backend, device, layout):
    skip_unavailable(backend, device)
    x = _big(1, 4, S, 8192, device, layout).expand(4, -1, -1, -1)
    x = x.contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
    w = torch.linspace(0.5, 2, 4, device=device).to(x.dtype)

    def op(x):  # momentum 1: the running statistics become the batch's (variance unbiased)
        stats = torch.zeros(4, device=device), torch.ones(4, device=device)
        y = ops.batch_norm_act(x, *stats, w, w, True, momentum=1.0, activation="relu", backend=backend)
        return y, stats

    y, stats = op(x)
    assert y.numel() > 2 ** 31
    for i in range(1, 4):  # equal samples, the same per-channel a and b
        _assert_same(y[i:i + 1], y[:1], exact=True)
    y1, stats1 = op(x[:1])
    torch.testing.assert_close(stats[0], stats1[0])
    torch.testing.assert_close(stats[1], stats1[1], rtol=1e-5, atol=0)  # n / (n - 1) differs by 1e-9
    _assert_same(y[:1], y1, exact=False)
