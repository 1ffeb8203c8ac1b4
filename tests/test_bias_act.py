import math

import pytest
import torch

from fastgen.nn import BiasAct
from fastgen.ops import bias_act, bias_act_ref
from fastgen.activations import ACTIVATIONS
from cases import check_compiled_layer, cpu_backends, fast_backends, skip_unavailable
from tolerances import assert_close, assert_close_grad

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# every activation of the table, by StyleGAN2's name where it has one (linear, lrelu, swish)
ACTS = [row.aliases[0] if row.aliases else name for name, row in ACTIVATIONS.items()]
FAST = fast_backends("bias_act")
# (shape, dim, memory format): NCHW and channels_last conv maps with odd sizes, a fully connected
# (N, C) activation, the bias along the last and the first dimension, one element
CASES = [((2, 5, 7, 9), 1, torch.contiguous_format), ((2, 5, 7, 9), 1, torch.channels_last),
         ((3, 17), 1, torch.contiguous_format), ((4, 3, 6), -1, torch.contiguous_format),
         ((6, 2, 3, 5), 0, torch.channels_last), ((1, 1, 1, 1), 1, torch.contiguous_format),
         ((2, 5, 3, 4, 6), 1, torch.channels_last_3d), ((2, 5, 3, 4, 6), 2, torch.channels_last_3d)]
CASE_IDS = ["nchw", "nhwc", "fc", "last-dim", "dim0-nhwc", "one", "video-nthwc", "video-time-nthwc"]


def make(shape, dim, fmt, dtype, device="cpu", bias=True, grad=False):
    x = (torch.randn(shape, device=device) * 2).to(dtype)
    x = x.to(memory_format=fmt) if x.dim() in (4, 5) else x
    b = torch.randn(shape[dim], device=device).to(dtype) if bias else None
    for t in (x, b):
        if grad and t is not None:
            t.requires_grad_(True)
    return x, b


def as64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.sweep
def test_forward(backend, device, act, dtype, case):
    skip_unavailable(backend, device)
    shape, dim, fmt = case
    x, b = make(shape, dim, fmt, dtype, device)
    out = bias_act(x, b, dim, act, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape and out.stride() == x.stride()
    assert_close(out, bias_act_ref(as64(x), as64(b), dim, act), dtype, scale=math.sqrt(2))


@pytest.mark.parametrize("backend", cpu_backends("bias_act", torch.float64))
@pytest.mark.parametrize("act", ACTS)
def test_forward_float64_alpha_gain_clamp_no_bias(backend, act):
    x, b = make((3, 4, 5, 6), 1, torch.contiguous_format, torch.float64)
    for bias, alpha, gain, clamp in ((b, 0.1, 0.7, 0.8), (None, None, None, None), (b, None, 3.0, 0.0)):
        out = bias_act(x, bias, 1, act, alpha, gain, clamp, backend=backend)
        assert_close(out, bias_act_ref(x, bias, 1, act, alpha, gain, clamp), torch.float64)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("act", ["lrelu", "swish", "tanh"])
def test_clamp_and_custom_alpha_gain(backend, device, act):
    skip_unavailable(backend, device)
    x, b = make((2, 6, 5, 4), 1, torch.channels_last, torch.float32, device)
    out = bias_act(x, b, 1, act, alpha=0.3, gain=2.5, clamp=0.75, backend=backend)
    assert (out.abs() <= 0.75).all() and (out.abs() == 0.75).any()  # the clamp is hit
    assert_close(out, bias_act_ref(as64(x), as64(b), 1, act, 0.3, 2.5, 0.75), torch.float32)


def test_defaults_are_stylegan2s():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(bias_act(x, act="lrelu"), torch.nn.functional.leaky_relu(x, 0.2) * math.sqrt(2))
    torch.testing.assert_close(bias_act(x, act="swish"), torch.nn.functional.silu(x) * math.sqrt(2))
    torch.testing.assert_close(bias_act(x, act="elu"), torch.nn.functional.elu(x))


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.sweep
def test_backward(backend, device, act, dtype, case):
    skip_unavailable(backend, device)
    shape, dim, fmt = case
    x, b = make(shape, dim, fmt, dtype, device, grad=True)
    clamp = 1.0 if act in ("relu", "swish") else None
    out = bias_act(x, b, dim, act, clamp=clamp, backend=backend)
    grad = torch.randn(out.shape, device=device).to(dtype)  # contiguous, whatever x's layout
    got = torch.autograd.grad(out, (x, b), grad)
    x64, b64 = as64(x), as64(b)
    want = torch.autograd.grad(bias_act_ref(x64, b64, dim, act, clamp=clamp), (x64, b64), grad.double())
    for g, e in zip(got, want, strict=True):
        assert g.dtype == dtype
        assert_close_grad(g, e, dtype)


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_gradgradcheck(act):
    # away from the kinks at 0 and from the clamp's edges, where finite differences straddle them
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64)
    x = (x + 0.2 * x.sign()).requires_grad_(True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    for backend in ("cpu", "composite"):
        f = lambda x, b: bias_act(x, b, 1, act, alpha=0.3, gain=1.3, clamp=5.0, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, b)) and torch.autograd.gradgradcheck(f, (x, b))


@pytest.mark.parametrize("backend,device", FAST)
def test_opcheck(backend, device):
    skip_unavailable(backend, device)
    x, b = make((2, 4, 3, 5), 1, torch.channels_last, torch.float32, device, grad=True)
    torch.library.opcheck(torch.ops.fastgen.bias_act.default, (x, b, 1, "lrelu", 0.2, 1.4, 0.9, backend))


def test_layer_compile_fullgraph_and_state_dict():
    torch._dynamo.reset()
    layer = BiasAct(8, act="lrelu", clamp=256.0)
    assert list(layer.state_dict()) == ["bias"]
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 8, 5, 5)
    check_compiled_layer(layer, x, "auto")
    torch.testing.assert_close(BiasAct(8, act="linear", dim=-1)(torch.ones(3, 8)), torch.ones(3, 8))


def test_empty_and_scalar():
    x = torch.randn(0, 4, 3, 3)
    assert bias_act(x, torch.randn(4), act="relu", backend="cpu").shape == x.shape
    for backend in ("cpu", "composite", "reference"):
        torch.testing.assert_close(bias_act(torch.tensor(-0.5), act="lrelu", backend=backend),
                                   torch.tensor(-0.5 * 0.2 * math.sqrt(2)))


def test_bad_arguments():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="act must be one of"):
        bias_act(x, act="mish")
    with pytest.raises(RuntimeError, match=r"b must be \(3,\)"):
        bias_act(x, torch.randn(4))
    with pytest.raises(IndexError, match="dim must be"):
        bias_act(x, torch.randn(3), dim=4)
    with pytest.raises(ValueError, match="clamp must be >= 0"):
        bias_act(x, clamp=-1.0)
    with pytest.raises(ValueError, match="gain must be a finite number"):
        bias_act(x, gain=float("nan"))
    with pytest.raises(RuntimeError, match="b must have x's dtype"):
        bias_act(x, torch.randn(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="floating-point"):
        bias_act(torch.ones(2, 3, dtype=torch.int64))
