import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastgen.activations import ACTIVATIONS
from fastgen.nn import RMSNormAct
from fastgen.ops import rms_norm_act, rms_norm_act_ref
from cases import check_compiled_layer, f64, fast_backends, skip_unavailable
from tolerances import assert_close, assert_close_grad

FAST = fast_backends("rms_norm_act")
# images and video clips: odd sizes, one position, one channel, more channels than one tile (Triton: 64)
SHAPES = [(2, 8, 5, 7), (1, 1, 3, 2), (2, 6, 1, 1), (2, 8, 3, 5, 7), (1, 96, 2, 3, 5), (1, 3, 1, 4, 4)]
SHAPE_IDS = lambda s: "x".join(map(str, s))  # noqa: E731


def channels_last(x):
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def make(shape, dtype, device="cpu", channels_last_=False, affine=(True, True), grad=False):
    c = shape[1]
    x = (torch.randn(shape, device=device) * 2 + 0.3).to(dtype)
    x = channels_last(x) if channels_last_ else x
    w = (torch.randn(c, device=device) + 1).to(dtype) if affine[0] else None
    b = torch.randn(c, device=device).to(dtype) if affine[1] else None
    for t in (x, w, b):
        if grad and t is not None:
            t.requires_grad_(True)
    return x, w, b



@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("clamp", [False, True], ids=["eps-added", "eps-clamped"])
@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.sweep
def test_forward(backend, device, activation, clamp, layout, shape):
    skip_unavailable(backend, device)
    x, w, b = make(shape, torch.float32, device, layout == "channels-last")
    out = rms_norm_act(x, w, b, 1e-5, activation, 0.2, clamp=clamp, backend=backend)
    expected = rms_norm_act_ref(*f64(x, w, b), 1e-5, activation, 0.2, clamp=clamp)
    if layout == "channels-last" and not x.is_contiguous():
        assert out.stride() == x.stride()
    elif layout == "contiguous":
        assert out.is_contiguous()
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)], ids=str)
def test_dtypes_and_affine(backend, device, dtype, affine):
    skip_unavailable(backend, device)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes float32/16 and bfloat16")
    x, w, b = make((2, 12, 3, 4, 5), dtype, device, affine=affine)
    out = rms_norm_act(x, w, b, backend=backend)
    assert out.dtype == dtype
    assert_close(out, rms_norm_act_ref(*f64(x, w, b)), dtype)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("clamp", [False, True], ids=["eps-added", "eps-clamped"])
@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "leaky_relu"])
def test_backward(backend, device, dtype, clamp, layout, activation):
    skip_unavailable(backend, device)
    x, w, b = make((2, 6, 3, 5, 4), dtype, device, layout == "channels-last", grad=True)
    out = rms_norm_act(x, w, b, 1e-5, activation, clamp=clamp, backend=backend)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), grad)
    x64, w64, b64 = f64(x, w, b)
    want = torch.autograd.grad(rms_norm_act_ref(x64, w64, b64, 1e-5, activation, clamp=clamp), (x64, w64, b64),
                               grad.double())
    assert got[0].stride() == x.stride()
    for g, e in zip(got, want, strict=True):
        assert g.dtype == dtype
        assert_close_grad(g, e, dtype)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
@pytest.mark.parametrize("below_eps", [True, False], ids=["first-frame-below-eps", "none-below-eps"])
def test_backward_over_channel_chunks_position_blocks_and_clamped_rows(backend, device, affine, layout, below_eps):
    """40 channels (two chunks of the Triton kernels' 32), 189 positions a sample (several blocks, the
    last partial), with and without affine; the first frame's RMS at half of eps (clamp: r = 1 / eps is
    constant there, dx = r g has no projection term; at half of eps, not far below it, the projection
    would be of dx's own size), or no position below eps. The clamped rows' dx is a million times the
    others': each part is judged on its own scale."""
    skip_unavailable(backend, device)
    eps = 1e-6
    x, w, b = make((2, 40, 3, 7, 9), torch.float32, device, layout == "channels-last", affine=(affine, affine))
    if below_eps:
        with torch.no_grad():
            first = x[:, :, 0]
            x[:, :, 0] = first / first.square().mean(1, keepdim=True).sqrt() * (eps / 2)
    params = [t.requires_grad_(True) for t in (x, w, b) if t is not None]
    out = rms_norm_act(x, w, b, eps, "silu", clamp=True, backend=backend)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, params, grad)
    x64, w64, b64 = f64(x, w, b)
    want = torch.autograd.grad(rms_norm_act_ref(x64, w64, b64, eps, "silu", clamp=True),
                               [t for t in (x64, w64, b64) if t is not None], grad.double())
    frames = [slice(0, 1), slice(1, None)] if below_eps else [slice(None)]
    for frame in frames:
        assert_close_grad(got[0][:, :, frame], want[0][:, :, frame], torch.float32)
    for g, e in zip(got[1:], want[1:], strict=True):
        assert_close_grad(g, e, torch.float32)


def test_clamped_rows_below_eps():
    """Positions whose RMS is below eps (zero padding, blank frames) are divided by eps, and their
    gradient has no normalization term (F.normalize's clamp); the others are normalized."""
    x = torch.randn(1, 4, 2, 3, 3, dtype=torch.float64)
    x[:, :, 0] *= 1e-9
    w, b = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    got = rms_norm_act(xs[0], w, b, 1e-6, "tanh", clamp=True, backend="composite")
    want = rms_norm_act_ref(xs[1], w, b, 1e-6, "tanh", clamp=True)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, xs[0], g)[0], torch.autograd.grad(want, xs[1], g)[0])


@pytest.mark.parametrize("clamp", [False, True])
def test_gradcheck_and_gradgradcheck(clamp):
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    f = lambda x, w, b: rms_norm_act(x, w, b, 1e-4, "gelu", clamp=clamp, backend="composite")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("backend,device", FAST)
def test_opcheck(backend, device):
    skip_unavailable(backend, device)
    x, w, b = make((2, 6, 3, 4, 5), torch.float32, device, grad=True)
    torch.library.opcheck(torch.ops.fastgen.rms_norm_act.default, (x, w, b, 1e-6, False, "silu", 0.01, backend))


def test_wan_and_ltx_forms_are_expressible():
    """Wan's norm (F.normalize(x, dim=1) * C ** 0.5 * gamma + bias) is clamp=True with eps 1e-12 /
    C ** 0.5; an RMSNorm over channels (LTX: over the last dimension after movedim) is clamp=False."""
    x = torch.randn(2, 16, 3, 5, 6, dtype=torch.float64)
    gamma, bias = torch.randn(16, 1, 1, 1, dtype=torch.float64), torch.randn(16, 1, 1, 1, dtype=torch.float64)
    wan = F.silu(F.normalize(x, dim=1) * 16 ** 0.5 * gamma + bias)
    ours = rms_norm_act(x, gamma.flatten(), bias.flatten(), 1e-12 / math.sqrt(16), clamp=True)
    torch.testing.assert_close(ours, wan)
    norm = nn.RMSNorm(16, eps=1e-6, dtype=torch.float64)
    nn.init.normal_(norm.weight)
    ltx = F.silu(norm(x.movedim(1, -1)).movedim(-1, 1))
    torch.testing.assert_close(rms_norm_act(x, norm.weight.detach(), None, 1e-6), ltx)


def test_layer_state_dict_and_compile():
    layer = RMSNormAct(6, eps=1e-5, bias=True)
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert set(RMSNormAct(6).state_dict()) == {"weight"} and not RMSNormAct(6, elementwise_affine=False).state_dict()
    nn.init.normal_(layer.weight), nn.init.normal_(layer.bias)
    x = torch.randn(2, 6, 3, 4, 5)
    torch.testing.assert_close(layer(x), rms_norm_act_ref(x, layer.weight, layer.bias, 1e-5), atol=1e-5, rtol=1e-5)
    check_compiled_layer(RMSNormAct(6), torch.randn(2, 6, 3, 4, requires_grad=True), "composite")


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(x=torch.randn(4)), RuntimeError, "x must be"),
    (dict(x=torch.randint(0, 3, (2, 4, 3))), RuntimeError, "floating"),
    (dict(weight=torch.randn(5)), RuntimeError, "weight must be"),
    (dict(bias=torch.randn(4, dtype=torch.float64)), RuntimeError, "bias must have"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(clamp=1), TypeError, "clamp"),
    (dict(activation="nope"), ValueError, "activation"),
])
def test_bad_arguments(kwargs, error, match):
    args = dict(x=torch.randn(2, 4, 3, 3), weight=None, bias=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        rms_norm_act(**args)


def test_triton_launches_batches_past_the_grid_limit_in_chunks(monkeypatch):
    """The Triton grid's second dimension is the batch (at most 65535 samples a launch): a larger
    batch is launched in chunks (forced here at 2 samples a launch)."""
    import os

    module = importlib.import_module("fastgen.ops.rms_norm_act")  # the module (fastgen.ops.rms_norm_act is the op)

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1")
    monkeypatch.setattr(module, "_MAX_GRID_Y", 2)
    x, w, b = make((5, 6, 3, 4), torch.float32)
    x.requires_grad_(True)
    out = rms_norm_act(x, w, b, 1e-5, "silu", clamp=True, backend="triton")
    x64, w64, b64 = f64(x, w, b)
    want = rms_norm_act_ref(x64, w64, b64, 1e-5, "silu", clamp=True)
    assert_close(out, want, torch.float32)
    grad = torch.randn_like(out)  # the backward kernel is launched in chunks too
    assert_close_grad(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(want, x64, grad.double())[0],
                      torch.float32)
