import pytest
import torch

from fastgen.ops import upfirdn2d, upfirdn2d_ref
from cases import fast_backends, skip_unavailable
from fastgen.tolerances import judge
from tolerances import assert_close, assert_close_grad

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = [torch.contiguous_format, torch.channels_last]
FAST = fast_backends("upfirdn2d")
# (up, down, padding): StyleGAN2's upsample (up 2, pad [2, 1, 2, 1]) and downsample (down 2, pad 1), the
# FIR after a transposed conv (pad only), per-axis factors, negative padding (crops), 3x and 4x
RESAMPLINGS = [(1, 1, 0), (2, 1, [2, 1, 2, 1]), (1, 2, [1, 1]), (1, 1, [2, 1, 2, 1]), (2, 2, [1, 2, 0, 3]),
               ([2, 1], [1, 3], [-1, 2, 3, -2]), (3, 1, 1), (4, 2, [5, -1, 2, 4])]
RESAMPLING_IDS = ["fir", "up2", "down2", "pad", "up2down2", "per-axis-crop", "up3", "up4down2"]


def binomial(separable: bool) -> torch.Tensor:
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    f = f if separable else f[:, None] * f[None, :]
    return f / f.sum()


FILTERS = {"binomial2d": lambda: binomial(False), "binomial1d": lambda: binomial(True),
           "random3x5": lambda: torch.randn(3, 5), "random1d7": lambda: torch.randn(7), "none": lambda: None}


def make(shape, dtype, device, fmt, grad=False):
    return torch.randn(shape, device=device).to(dtype).to(memory_format=fmt).requires_grad_(grad)


def to64(f):
    return None if f is None else f.double()


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("filt", FILTERS)
@pytest.mark.parametrize("resampling", RESAMPLINGS, ids=RESAMPLING_IDS)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.sweep
def test_forward_resamplings_and_filters(backend, device, filt, resampling, fmt):
    skip_unavailable(backend, device)
    up, down, pad = resampling
    x = make((2, 3, 9, 7), torch.float32, device, fmt)
    f = FILTERS[filt]()
    f = None if f is None else f.to(device)
    for flip in (False, True):
        out = upfirdn2d(x, f, up, down, pad, flip, 2.0, backend=backend)
        expected = upfirdn2d_ref(x.double(), to64(f), up, down, pad, flip, 2.0)
        assert out.shape == expected.shape
        if x.shape[1] > 1 and fmt == torch.channels_last:
            assert out.is_contiguous(memory_format=fmt)
        assert_close(out, expected, torch.float32, scale=4.0)  # random filters sum |taps| ~ 4


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 5, 16, 16), (1, 1, 1, 1), (3, 2, 5, 11)], ids=lambda s: "x".join(map(str, s)))
def test_forward_dtypes(backend, device, dtype, fmt, shape):
    skip_unavailable(backend, device)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes float32/16 and bfloat16")
    x = make(shape, dtype, device, fmt)
    f = binomial(False).to(device)
    for up, down, pad in ((2, 1, [2, 1]), (1, 2, [2, 2])):
        out = upfirdn2d(x, f, up, down, pad, gain=up * up, backend=backend)
        assert out.dtype == dtype
        assert_close(out, upfirdn2d_ref(x.double(), f.double(), up, down, pad, gain=up * up), dtype, scale=4.0)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("resampling", RESAMPLINGS, ids=RESAMPLING_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward(backend, device, resampling, dtype):
    skip_unavailable(backend, device)
    up, down, pad = resampling
    x = make((2, 3, 8, 7), dtype, device, torch.channels_last, grad=True)
    f = torch.randn(3, 4, device=device)
    out = upfirdn2d(x, f, up, down, pad, gain=1.5, backend=backend)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad)
    x64 = x.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(upfirdn2d_ref(x64, f.double(), up, down, pad, gain=1.5), x64, grad.double())
    assert got.shape == x.shape and got.dtype == dtype
    assert_close_grad(got, want, dtype)


@pytest.mark.parametrize("resampling", RESAMPLINGS, ids=RESAMPLING_IDS)
@pytest.mark.parametrize("separable", [False, True], ids=["2d", "1d"])
def test_gradients_of_first_second_and_third_order(resampling, separable):
    up, down, pad = resampling
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    f = torch.randn(4 if separable else (3, 2), dtype=torch.float64)
    fn = lambda x: upfirdn2d(x, f, up, down, pad, flip_filter=True, gain=2.0, backend="composite")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,)) and torch.autograd.gradgradcheck(fn, (x,))
    # third order, against the reference's: cubes make each gradient depend on x, so every level
    # differentiates the previous level's backward (upfirdn2d's adjoint, then its adjoint, ...)
    def third(op):
        (g1,) = torch.autograd.grad((op(x) ** 3).sum(), x, create_graph=True)
        (g2,) = torch.autograd.grad((op(g1) ** 3).sum(), x, create_graph=True)
        (g3,) = torch.autograd.grad((op(g2) ** 3).sum(), x)
        return g3
    want = third(lambda x: upfirdn2d_ref(x, f, up, down, pad, True, 2.0))
    torch.testing.assert_close(third(fn), want)


@pytest.mark.parametrize("backend,device", FAST)
def test_opcheck(backend, device):
    skip_unavailable(backend, device)
    x = make((2, 3, 6, 5), torch.float32, device, torch.channels_last, grad=True)
    f = binomial(False).to(device)
    torch.library.opcheck(torch.ops.fastgen.upfirdn2d.default, (x, f, [2, 2], [1, 1], [2, 1, 2, 1], False, 4.0, backend))


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, f = torch.randn(2, 3, 8, 8), binomial(False)
    fn = torch.compile(lambda x: upfirdn2d(x, f, up=2, padding=[2, 1], gain=4), fullgraph=True)
    got = fn(x)
    torch.testing.assert_close(got, upfirdn2d(x, f, up=2, padding=[2, 1], gain=4))
    oracle = upfirdn2d_ref(x.double(), f.double(), up=2, padding=[2, 1], gain=4)
    assert not judge([got], [upfirdn2d_ref(x, f, up=2, padding=[2, 1], gain=4)], [oracle], x.dtype)


def test_empty_batch():
    out = upfirdn2d(torch.randn(0, 3, 4, 4), binomial(False), up=2, padding=[2, 1, 2, 1])
    assert out.shape == (0, 3, 8, 8)


def test_bad_arguments():
    x, f = torch.randn(2, 3, 8, 8), binomial(False)
    with pytest.raises(ValueError, match="up must be an int >= 1"):
        upfirdn2d(x, f, up=0)
    with pytest.raises(ValueError, match="down must be"):
        upfirdn2d(x, f, down=[1, 2, 3])
    with pytest.raises(ValueError, match="padding must be"):
        upfirdn2d(x, f, padding=[1, 2, 3])
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        upfirdn2d(torch.randn(3, 8, 8), f)
    with pytest.raises(RuntimeError, match="f must be a non-empty"):
        upfirdn2d(x, torch.randn(2, 2, 2))
    with pytest.raises(RuntimeError, match="smaller than the filter"):
        upfirdn2d(x, f, padding=-3)
    with pytest.raises(ValueError, match="no gradient for the filter"):
        upfirdn2d(x, f.clone().requires_grad_(True))
