import pytest
import torch

from fastgen.nn import PixelNorm
from fastgen.ops import pixel_norm, pixel_norm_ref
from cases import check_compiled_layer, fast_backends, skip_unavailable
from tolerances import assert_close, assert_close_grad

FAST = fast_backends("pixel_norm")
SHAPES = [(2, 5, 7, 9), (1, 1, 1, 3), (3, 40, 4, 1), (2, 512, 4, 4)]


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward(backend, device, dtype, fmt, shape):
    skip_unavailable(backend, device)
    x = torch.randn(shape, device=device).to(dtype).to(memory_format=fmt)
    out = pixel_norm(x, backend=backend)
    if not x.is_contiguous() or fmt == torch.contiguous_format:
        assert out.is_contiguous(memory_format=fmt)
    assert_close(out, pixel_norm_ref(x.double()), dtype)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last_3d], ids=["ncthw", "nthwc"])
def test_video(backend, device, fmt):
    skip_unavailable(backend, device)
    x = torch.randn(2, 6, 3, 5, 4, device=device).to(memory_format=fmt).requires_grad_(True)
    out = pixel_norm(x, backend=backend)
    assert out.is_contiguous(memory_format=fmt)
    x64 = x.detach().double().requires_grad_(True)
    want = pixel_norm_ref(x64)
    assert_close(out, want, torch.float32)
    grad = torch.randn_like(out)
    assert_close_grad(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(want, x64, grad.double())[0],
                      torch.float32)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward(backend, device, dtype):
    skip_unavailable(backend, device)
    x = torch.randn(2, 6, 5, 3, device=device).to(dtype).requires_grad_(True)
    grad = torch.randn(2, 6, 5, 3, device=device).to(dtype)
    (got,) = torch.autograd.grad(pixel_norm(x, backend=backend), x, grad)
    x64 = x.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(pixel_norm_ref(x64), x64, grad.double())
    assert_close_grad(got, want, dtype)


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    f = lambda x: pixel_norm(x, backend="composite")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,)) and torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("backend,device", FAST)
def test_opcheck(backend, device):
    skip_unavailable(backend, device)
    x = torch.randn(2, 6, 5, 3, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastgen.pixel_norm.default, (x, 1e-8, backend))


def test_compile_fullgraph_and_layer():
    check_compiled_layer(PixelNorm(), torch.randn(2, 8, 4, 4), "composite")


def test_bad_arguments():
    with pytest.raises(ValueError, match="eps"):
        pixel_norm(torch.randn(2, 3, 4, 4), eps=-1.0)
    with pytest.raises(RuntimeError, match=r"x must be \(N, C, \*\)"):
        pixel_norm(torch.randn(3))
    with pytest.raises(NotImplementedError, match="has no 'cpu' backend"):
        pixel_norm(torch.randn(2, 3, 4, 4), backend="cpu")
