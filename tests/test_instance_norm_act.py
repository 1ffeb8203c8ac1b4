import pytest
import torch
from torch import nn

from fastgen.nn import AdaIN, InstanceNormAct2d
from fastgen.ops import adaptive_instance_norm, adaptive_instance_norm_ref, instance_norm_act, instance_norm_act_ref
from cases import f64, fast_backends, skip_unavailable
from tolerances import assert_close, assert_close_grad

FAST = fast_backends("instance_norm_act")



@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_act(backend, device, dtype, fmt, affine):
    skip_unavailable(backend, device)
    x = torch.randn(3, 5, 7, 6, device=device).to(dtype).to(memory_format=fmt)
    w, b = (torch.randn(5, device=device).to(dtype), torch.randn(5, device=device).to(dtype)) if affine else (None, None)
    out = instance_norm_act(x, w, b, activation="leaky_relu", negative_slope=0.2, backend=backend)
    assert_close(out, instance_norm_act_ref(*f64(x, w, b), activation="leaky_relu", negative_slope=0.2), dtype)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_adaptive_instance_norm(backend, device, dtype, fmt):
    skip_unavailable(backend, device)
    x = torch.randn(3, 5, 7, 6, device=device).to(dtype).to(memory_format=fmt).requires_grad_(True)
    scale = (1 + torch.randn(3, 5, device=device)).to(dtype).requires_grad_(True)
    bias = torch.randn(3, 5, device=device).to(dtype).requires_grad_(True)
    out = adaptive_instance_norm(x, scale, bias, activation="silu", backend=backend)
    x64, s64, b64 = f64(x, scale, bias)
    expected = adaptive_instance_norm_ref(x64, s64, b64, activation="silu")
    assert_close(out, expected, dtype)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, scale, bias), grad)
    want = torch.autograd.grad(expected, (x64, s64, b64), grad.double())
    for g, e in zip(got, want, strict=True):
        assert_close_grad(g, e, dtype)


def test_adain_gradgradcheck():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    f = lambda x, s, b: adaptive_instance_norm(x, s, b, activation="gelu", backend="composite")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, s, b)) and torch.autograd.gradgradcheck(f, (x, s, b))


def test_instance_norm_layer_is_an_instance_norm():
    layer = InstanceNormAct2d(4, affine=True, activation="relu")
    norm = nn.InstanceNorm2d(4, affine=True)
    nn.init.normal_(norm.weight)
    assert layer.state_dict().keys() == norm.state_dict().keys()
    layer.load_state_dict(norm.state_dict())
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(layer(x), torch.relu(norm(x)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x[0]), torch.relu(norm(x[0])), atol=1e-5, rtol=1e-5)  # unbatched
    with pytest.raises(NotImplementedError, match="track_running_stats"):
        InstanceNormAct2d(4, track_running_stats=True)


def test_adain_layer_styles_the_normalized_map():
    layer = AdaIN(6, style_dim=8)
    x, w = torch.randn(2, 6, 5, 5), torch.randn(2, 8)
    scale, bias = layer.style(w).chunk(2, dim=1)
    torch.testing.assert_close(layer(x, w), adaptive_instance_norm_ref(x, scale, bias), atol=1e-5, rtol=1e-5)
    layer(x, w).square().sum().backward()
    assert layer.style.weight.grad is not None and layer.style.weight.grad.abs().sum() > 0
    with torch.no_grad():
        layer.style.weight.zero_()  # the initial bias: scale 1, bias 0, plain instance norm
    torch.testing.assert_close(layer(x, w), nn.functional.instance_norm(x), atol=1e-5, rtol=1e-5)


def test_adain_rejects_styles_of_the_wrong_shape():
    with pytest.raises(RuntimeError, match="style_scale must be 2-D"):
        adaptive_instance_norm(torch.randn(2, 3, 4, 4), torch.randn(3), torch.randn(2, 3))
    with pytest.raises(RuntimeError, match=r"style_scale must be \(N, C\) = \(2, 3\), got \(2, 4\)"):
        adaptive_instance_norm(torch.randn(2, 3, 4, 4), torch.randn(2, 4), torch.randn(2, 3))
