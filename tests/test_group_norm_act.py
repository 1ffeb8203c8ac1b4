import pytest
import torch
from torch import nn

from fastgen.nn import GroupNormAct
from fastgen.ops import group_norm_act, group_norm_act_ref
from fastgen.activations import ACTIVATIONS
from cases import check_compiled_layer, cpu_backends, fast_backends, skip_unavailable
from tolerances import assert_close, assert_close_grad

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = [torch.contiguous_format, torch.channels_last]
# (N, C, H, W), G: odd sizes, one position, one channel per group (instance norm), one group,
# several chunks per group in the kernels
SHAPES = [((2, 8, 5, 7), 4), ((1, 6, 1, 1), 3), ((3, 4, 9, 2), 4), ((2, 5, 3, 3), 5), ((2, 6, 4, 3), 1),
          ((1, 40, 33, 31), 8)]
FAST = fast_backends("group_norm_act")
SHAPE_IDS = lambda s: "x".join(map(str, s)) if isinstance(s, tuple) else f"G{s}"  # noqa: E731


def make(shape, dtype, device="cpu", fmt=torch.contiguous_format, affine=((True, True)), grad=False):
    c = shape[1]
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype).to(memory_format=fmt)
    w = torch.randn(c, device=device).to(dtype) if affine[0] else None
    b = torch.randn(c, device=device).to(dtype) if affine[1] else None
    if grad:
        for t in (x, w, b):
            if t is not None:
                t.requires_grad_(True)
    return x, w, b


def oracle(x, w, b, *args, **kw):
    x, w, b = (None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in (x, w, b))
    return x, w, b, group_norm_act_ref(x, *args[:1], w, b, *args[1:], **kw)


def check_layout(out, x, fmt):
    if not x.is_contiguous() or fmt == torch.contiguous_format:  # (C=1 or H=W=1 fit both formats)
        assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,groups", SHAPES, ids=SHAPE_IDS)
@pytest.mark.sweep
def test_forward_activations(backend, device, activation, fmt, shape, groups):
    skip_unavailable(backend, device)
    x, w, b = make(shape, torch.float32, device, fmt)
    out = group_norm_act(x, groups, w, b, activation=activation, negative_slope=0.2, backend=backend)
    *_, expected = oracle(x, w, b, groups, 1e-5, activation, 0.2)
    check_layout(out, x, fmt)
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,groups", SHAPES, ids=SHAPE_IDS)
@pytest.mark.sweep
def test_forward_dtypes(backend, device, dtype, fmt, shape, groups):
    skip_unavailable(backend, device)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes float32/16 and bfloat16")
    x, w, b = make(shape, dtype, device, fmt)
    out = group_norm_act(x, groups, w, b, activation="silu", backend=backend)
    *_, expected = oracle(x, w, b, groups, 1e-5, "silu")
    assert out.dtype == dtype
    check_layout(out, x, fmt)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True), ("sample", "sample"),
                                    ("sample", True), (True, "sample")], ids=str)
def test_affine_variants(backend, device, affine):
    """weight / bias absent, per channel (C,) or per sample (N, C) (AdaIN), in any mix."""
    skip_unavailable(backend, device)
    x = torch.randn(3, 6, 5, 4, device=device)
    w, b = (None if a is False else torch.randn(*((3, 6) if a == "sample" else (6,)), device=device)
            for a in affine)
    out = group_norm_act(x, 2, w, b, activation="gelu", backend=backend)
    *_, expected = oracle(x, w, b, 2, 1e-5, "gelu")
    assert_close(out, expected, torch.float32)


def test_large_mean_keeps_its_precision():
    """Values offset by 100 (std 1): a variance formed as E[x^2] - E[x]^2 in fp32 would lose about
    three digits. The fp32 output itself is rounded relative to |x| ~ 100 when the mean is folded
    into the shift, as eager's kernel does too: scale 4."""
    x = torch.randn(2, 8, 16, 16) + 100
    for backend in ("composite", "cpu"):
        out = group_norm_act(x, 4, activation="identity", backend=backend)
        *_, expected = oracle(x, None, None, 4, 1e-5, "identity")
        assert_close(out, expected, torch.float32, scale=4.0)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "leaky_relu"])
def test_backward(backend, device, dtype, fmt, activation):
    skip_unavailable(backend, device)
    x, w, b = make((2, 6, 5, 3), dtype, device, fmt, grad=True)
    out = group_norm_act(x, 3, w, b, activation=activation, backend=backend)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), grad)
    x64, w64, b64, expected = oracle(x, w, b, 3, 1e-5, activation)
    want = torch.autograd.grad(expected, (x64, w64, b64), grad.double())
    for g, e in zip(got, want, strict=True):
        assert g.dtype == dtype
        assert_close_grad(g, e, dtype)


@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "relu"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_gradcheck_and_gradgradcheck(activation, per_sample):
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    shape = (2, 6) if per_sample else (6,)
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    f = lambda x, w, b: group_norm_act(x, 3, w, b, activation=activation, negative_slope=0.1,  # noqa: E731
                                       backend="composite")
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("backend,device", FAST)
def test_opcheck(backend, device):
    skip_unavailable(backend, device)
    x, w, b = make((2, 6, 5, 3), torch.float32, device, grad=True)
    torch.library.opcheck(torch.ops.fastgen.group_norm_act.default, (x, 3, w, b, 1e-5, "silu", 0.01, backend))


@pytest.mark.parametrize("backend", cpu_backends("group_norm_act"))
def test_compile_fullgraph(backend):
    check_compiled_layer(GroupNormAct(2, 6), torch.randn(2, 6, 5, 7, requires_grad=True), backend)


def test_layer_is_a_group_norm():
    layer = GroupNormAct(4, 8, activation="gelu")
    norm = nn.GroupNorm(4, 8)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    assert layer.state_dict().keys() == norm.state_dict().keys()
    layer.load_state_dict(norm.state_dict())
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(layer(x), nn.GELU()(norm(x)), atol=1e-5, rtol=1e-5)
    assert "weight" not in GroupNormAct(4, 8, affine=False).state_dict()


@pytest.mark.parametrize("act,name", [(nn.SiLU(), "silu"), (nn.ReLU(), "relu"), (nn.LeakyReLU(0.2), "leaky_relu"),
                                      (nn.GELU(approximate="tanh"), "gelu_tanh"), (None, "identity")])
def test_from_modules(act, name):
    norm = nn.GroupNorm(2, 6)
    fused = GroupNormAct.from_modules(norm, act)
    assert fused.activation == name and fused.weight is norm.weight and fused.bias is norm.bias
    x = torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(fused(x), (act or nn.Identity())(norm(x)), atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="Hardswish"):
        GroupNormAct.from_modules(norm, nn.Hardswish())


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_groups=4), ValueError, "num_groups"),
    (dict(num_groups=0), ValueError, "num_groups"),
    (dict(activation="mish"), ValueError, "activation must be one of"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(weight=torch.randn(5)), RuntimeError, "weight must be"),
    (dict(bias=torch.randn(6, dtype=torch.float64)), RuntimeError, "bias must have x's dtype"),
    (dict(backend="gpu"), ValueError, "backend"),
])
def test_bad_arguments(kwargs, error, match):
    args = dict(x=torch.randn(2, 6, 3, 3), num_groups=3)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        group_norm_act(**args)
    with pytest.raises(RuntimeError, match="floating"):
        group_norm_act(torch.ones(2, 6, 3, 3, dtype=torch.long), 3)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,groups", [((2, 130, 3, 5), 1), ((1, 384, 4, 4), 2)], ids=SHAPE_IDS)
def test_groups_wider_than_one_tile(backend, device, fmt, shape, groups):
    # 130 and 192 channels per group: the Triton kernels walk a group in chunks of 64 channels (the
    # last one partial); forward, the statistics and every gradient against the float64 oracle
    skip_unavailable(backend, device)
    x, w, b = make(shape, torch.float32, device, fmt, grad=True)
    out = group_norm_act(x, groups, w, b, activation="silu", backend=backend)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), grad)
    x64, w64, b64, expected = oracle(x, w, b, groups, 1e-5, "silu")
    assert_close(out, expected, torch.float32)
    want = torch.autograd.grad(expected, (x64, w64, b64), grad.double())
    for g, e in zip(got, want, strict=True):
        assert_close_grad(g, e, torch.float32)


# Video: (N, C, T, H, W), contiguous or channels_last_3d (the layout diffusers' video VAEs keep when
# the user converts them); one frame, odd sizes, a channel per group, a group per sample
VIDEO_FORMATS = [torch.contiguous_format, torch.channels_last_3d]
VIDEO_SHAPES = [((2, 8, 3, 5, 7), 4), ((1, 6, 1, 4, 3), 3), ((1, 4, 5, 3, 2), 4), ((2, 6, 2, 3, 3), 1),
                ((1, 96, 3, 6, 5), 1)]


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", VIDEO_FORMATS, ids=["ncthw", "nthwc"])
@pytest.mark.parametrize("shape,groups", VIDEO_SHAPES, ids=SHAPE_IDS)
def test_video_forward_and_backward(backend, device, dtype, fmt, shape, groups):
    skip_unavailable(backend, device)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes float32/16 and bfloat16")
    x, w, b = make(shape, dtype, device, fmt, grad=True)
    out = group_norm_act(x, groups, w, b, eps=1e-6, activation="silu", backend=backend)
    check_layout(out, x, fmt)
    x64, w64, b64, expected = oracle(x, w, b, groups, 1e-6, "silu")
    assert_close(out, expected, dtype)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), grad)
    want = torch.autograd.grad(expected, (x64, w64, b64), grad.double())
    assert got[0].is_contiguous(memory_format=fmt) or x.is_contiguous()
    for g, e in zip(got, want, strict=True):
        assert_close_grad(g, e, dtype)


def test_video_layer_loads_a_group_norm_and_keeps_channels_last_3d():
    norm, act = nn.GroupNorm(4, 8, eps=1e-6), nn.SiLU()
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    layer = GroupNormAct(4, 8, eps=1e-6)
    layer.load_state_dict(norm.state_dict())
    x = torch.randn(2, 8, 3, 6, 5).contiguous(memory_format=torch.channels_last_3d)
    out = layer(x)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, act(norm(x)), atol=1e-5, rtol=1e-5)
