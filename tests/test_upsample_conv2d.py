import math
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastgen.nn import UpsampleConv2d
from fastgen.ops import upsample_conv2d, upsample_conv2d_ref
from cases import check_compiled_layer, cpu_backends, fast_backends, skip_unavailable
from tolerances import assert_close, assert_close_grad

MODES = [("nearest", 2), ("nearest", 3), ("nearest", 4), ("bilinear", 2)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = [torch.contiguous_format, torch.channels_last]
# (N, C, H, W), CO: odd sizes, H or W of 1, C not a multiple of 8, several K and N blocks
SHAPES = [((2, 5, 7, 9), 6), ((1, 1, 1, 3), 2), ((1, 12, 4, 1), 20), ((1, 40, 3, 5), 70)]
FAST = fast_backends("upsample_conv2d")


def make(shape, co, k, dtype, device="cpu", fmt=torch.contiguous_format, bias=True, grad=False):
    n, c, h, w = shape
    x = torch.randn(shape, device=device).to(dtype).to(memory_format=fmt)
    weight = (torch.randn(co, c, k, k, device=device) / math.sqrt(c * k * k)).to(dtype)
    b = torch.randn(co, device=device).to(dtype) if bias else None
    if grad:
        for t in (x, weight, b):
            if t is not None:
                t.requires_grad_(True)
    return x, weight, b


def oracle(x, weight, bias, **kw):
    """upsample_conv2d_ref on float64 copies of the very same inputs."""
    x, weight, bias = (None if t is None else t.detach().double().requires_grad_(t.requires_grad)
                       for t in (x, weight, bias))
    return x, weight, bias, upsample_conv2d_ref(x, weight, bias, **kw)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode,scale", MODES)
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,co", SHAPES, ids=lambda s: "x".join(map(str, s)) if isinstance(s, tuple) else str(s))
@pytest.mark.sweep
def test_forward(backend, device, dtype, mode, scale, k, fmt, shape, co):
    skip_unavailable(backend, device)
    x, w, b = make(shape, co, k, dtype, device, fmt)
    out = upsample_conv2d(x, w, b, scale_factor=scale, mode=mode, backend=backend)
    *_, expected = oracle(x, w, b, scale_factor=scale, mode=mode)
    assert out.dtype == dtype and out.shape == expected.shape
    if not x.is_contiguous() or fmt == torch.contiguous_format:  # (C=1 or H=W=1 fit both formats)
        assert out.is_contiguous(memory_format=fmt)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("mode,scale", MODES)
@pytest.mark.parametrize("padding", [0, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_padding_and_no_bias(backend, device, mode, scale, padding, bias):
    skip_unavailable(backend, device)
    x, w, b = make((2, 6, 5, 4), 7, 3, torch.float32, device, bias=bias)
    out = upsample_conv2d(x, w, b, scale_factor=scale, mode=mode, padding=padding, backend=backend)
    *_, expected = oracle(x, w, b, scale_factor=scale, mode=mode, padding=padding)
    assert out.shape == expected.shape
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode,scale", MODES)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_backward(backend, device, dtype, mode, scale, fmt):
    skip_unavailable(backend, device)
    x, w, b = make((2, 6, 5, 7), 9, 3, dtype, device, fmt, grad=True)
    out = upsample_conv2d(x, w, b, scale_factor=scale, mode=mode, backend=backend)
    grad = torch.randn_like(out)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), grad)
    x64, w64, b64, expected = oracle(x, w, b, scale_factor=scale, mode=mode)
    ex, ew, eb = torch.autograd.grad(expected, (x64, w64, b64), grad.double())
    for got, want in ((gx, ex), (gw, ew), (gb, eb)):
        assert got.dtype == dtype
        assert_close_grad(got, want, dtype)


@pytest.mark.parametrize("mode,scale", MODES)
@pytest.mark.parametrize("padding", [None, 0, 2])
def test_gradcheck_and_gradgradcheck(mode, scale, padding):
    # small: gradgradcheck perturbs every output element (scale 4 here: 1x3x12x16)
    x, w, b = make((1, 2, 3, 4), 3, 3, torch.float64, grad=True)
    f = lambda x, w, b: upsample_conv2d(x, w, b, scale_factor=scale, mode=mode, padding=padding,
                                        backend="composite")
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("mode,scale", [("nearest", 2), ("bilinear", 2)])
def test_opcheck(backend, device, mode, scale):
    skip_unavailable(backend, device)
    x, w, b = make((2, 4, 5, 3), 5, 3, torch.float32, device, grad=True)
    torch.library.opcheck(torch.ops.fastgen.upsample_conv2d.default, (x, w, b, scale, mode, 1, backend))


@pytest.mark.parametrize("backend", cpu_backends("upsample_conv2d"))
def test_compile_fullgraph(backend):
    check_compiled_layer(UpsampleConv2d(6, 8, 3, mode="nearest"), torch.randn(2, 6, 5, 7, requires_grad=True), backend)


@pytest.mark.parametrize("mode,scale", MODES)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_layer_matches_upsample_then_conv(mode, scale, k):
    conv = nn.Conv2d(5, 7, k, padding=k // 2)
    up = nn.Upsample(scale_factor=scale, mode=mode)
    fused = UpsampleConv2d.from_modules(up, conv)
    assert fused.weight is conv.weight and fused.bias is conv.bias
    x = torch.randn(2, 5, 6, 3)
    torch.testing.assert_close(fused(x), conv(up(x)), atol=1e-5, rtol=1e-5)


def test_layer_state_dict_is_conv2ds():
    layer = UpsampleConv2d(4, 6, 3, scale_factor=2)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    assert layer.state_dict().keys() == conv.state_dict().keys()
    assert [p.shape for p in layer.parameters()] == [p.shape for p in conv.parameters()]
    layer.load_state_dict(conv.state_dict())
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(layer(x), conv(F.interpolate(x, scale_factor=2)), atol=1e-5, rtol=1e-5)
    assert "bias" not in UpsampleConv2d(4, 6, 3, bias=False).state_dict()


def test_from_modules_rejects_what_it_cannot_fuse():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    with pytest.raises(ValueError, match="align_corners"):
        UpsampleConv2d.from_modules(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), conv)
    with pytest.raises(ValueError, match="conv"):
        UpsampleConv2d.from_modules(nn.Upsample(scale_factor=2), nn.Conv2d(3, 3, 3, stride=2, padding=1))
    with pytest.raises(ValueError, match="scale_factor"):
        UpsampleConv2d.from_modules(nn.Upsample(scale_factor=1.5), conv)
    with pytest.raises(ValueError, match="size"):
        UpsampleConv2d.from_modules(nn.Upsample(size=(8, 8)), conv)
    with pytest.raises(TypeError):
        UpsampleConv2d.from_modules(conv, conv)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(mode="bicubic"), ValueError, "mode"),
    (dict(scale_factor=5), ValueError, "scale_factor"),
    (dict(scale_factor=1.5), ValueError, "scale_factor"),
    (dict(scale_factor=3, mode="bilinear"), ValueError, "scale_factor"),
    (dict(padding=-1), ValueError, "padding"),
    (dict(padding=1.0), ValueError, "padding"),
    (dict(backend="fast"), ValueError, "backend"),
    (dict(backend="cpu"), NotImplementedError, "cpu"),
])
def test_bad_arguments(kwargs, error, match):
    x, w, b = make((1, 3, 4, 4), 2, 3, torch.float32)
    with pytest.raises(error, match=match):
        upsample_conv2d(x, w, b, **kwargs)


def test_bad_tensors():
    x, w, b = make((1, 3, 4, 4), 2, 3, torch.float32)
    with pytest.raises(RuntimeError, match="input channels"):
        upsample_conv2d(x, w[:, :2], b)
    with pytest.raises(RuntimeError, match="bias"):
        upsample_conv2d(x, w, b[:1])
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        upsample_conv2d(x, w.double(), b)
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        upsample_conv2d(x[0], w, b)
    with pytest.raises(TypeError, match="weight must be a Tensor"):
        upsample_conv2d(x, None, b)
    with pytest.raises(ValueError, match="odd square"):
        upsample_conv2d(x, torch.randn(2, 3, 2, 2), b)
    with pytest.raises(RuntimeError, match="floating"):
        upsample_conv2d(x.long(), w, b)
    with pytest.raises(RuntimeError, match="too small"):
        upsample_conv2d(torch.randn(1, 3, 1, 1), torch.randn(2, 3, 5, 5), b, padding=0)
    with pytest.raises(RuntimeError, match="too small"):
        upsample_conv2d(torch.randn(1, 3, 0, 4), w, b)


@pytest.mark.parametrize("backend,device", FAST)
def test_batch_zero(backend, device):
    skip_unavailable(backend, device)
    x, w, b = make((0, 3, 4, 4), 2, 3, torch.float32, device)
    assert upsample_conv2d(x, w, b, backend=backend).shape == (0, 2, 8, 8)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("mode,scale", [("nearest", 2), ("nearest", 3), ("bilinear", 2)])
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_triton_int64_pixel_indices(monkeypatch, device, mode, scale, fmt):
    # past 2^31 output pixels per phase the Triton kernel divides pixel indices in int64: the same
    # result, forced here at a small size
    import importlib

    skip_unavailable("triton", device)
    monkeypatch.setattr(importlib.import_module("fastgen.ops.upsample_conv2d"), "INT32_INDICES", 0)
    x, w, b = make((2, 5, 6, 7), 9, 3, torch.float32, device, fmt)
    out = upsample_conv2d(x, w, b, scale_factor=scale, mode=mode, backend="triton")
    *_, expected = oracle(x, w, b, scale_factor=scale, mode=mode)
    assert_close(out, expected, torch.float32)
