"""The fused first-order backward of group_norm_act (and through it instance norm and AdaIN) and
batch_norm_act: the cpu, cuda and triton backends' two-pass kernels from the forward's saved
statistics, against the float64 oracle (eager autograd of the unfused layers in float64)."""

import importlib
import zlib

import pytest
import torch
from torch import nn

import fastgen
from fastgen.activations import ACTIVATIONS
from fastgen.ops import (adaptive_instance_norm, batch_norm_act, batch_norm_act_ref, group_norm_act, group_norm_act_ref,
                         instance_norm_act)
from cases import cpu_backends, fast_backends, skip_unavailable
from fastgen import ops
from fastgen.tolerances import judge
from tolerances import assert_close_grad

GN_FAST = [p for p in fast_backends("group_norm_act") if p.values[0] != "composite"]
BN_FAST = [p for p in fast_backends("batch_norm_act") if p.values[0] != "composite"]
FORMATS = [torch.contiguous_format, torch.channels_last]
FORMAT_IDS = ["nchw", "nhwc"]
# (N, C, H, W), G: odd sizes, one channel per group (instance norm), one group, odd channels per
# group, one position, several chunks per group in the GPU kernels
GN_SHAPES = [((2, 6, 5, 7), 3), ((3, 5, 4, 3), 5), ((2, 6, 3, 5), 1), ((2, 9, 3, 3), 3), ((4, 6, 1, 1), 2),
             ((1, 40, 33, 31), 8)]
gn_module = importlib.import_module("fastgen.ops.group_norm_act")  # the module (fastgen.ops.group_norm_act is the op)
bn_module = importlib.import_module("fastgen.ops.batch_norm_act")
SHAPE_IDS = lambda s: "x".join(map(str, s)) if isinstance(s, tuple) else f"G{s}"  # noqa: E731


def _grads(f, inputs, cotangent):
    used = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(f(*inputs), used, cotangent)


def _oracle_grads(f, inputs, cotangent):
    inputs64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    return _grads(f, inputs64, cotangent.double())


def _check(got, want, dtype):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype and g.shape == w.shape
        assert_close_grad(g, w, dtype)


def _gn_inputs(shape, dtype, device, fmt, affine):
    n, c = shape[:2]
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, affine)).encode()))
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device=device, dtype=dtype).to(memory_format=fmt)
    params = [None if a is None else torch.randn(*((n, c) if a == "sample" else (c,)), generator=g)
              for a in affine]
    params = [None if t is None else t.to(device=device, dtype=dtype).requires_grad_() for t in params]
    return [x.requires_grad_(), *params], torch.randn(shape, generator=g).to(device=device, dtype=dtype)


@pytest.mark.parametrize("backend,device", GN_FAST)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_group_norm_every_activation(backend, device, activation, fmt):
    skip_unavailable(backend, device)
    inputs, cot = _gn_inputs((2, 6, 5, 7), torch.float32, device, fmt, ("channel", "channel"))
    cot = cot.contiguous(memory_format=fmt)
    f = lambda x, w, b: group_norm_act(x, 3, w, b, activation=activation, negative_slope=0.2,  # noqa: E731
                                       backend=backend)
    ref = lambda x, w, b: group_norm_act_ref(x, 3, w, b, activation=activation, negative_slope=0.2)  # noqa: E731
    _check(_grads(f, inputs, cot), _oracle_grads(ref, inputs, cot), torch.float32)


@pytest.mark.parametrize("backend,device", GN_FAST)
@pytest.mark.parametrize("affine", [(None, None), ("channel", None), (None, "channel"), ("sample", "sample"),
                                    ("sample", "channel"), ("channel", "sample")], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("shape,groups", GN_SHAPES, ids=SHAPE_IDS)
@pytest.mark.sweep
def test_group_norm_shapes_and_affines(backend, device, affine, fmt, shape, groups):
    """Per channel (C,) and per sample (N, C) (AdaIN) affine in any mix, odd group sizes; the
    incoming gradient in NCHW while x is channels_last (a layer that hands back another layout)."""
    skip_unavailable(backend, device)
    inputs, cot = _gn_inputs(shape, torch.float32, device, fmt, affine)
    f = lambda x, w, b: group_norm_act(x, groups, w, b, activation="silu", backend=backend)  # noqa: E731

    def ref(x, w, b):
        if w is None and b is not None:  # torch 2.9's GroupNorm backward fails on a bias without a weight
            w = torch.ones(shape[1], dtype=x.dtype, device=x.device)  # ("tensor does not have a device"): the same function
        return group_norm_act_ref(x, groups, w, b, activation="silu")

    _check(_grads(f, inputs, cot), _oracle_grads(ref, inputs, cot), torch.float32)


@pytest.mark.parametrize("backend,device", GN_FAST)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_group_norm_dtypes(backend, device, dtype, fmt):
    """Half precision recomputes gz in the second pass (dx cannot hold it); float64 stores it."""
    skip_unavailable(backend, device)
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the triton backend takes float32/16 and bfloat16")
    inputs, cot = _gn_inputs((2, 8, 6, 5), dtype, device, fmt, ("channel", "channel"))
    f = lambda x, w, b: group_norm_act(x, 4, w, b, activation="gelu", backend=backend)  # noqa: E731
    ref = lambda x, w, b: group_norm_act_ref(x, 4, w, b, activation="gelu")  # noqa: E731
    _check(_grads(f, inputs, cot), _oracle_grads(ref, inputs, cot), dtype)


@pytest.mark.parametrize("backend,device", GN_FAST)
def test_instance_norm_and_adain(backend, device):
    skip_unavailable(backend, device)
    inputs, cot = _gn_inputs((3, 5, 6, 4), torch.float32, device, torch.contiguous_format, ("channel", "channel"))
    f = lambda x, w, b: instance_norm_act(x, w, b, activation="relu", backend=backend)  # noqa: E731
    ref = lambda x, w, b: group_norm_act_ref(x, 5, w, b, activation="relu")  # noqa: E731
    _check(_grads(f, inputs, cot), _oracle_grads(ref, inputs, cot), torch.float32)
    inputs, cot = _gn_inputs((3, 5, 6, 4), torch.float32, device, torch.channels_last, ("sample", "sample"))
    f = lambda x, s, b: adaptive_instance_norm(x, s, b, activation="leaky_relu", backend=backend)  # noqa: E731
    ref = lambda x, s, b: group_norm_act_ref(x, 5, s, b, activation="leaky_relu")  # noqa: E731
    _check(_grads(f, inputs, cot), _oracle_grads(ref, inputs, cot), torch.float32)


@pytest.mark.parametrize("backend,device", GN_FAST)
def test_group_norm_parameter_grads_only(backend, device):
    """x without grad: pass 1 alone (no dx), dgamma and dbeta still right."""
    skip_unavailable(backend, device)
    inputs, cot = _gn_inputs((2, 6, 5, 7), torch.float32, device, torch.contiguous_format, ("channel", "sample"))
    inputs[0].requires_grad_(False)
    f = lambda x, w, b: group_norm_act(x, 3, w, b, activation="gelu_tanh", backend=backend)  # noqa: E731
    ref = lambda x, w, b: group_norm_act_ref(x, 3, w, b, activation="gelu_tanh")  # noqa: E731
    _check(_grads(f, inputs, cot), _oracle_grads(ref, inputs, cot), torch.float32)


@pytest.mark.parametrize("backend,device", GN_FAST)
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_group_norm_saves_the_statistics(backend, device, fmt):
    """The op returns each (sample, group)'s mean and rstd, which the backward reads."""
    skip_unavailable(backend, device)
    x = (torch.randn(3, 8, 5, 6, device=device) * 3 + 1).to(memory_format=fmt)
    _, mean, rstd = torch.ops.fastgen.group_norm_act(x, 4, None, None, 1e-5, "silu", 0.01, backend)
    groups = x.double().reshape(3, 4, -1)
    torch.testing.assert_close(mean.double(), groups.mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd.double(), (groups.var(-1, unbiased=False) + 1e-5).rsqrt(), atol=1e-5, rtol=1e-5)


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args: calls.append(args) or real(*args))
    return calls


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_first_order_backward_takes_the_fused_kernels(backend, monkeypatch):
    """A plain backward runs the fused kernels and never recomputes the statistics; a backward
    with create_graph takes the differentiable math (double backward works)."""
    skip_unavailable(backend, "cpu")
    fused = _spy(monkeypatch, gn_module, "_backward_fused")
    recomputed = _spy(monkeypatch, gn_module, "_statistics")
    x = torch.randn(2, 6, 4, 5, requires_grad=True)
    w = torch.randn(6, requires_grad=True)
    group_norm_act(x, 3, w, None, backend=backend).square().sum().backward()
    assert len(fused) == 1 and not recomputed
    weights = torch.randn(2, 6, 4, 5)  # a loss linear in y: the double backward does not pass through y
    gx, = torch.autograd.grad((group_norm_act(x, 3, w, None, backend=backend) * weights).sum(), x, create_graph=True)
    gx.square().sum().backward()
    assert len(fused) == 1 and recomputed

    bn_fused = _spy(monkeypatch, bn_module, "_backward_fused")
    batch_norm_act(x, None, None, w, None, True, backend=backend).sum().backward()
    assert len(bn_fused) == 1


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("backend", ["cpu"])
def test_gradcheck_through_the_fused_backend(backend, per_sample):
    """float64 through the cpu backend: gradcheck exercises the fused first-order kernels (grad
    mode is off in a plain backward), gradgradcheck the differentiable math."""
    skip_unavailable(backend, "cpu")
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    shape = (2, 6) if per_sample else (6,)
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    f = lambda x, w, b: group_norm_act(x, 3, w, b, activation="gelu", backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    for training in (True, False):
        mean, var = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5
        wc, bc = torch.randn(6, dtype=torch.float64, requires_grad=True), torch.randn(6, dtype=torch.float64,
                                                                                         requires_grad=True)
        g = lambda x, w, b: batch_norm_act(x, None if training else mean, None if training else var, w, b,  # noqa: E731
                                           training, activation="silu", backend=backend)
        assert torch.autograd.gradcheck(g, (x, wc, bc))


# ---------------------------------------------------------------------------------------------
# batch_norm_act

def _bn_inputs(shape, dtype, device, fmt, affine=True):
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, affine)).encode()))
    c = shape[1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device=device, dtype=dtype).to(memory_format=fmt)
    w, b = (torch.randn(c, generator=g).to(device=device, dtype=dtype).requires_grad_() if affine else None
            for _ in range(2))
    stats = torch.randn(c, generator=g).to(device), (torch.rand(c, generator=g) + 0.5).to(device)
    return [x.requires_grad_(), w, b], stats, torch.randn(shape, generator=g).to(device=device, dtype=dtype)


@pytest.mark.parametrize("backend,device", BN_FAST)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_batch_norm_every_activation(backend, device, activation, training, fmt):
    skip_unavailable(backend, device)
    inputs, (mean, var), cot = _bn_inputs((3, 5, 6, 7), torch.float32, device, fmt)

    def f(x, w, b, ref=False, double=False):
        stats = (None, None) if training else ((mean.double(), var.double()) if double else (mean, var))
        if ref:
            return batch_norm_act_ref(x, *stats, w, b, training, activation=activation, negative_slope=0.2)
        return batch_norm_act(x, *stats, w, b, training, activation=activation, negative_slope=0.2, backend=backend)

    _check(_grads(f, inputs, cot), _oracle_grads(lambda *t: f(*t, ref=True, double=True), inputs, cot), torch.float32)


@pytest.mark.parametrize("backend,device", BN_FAST)
@pytest.mark.parametrize("shape", [(16, 7, 4, 4), (2, 3, 1, 1), (1, 70, 9, 11), (5, 4, 3)], ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_batch_norm_shapes_dtypes(backend, device, shape, dtype, affine):
    skip_unavailable(backend, device)
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the triton backend takes float32/16 and bfloat16")
    fmt = torch.channels_last if len(shape) == 4 and shape[0] % 2 else torch.contiguous_format
    inputs, _, cot = _bn_inputs(shape, dtype, device, fmt, affine)
    f = lambda x, w, b: batch_norm_act(x, None, None, w, b, True, activation="relu", backend=backend)  # noqa: E731
    ref = lambda x, w, b: batch_norm_act_ref(x, None, None, w, b, True, activation="relu")  # noqa: E731
    _check(_grads(f, inputs, cot), _oracle_grads(ref, inputs, cot), dtype)


# ---------------------------------------------------------------------------------------------
# a small generator, and torch.compile

class _TinyGenerator(nn.Module):
    """GroupNorm + SiLU and BatchNorm + ReLU between upsampling convolutions, as in the reference
    generators."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1), fastgen.nn.GroupNormAct(4, 16, activation="silu"), nn.Upsample(scale_factor=2),
            nn.Conv2d(16, 12, 3, padding=1), fastgen.nn.BatchNormAct2d(12, activation="relu"),
            nn.Conv2d(12, 3, 3, padding=1))

    def forward(self, z):
        return self.body(z)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_loss_gradient_through_a_small_generator(backend, fmt):
    """Every parameter's gradient of an image loss, fused backend in float32 vs the unfused layers
    in float64."""
    skip_unavailable(backend, "cpu")
    torch.manual_seed(0)
    model = _TinyGenerator().to(memory_format=fmt)
    z = torch.randn(4, 8, 6, 6).to(memory_format=fmt)
    target = torch.randn(4, 3, 12, 12)
    model64 = _TinyGenerator().double()
    model64.load_state_dict(model.state_dict())
    with fastgen.use_backend(backend):
        nn.functional.mse_loss(model(z), target).backward()
    with fastgen.use_backend("reference"):
        nn.functional.mse_loss(model64(z.double()), target.double()).backward()
    for (name, p), p64 in zip(model.named_parameters(), model64.parameters(), strict=True):
        assert p.grad is not None, name
        assert_close_grad(p.grad, p64.grad, torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compiled_backward_matches_eager(backend):
    """torch.compile(fullgraph=True): the backward graph holds the fused backward op and gives the
    eager fused gradients."""
    skip_unavailable(backend, "cpu")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _TinyGenerator()
    z = torch.randn(2, 8, 6, 6, requires_grad=True)

    def grads(m):
        with fastgen.use_backend(backend):
            out = m(z)
        return torch.autograd.grad(out.square().mean(), [z, *model.parameters()])

    eager = grads(model)
    compiled = grads(torch.compile(model, fullgraph=True))
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", cpu_backends("group_norm_act"))
@pytest.mark.parametrize("shape,groups", [((2, 16, 1, 1), 8), ((1, 8, 1, 1), 4), ((2, 16, 2, 2), 8)])
def test_a_few_values_per_group_lose_nothing_to_eager(backend, shape, groups):
    """An ill-conditioned group (2 to 8 values): dx is a small difference of large terms. The fused
    backward was 2e-4 off where eager was 4e-5 (float32 statistics); it runs in float64 there now."""
    for fmt in (torch.contiguous_format, torch.channels_last):
        for seed in range(12):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(shape, generator=g).to(memory_format=fmt)
            w, b = torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g)
            dy = torch.randn(shape, generator=g).to(memory_format=fmt)

            def run(be, dtype):
                leaves = [t.to(dtype).detach().requires_grad_(True) for t in (x, w, b)]
                y = ops.group_norm_act(leaves[0], groups, *leaves[1:], 1e-6, "identity", backend=be)
                return [y.detach(), *torch.autograd.grad(y, leaves, dy.to(dtype))]

            problems = judge(run(backend, torch.float32), run("reference", torch.float32),
                             run("reference", torch.float64), torch.float32)
            assert not problems, (fmt, seed, problems)
