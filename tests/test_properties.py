"""Property tests (hypothesis): random shapes (odd sizes, 1-pixel maps, many small groups), dtypes,
memory formats, non-contiguous views and parameters, for every op and every backend that runs on
CPU tensors here, forward and backward, against the op's reference in float64.

Each test runs once per fast backend (never the reference against itself), with the dtypes that
backend takes (float32, float64, bfloat16, float16). The quick profile (the default, README's test
command) draws 12 examples per op and backend; the deep one
(`pytest tests/test_properties.py --hypothesis-profile=deep`) hundreds (both in tests/conftest.py). A failure found is kept as
an explicit regression case with @example."""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from fastgen import ops
from fastgen.ops import REGISTRY
from fastgen.activations import NAMES
from fastgen.ops.upfirdn2d import setup_filter

from cases import cpu_backends, skip_unavailable
from fastgen.tolerances import judge

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@st.composite
def images(draw, op, backend, channels=None, min_side=1, clips=False):
    """(x, dtype name): an N x C x H x W map (clips=True: or an N x C x T x H x W clip) in a dtype the
    backend takes, contiguous or channels-last, sometimes a strided view."""
    n = draw(st.integers(1, 3))
    c = channels if channels is not None else draw(st.integers(1, 12))
    frames = [draw(st.integers(min_side, 4))] if clips and draw(st.booleans()) else []
    h, w = draw(st.integers(min_side, 9)), draw(st.integers(min_side, 9))
    dtype = draw(st.sampled_from([name for name, t in DTYPES.items() if t in REGISTRY[op].impls[backend].dtypes]))
    layout = draw(st.sampled_from(["nchw", "nhwc", "strided"]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":  # every other column of a wider map: not contiguous in any format
        x = torch.randn(n, c, *frames, h, 2 * w, generator=g, dtype=DTYPES[dtype])[..., ::2]
    else:
        x = torch.randn(n, c, *frames, h, w, generator=g, dtype=DTYPES[dtype])
        cl = torch.channels_last_3d if frames else torch.channels_last
        x = x.to(memory_format=cl) if layout == "nhwc" else x
    return x, dtype


def randn(data, *shape, dtype):
    """Normal values from a generator seeded by hypothesis: a failing example replays exactly (torch's
    global generator is not hypothesis's, and drawing from it made reruns differ: 'Flaky')."""
    seed = data.draw(st.integers(0, 2 ** 31 - 1))
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _check(name, op, ref, backend, tensors, dtype, grad_of):
    """op(*tensors, backend) against ref(*tensors) in float64, output and gradients of a random
    cotangent, judged as everywhere (fastgen.tolerances.judge: the tolerance table, or else within a
    few times the unfused layers' own error in the same dtype: random inputs include ill-conditioned
    ones, e.g. a constant group, where float32 eager itself is off by more than the table)."""
    skip_unavailable(backend, "cpu")
    assert backend in cpu_backends(name, DTYPES[dtype]), "a fast backend, in a dtype it takes"
    cot = torch.randn(ref(*[t.double() for t in tensors]).shape, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(7))

    def run(f, cast):
        leaves = [cast(t).detach().clone().requires_grad_(i in grad_of) for i, t in enumerate(tensors)]
        out = f(*leaves)
        grads = torch.autograd.grad(out, [leaves[i] for i in grad_of], cot.to(out.dtype))
        return [out.detach(), *grads]

    got = run(lambda *ts: op(*ts, backend), lambda t: t)
    eager = run(lambda *ts: op(*ts, "reference"), lambda t: t)
    want = run(ref, lambda t: t.double())
    assert got[0].shape == want[0].shape and got[0].dtype == tensors[0].dtype
    problems = judge(got, eager, want, DTYPES[dtype])
    assert not problems, problems


def backends(op: str):
    """Every fast backend of op on CPU tensors, each with the profile's number of examples (never
    the reference, which would be checked against itself)."""
    return pytest.mark.parametrize("backend", cpu_backends(op))


def _constant_groups(g, n, c, h, w, layout):
    """A map whose every channel is one value (about 10 in size): every group and channel constant."""
    x = (10 * torch.randn(n, c, 1, 1, generator=g) + 3).expand(n, c, h, w) + 0
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("backend", cpu_backends("group_norm_act"))
def test_group_norm_act_with_constant_groups(backend, layout):
    """The regression case hypothesis found: a constant group makes rstd ~ 316 and the problem
    ill-conditioned (eager itself is up to 3e-3 off), and a folded x * a + (b - mean * a) lost 1e-4
    more in fp32. Every backend now computes (x - mean) * a + b with the statistics of x - K, K a
    sample of the group, so a constant group's mean is exact and its output is the bias, exactly."""
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 4, 1, 1), (2, 4, 5, 3), (2, 8, 7, 9)]:
        x = _constant_groups(g, *shape, layout)
        w, b = torch.randn(shape[:2], generator=g), torch.randn(shape[:2], generator=g)
        op = lambda x, w, b, be: ops.group_norm_act(x, shape[1], w, b, activation="identity", backend=be)  # noqa: E731
        _check("group_norm_act", op, lambda x, w, b: ops.group_norm_act_ref(x, shape[1], w, b, activation="identity"),
               backend, [x, w, b], "float32", (0, 1, 2))
        y = op(x, w, b, backend)  # exact (eager folds the mean into the bias: it is not)
        assert torch.equal(y, b[:, :, None, None].expand_as(y))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("backend", cpu_backends("batch_norm_act"))
def test_batch_norm_act_with_constant_channels(backend, layout):
    """The same for BatchNorm's per-channel statistics."""
    g = torch.Generator().manual_seed(1)
    x = _constant_groups(g, 1, 5, 3, 3, layout).expand(4, -1, -1, -1)
    x = x.contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
    w, b = torch.randn(5, generator=g), torch.randn(5, generator=g)
    op = lambda x, w, b, be: ops.batch_norm_act(x, None, None, w, b, True, activation="identity", backend=be)  # noqa: E731
    _check("batch_norm_act", op,
           lambda x, w, b: ops.batch_norm_act_ref(x, None, None, w, b, True, activation="identity"), backend,
           [x, w, b], "float32", (0, 1, 2))
    y = op(x, w, b, backend)
    assert torch.equal(y, b[None, :, None, None].expand_as(y))


@backends("group_norm_act")
@given(data=st.data())
def test_group_norm_act(data, backend):
    groups = data.draw(st.sampled_from([1, 2, 3, 4]))
    x, dtype = data.draw(images("group_norm_act", backend, channels=groups * data.draw(st.integers(1, 3)), clips=True))
    assume(x.shape[0] * x[0, : x.shape[1] // groups].numel() > 1)  # refused, as F.group_norm does
    act = data.draw(st.sampled_from(NAMES))
    shape = (x.shape[0], x.shape[1]) if data.draw(st.booleans()) else (x.shape[1],)  # AdaIN's per-sample affine
    w, b = (randn(data, *shape, dtype=x.dtype) for _ in range(2))
    _check("group_norm_act", lambda x, w, b, be: ops.group_norm_act(x, groups, w, b, activation=act, backend=be),
           lambda x, w, b: ops.group_norm_act_ref(x, groups, w, b, activation=act), backend, [x, w, b], dtype, (0, 1, 2))


@backends("batch_norm_act")
@given(data=st.data())
def test_batch_norm_act(data, backend):
    x, dtype = data.draw(images("batch_norm_act", backend))
    if x.shape[0] * x.shape[2] * x.shape[3] < 2:
        x = torch.cat([x, x.flip(0) + 1])  # training needs 2 values per channel, as torch's
    act = data.draw(st.sampled_from(NAMES))
    w, b = (randn(data, x.shape[1], dtype=x.dtype) for _ in range(2))
    _check("batch_norm_act",
           lambda x, w, b, be: ops.batch_norm_act(x, None, None, w, b, True, activation=act, backend=be),
           lambda x, w, b: ops.batch_norm_act_ref(x, None, None, w, b, True, activation=act), backend, [x, w, b],
           dtype, (0, 1, 2))


@backends("pixel_norm")
@given(data=st.data())
def test_pixel_norm(data, backend):
    x, dtype = data.draw(images("pixel_norm", backend))
    _check("pixel_norm", lambda x, be: ops.pixel_norm(x, backend=be), ops.pixel_norm_ref, backend, [x], dtype, (0,))


@backends("bias_act")
@given(data=st.data())
def test_bias_act(data, backend):
    x, dtype = data.draw(images("bias_act", backend))
    act = data.draw(st.sampled_from(["linear", "relu", "lrelu", "tanh", "sigmoid", "elu", "selu", "softplus",
                                     "swish", "gelu"]))
    clamp = data.draw(st.sampled_from([None, 0.5, 256.0]))
    b = randn(data, x.shape[1], dtype=x.dtype)
    _check("bias_act", lambda x, b, be: ops.bias_act(x, b, act=act, clamp=clamp, backend=be),
           lambda x, b: ops.bias_act_ref(x, b, act=act, clamp=clamp), backend, [x, b], dtype, (0, 1))


@backends("upfirdn2d")
@given(data=st.data())
def test_upfirdn2d(data, backend):
    x, dtype = data.draw(images("upfirdn2d", backend, min_side=2))
    up, down = data.draw(st.sampled_from([1, 2])), data.draw(st.sampled_from([1, 2]))
    pad = data.draw(st.lists(st.integers(0, 2), min_size=4, max_size=4))
    f = setup_filter(data.draw(st.sampled_from([[1, 1], [1, 3, 3, 1], [1, 2, 1]])))
    if (x.shape[2] * up + pad[2] + pad[3] < f.shape[0]) or (x.shape[3] * up + pad[0] + pad[1] < f.shape[1]):
        return  # an image smaller than the filter: rejected by both (the validation tests)
    _check("upfirdn2d", lambda x, be: ops.upfirdn2d(x, f, up, down, pad, gain=up * up, backend=be),
           lambda x: ops.upfirdn2d_ref(x, f, up, down, pad, gain=up * up), backend, [x], dtype, (0,))


@backends("upsample_conv2d")
@given(data=st.data())
def test_upsample_conv2d(data, backend):
    x, dtype = data.draw(images("upsample_conv2d", backend, min_side=1))
    mode, scale = data.draw(st.sampled_from([("nearest", 2), ("nearest", 3), ("bilinear", 2)]))
    k = data.draw(st.sampled_from([1, 3]))
    w = randn(data, data.draw(st.integers(1, 6)), x.shape[1], k, k, dtype=x.dtype)
    b = randn(data, w.shape[0], dtype=x.dtype)
    _check("upsample_conv2d",
           lambda x, w, b, be: ops.upsample_conv2d(x, w, b, scale_factor=scale, mode=mode, padding=k // 2, backend=be),
           lambda x, w, b: ops.upsample_conv2d_ref(x, w, b, scale_factor=scale, mode=mode, padding=k // 2), backend,
           [x, w, b], dtype, (0, 1, 2))


@backends("modulated_conv2d")
@given(data=st.data())
def test_modulated_conv2d(data, backend):
    x, dtype = data.draw(images("modulated_conv2d", backend, min_side=2))
    up = data.draw(st.sampled_from([1, 2]))
    w = randn(data, data.draw(st.integers(1, 6)), x.shape[1], 3, 3, dtype=x.dtype)
    styles = 1 + 0.2 * randn(data, x.shape[0], x.shape[1], dtype=x.dtype)
    f = setup_filter([1, 3, 3, 1])
    _check("modulated_conv2d",
           lambda x, w, s, be: ops.modulated_conv2d(x, w, s, True, up, 1, f, 1, flip_weight=up == 1, backend=be),
           lambda x, w, s: ops.modulated_conv2d_ref(x, w, s, True, up, 1, f, 1, flip_weight=up == 1), backend,
           [x, w, styles], dtype, (0, 1, 2))


@backends("rms_norm_act")
@given(data=st.data())
def test_rms_norm_act(data, backend):
    x, dtype = data.draw(images("rms_norm_act", backend, channels=data.draw(st.sampled_from([1, 3, 8, 40])),
                                clips=True))
    act = data.draw(st.sampled_from(NAMES))
    clamp = data.draw(st.booleans())
    eps = data.draw(st.sampled_from([1e-6, 1e-12 / x.shape[1] ** 0.5, 0.5]))  # 0.5: some rows clamped or floored
    w, b = (randn(data, x.shape[1], dtype=x.dtype) if data.draw(st.booleans()) else None for _ in range(2))
    present = [t for t in (w, b) if t is not None]

    def args(ts):  # x and the affine parameters present, in order -> x, weight or None, bias or None
        rest = iter(ts[1:])
        return ts[0], next(rest) if w is not None else None, next(rest) if b is not None else None

    _check("rms_norm_act", lambda *ts: ops.rms_norm_act(*args(ts[:-1]), eps, act, clamp=clamp, backend=ts[-1]),
           lambda *ts: ops.rms_norm_act_ref(*args(ts), eps, act, clamp=clamp), backend, [x, *present], dtype,
           tuple(range(1 + len(present))))


@backends("instance_norm_act")
@given(data=st.data())
def test_instance_norm_act(data, backend):
    x, dtype = data.draw(images("instance_norm_act", backend))
    assume(x[0, 0].numel() > 1)  # refused, as F.instance_norm does
    act = data.draw(st.sampled_from(NAMES))
    w, b = (randn(data, x.shape[1], dtype=x.dtype) for _ in range(2))
    _check("instance_norm_act", lambda x, w, b, be: ops.instance_norm_act(x, w, b, activation=act, backend=be),
           lambda x, w, b: ops.instance_norm_act_ref(x, w, b, activation=act), backend, [x, w, b], dtype, (0, 1, 2))


@backends("adaptive_instance_norm")
@given(data=st.data())
def test_adaptive_instance_norm(data, backend):
    x, dtype = data.draw(images("adaptive_instance_norm", backend))
    assume(x[0, 0].numel() > 1)
    act = data.draw(st.sampled_from(NAMES))
    scale, bias = (randn(data, *x.shape[:2], dtype=x.dtype) for _ in range(2))
    _check("adaptive_instance_norm",
           lambda x, s, b, be: ops.adaptive_instance_norm(x, s, b, activation=act, backend=be),
           lambda x, s, b: ops.adaptive_instance_norm_ref(x, s, b, activation=act), backend, [x, scale, bias], dtype,
           (0, 1, 2))


@backends("upsample_conv3d")
@given(data=st.data())
def test_upsample_conv3d(data, backend):
    x, dtype = data.draw(images("upsample_conv3d", backend, min_side=2, clips=True))
    if x.dim() == 4:  # a clip of one frame
        x = x.unsqueeze(2)
    scale = tuple(data.draw(st.sampled_from([1, 2])) for _ in range(3))
    k = tuple(data.draw(st.sampled_from([1, 3])) for _ in range(3))
    causal = data.draw(st.booleans())  # diffusers' causal padding: all of the time padding in front
    pads = (k[2] // 2, k[2] // 2, k[1] // 2, k[1] // 2, *((k[0] - 1, 0) if causal else (k[0] // 2, k[0] // 2)))
    w = randn(data, data.draw(st.integers(1, 6)), x.shape[1], *k, dtype=x.dtype) / (x.shape[1] * k[0] * k[1] * k[2]) ** 0.5
    b = randn(data, w.shape[0], dtype=x.dtype)
    _check("upsample_conv3d",
           lambda x, w, b, be: ops.upsample_conv3d(x, w, b, scale_factor=scale, padding=pads, backend=be),
           lambda x, w, b: ops.upsample_conv3d_ref(x, w, b, scale_factor=scale, padding=pads), backend,
           [x, w, b], dtype, (0, 1, 2))
