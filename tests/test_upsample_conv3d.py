import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from fastgen.nn import UpsampleConv3d
from fastgen.ops import REGISTRY
from fastgen.ops import upsample_conv3d, upsample_conv3d_ref
from cases import cpu_backends, f64, fast_backends, skip_unavailable
from tolerances import assert_close, assert_close_grad

BACKENDS = cpu_backends("upsample_conv3d")
FAST = fast_backends("upsample_conv3d")  # and on CUDA tensors: tools/gpu_check.sh runs those
# (scale, kernel, padding): no upsampling with causal time padding (Wan), a feature cache standing in
# for part of it (one frame of zeros left), HunyuanVideo's spatial and 3-D 2x, the time convolution of
# Wan's temporal upsampler (3, 1, 1), a 1x1x1 shortcut, asymmetric and odd sizes
CASES = [
    (1, (3, 3, 3), (1, 1, 1, 1, 2, 0)),
    (1, (3, 3, 3), (1, 1, 1, 1, 1, 0)),
    ((1, 2, 2), (3, 3, 3), (1, 1, 1, 1, 2, 0)),
    (2, (3, 3, 3), 1),
    (1, (3, 1, 1), (0, 0, 0, 0, 2, 0)),
    (1, (1, 1, 1), 0),
    ((2, 1, 3), (2, 3, 1), (0, 2, 1, 0, 1, 3)),
    (4, (5, 3, 3), (2, 2, 1, 1, 0, 4)),
]
IDS = ["causal", "causal-cached", "spatial2x-causal", "up2-same", "time-conv", "pointwise", "asymmetric", "up4"]


def make(shape, co, k, dtype=torch.float32, bias=True, grad=False, device="cpu"):
    x = torch.randn(shape).to(device, dtype)
    w = (torch.randn(co, shape[1], *k) / (shape[1] * k[0] * k[1] * k[2]) ** 0.5).to(device, dtype)
    b = torch.randn(co).to(device, dtype) if bias else None
    for t in (x, w, b):
        if grad and t is not None:
            t.requires_grad_(True)
    return x, w, b



@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_gradients(backend, device, layout, case):
    skip_unavailable(backend, device)
    scale, k, padding = case
    x, w, b = make((2, 5, 3, 4, 5), 6, k, grad=True, device=device)
    if layout == "channels_last_3d":
        x = x.detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    out = upsample_conv3d(x, w, b, scale, padding, backend=backend)
    x64, w64, b64 = f64(x, w, b)
    want = upsample_conv3d_ref(x64, w64, b64, scale, padding)
    assert out.shape == want.shape
    if layout == "channels_last_3d":
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert_close(out, want, torch.float32)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), grad)
    expected = torch.autograd.grad(want, (x64, w64, b64), grad.double())
    for g, e in zip(got, expected, strict=True):
        assert_close_grad(g, e, torch.float32)


@pytest.mark.parametrize("backend,device,dtype", [
    pytest.param(*p.values, d, marks=p.marks, id=f"{p.id}-{str(d)[6:]}")
    for d in (torch.bfloat16, torch.float16, torch.float64) for p in FAST
    if d in REGISTRY["upsample_conv3d"].impls[p.values[0]].dtypes])
def test_dtypes(backend, device, dtype):
    skip_unavailable(backend, device)
    x, w, b = make((1, 4, 2, 3, 4), 5, (3, 3, 3), dtype, device=device)
    out = upsample_conv3d(x, w, b, (1, 2, 2), (1, 1, 1, 1, 2, 0), backend=backend)
    assert out.dtype == dtype
    assert_close(out, upsample_conv3d_ref(*f64(x, w, b), (1, 2, 2), (1, 1, 1, 1, 2, 0)), dtype, scale=2.0)


@settings(max_examples=40, deadline=None)
@given(scale=st.tuples(*[st.integers(1, 4)] * 3), k=st.tuples(*[st.integers(1, 4)] * 3),
       pads=st.tuples(*[st.integers(0, 3)] * 6), size=st.tuples(*[st.integers(1, 4)] * 3),
       backend=st.sampled_from(BACKENDS))
def test_any_scale_kernel_and_padding_matches_the_reference(scale, k, pads, size, backend):
    """Every axis folds on its own, the two sides of its padding apart: float64, exact to rounding (the
    Triton kernels, which have no float64: float32 against the float64 oracle)."""
    dtype = torch.float64 if torch.float64 in REGISTRY["upsample_conv3d"].impls[backend].dtypes else torch.float32
    x, w, b = (t.to(dtype) for t in make((1, 2, *size), 3, k))
    if any(s * n + pads[4 - 2 * d] + pads[5 - 2 * d] < k[d] for d, (s, n) in enumerate(zip(scale, size))):
        with pytest.raises(RuntimeError, match="smaller than the kernel"):
            upsample_conv3d(x, w, b, scale, pads, backend=backend)
        return
    assert_close(upsample_conv3d(x, w, b, scale, pads, backend=backend),
                 upsample_conv3d_ref(*f64(x, w, b), scale, pads), dtype)


def test_the_fold_never_makes_the_upsampled_clip():
    """No tensor of the upsampled clip's size is allocated (nearest 2x in every axis: 8x the input;
    the output has 5 channels, the input 8)."""
    x, w, b = make((1, 8, 4, 8, 8), 5, (3, 3, 3))
    sizes = []

    class Watch(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() == 5:
                    sizes.append(tuple(t.shape[1:]))
            return out

    with Watch():
        upsample_conv3d(x, w, b, 2, 1, backend="composite")
    assert (5, 8, 16, 16) in sizes and (8, 8, 16, 16) not in sizes


def test_layer_is_a_conv3d_and_causal_means_front_padding():
    conv = nn.Conv3d(4, 6, 3, padding=1)
    layer = UpsampleConv3d(4, 6, 3, scale_factor=(1, 2, 2), causal=True)
    layer.load_state_dict(conv.state_dict())
    assert list(layer.state_dict()) == list(conv.state_dict())
    x = torch.randn(2, 4, 3, 5, 4)
    want = conv.__class__(4, 6, 3, padding=0)
    want.load_state_dict(conv.state_dict())
    up = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
    torch.testing.assert_close(layer(x), want(F.pad(up, (1, 1, 1, 1, 2, 0))), atol=1e-5, rtol=1e-5)
    # causal: an output frame does not depend on later input frames
    y = layer(x)
    x2 = x.clone()
    x2[:, :, -1] += 1
    torch.testing.assert_close(layer(x2)[:, :, :-1], y[:, :, :-1])


def test_compiles_fullgraph():
    layer = UpsampleConv3d(3, 4, 3, scale_factor=2)
    x = torch.randn(1, 3, 2, 3, 3)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), layer(x))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(x=torch.randn(1, 4, 3, 3)), RuntimeError, "x must be 5-D"),
    (dict(x=torch.randint(0, 3, (1, 4, 2, 3, 3))), RuntimeError, "floating"),
    (dict(weight=torch.randn(5, 3, 3, 3, 3)), RuntimeError, "weight must be"),
    (dict(weight=torch.randn(5, 4, 3, 3, 3, dtype=torch.float64)), RuntimeError, "weight must have"),
    (dict(bias=torch.randn(4)), RuntimeError, "bias must be"),
    (dict(scale_factor=5), ValueError, "scale_factor"),
    (dict(scale_factor=1.5), ValueError, "scale_factor"),
    (dict(padding=(1, 1)), ValueError, "padding"),
    (dict(padding=(1, 1, 1, 1, -1, 0)), ValueError, "padding"),
    (dict(x=torch.randn(1, 4, 1, 1, 1)), RuntimeError, "smaller than the kernel"),
])
def test_bad_arguments(kwargs, error, match):
    args = dict(x=torch.randn(1, 4, 2, 3, 3), weight=torch.randn(5, 4, 3, 3, 3), bias=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        upsample_conv3d(**args)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[6], (3, (1, 1, 1), (0, 0, 0, 0, 3, 0))],
                         ids=["conv", "transposed", "transposed-cropped", "upsampled"])
def test_gradcheck_and_gradgradcheck(case):
    """The backward (aten's convolution backward of each plan: the convolution, the fold, the upsampled
    clip when no fold fits) and its own backward, in float64 against finite differences."""
    scale, k, padding = case
    x, w, b = (t.double().requires_grad_(True) for t in make((1, 2, 2, 3, 2), 2, k))
    f = lambda x, w, b: upsample_conv3d(x, w, b, scale, padding, backend="composite")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b)) and torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_opcheck(backend, device, layout):
    skip_unavailable(backend, device)
    x, w, b = make((1, 3, 2, 3, 4), 4, (3, 3, 3), grad=True, device=device)
    if layout == "channels_last_3d":
        x = x.detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    torch.library.opcheck(torch.ops.fastgen.upsample_conv3d.default, (x, w, b, [1, 2, 2], [1, 1, 1, 1, 2, 0], backend))
