import pytest
import torch

from fastgen.nn import Downsample2dFIR, EqualizedLinear, ModulatedConv2d, Upsample2dFIR
from fastgen.ops.upfirdn2d import setup_filter
from fastgen.ops import modulated_conv2d, modulated_conv2d_ref, upfirdn2d_ref
from cases import check_compiled_layer, cpu_backends, fast_backends, skip_unavailable
from tolerances import assert_close, assert_close_grad

FAST = fast_backends("modulated_conv2d")
# (kernel, up, down): StyleGAN2's 3x3 up and down layers, the 1x1 fast paths, plain
RESAMPLINGS = [(3, 1, 1), (3, 2, 1), (3, 1, 2), (1, 2, 1), (1, 1, 2), (3, 2, 2)]
RESAMPLING_IDS = ["k3", "k3-up2", "k3-down2", "k1-up2", "k1-down2", "k3-up2-down2"]


def make(n, i, o, k, hw, dtype, device="cpu", fmt=torch.contiguous_format, grad=False):
    x = torch.randn(n, i, *hw, device=device).to(dtype).to(memory_format=fmt)
    weight = torch.randn(o, i, k, k, device=device).to(dtype)
    styles = (1 + 0.5 * torch.randn(n, i, device=device)).to(dtype)
    return [t.requires_grad_(grad) for t in (x, weight, styles)]


def oracle(x, weight, styles, *args, **kw):
    x64, w64, s64 = (t.detach().double().requires_grad_(t.requires_grad) for t in (x, weight, styles))
    return (x64, w64, s64), modulated_conv2d_ref(x64, w64, s64, *args, **kw)


def scale_of(demodulate, weight, x):
    # without demodulation, outputs grow like sqrt(fan_in) (tests do not rescale the weight)
    return 1.0 if demodulate else (weight[0].numel()) ** 0.5


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("resampling", RESAMPLINGS, ids=RESAMPLING_IDS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_forward(backend, device, resampling, fused, fmt):
    skip_unavailable(backend, device)
    k, up, down = resampling
    f = setup_filter((1, 3, 3, 1)).to(device)
    x, weight, styles = make(2, 5, 6, k, (8, 7), torch.float32, device, fmt)
    for demodulate, flip in ((True, True), (False, False)):
        out = modulated_conv2d(x, weight, styles, demodulate, up, down, f, k // 2, fused, flip, backend=backend)
        _, expected = oracle(x, weight, styles, demodulate, up, down, f.double(), k // 2, flip)
        assert out.shape == expected.shape == (2, 6, 8 * up // down, 7 * up // down)
        if fmt == torch.channels_last:
            assert out.is_contiguous(memory_format=fmt)
        assert_close(out, expected, torch.float32, scale=scale_of(demodulate, weight, x))


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_forward_dtypes(backend, device, dtype, fused):
    skip_unavailable(backend, device)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes float32/16 and bfloat16")
    f = setup_filter((1, 3, 3, 1)).to(device)
    x, weight, styles = make(2, 8, 4, 3, (6, 6), dtype, device)
    out = modulated_conv2d(x, weight, styles, True, 2, 1, f, 1, fused, backend=backend)
    _, expected = oracle(x, weight, styles, True, 2, 1, f.double(), 1)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, scale=2.0)  # sums over 72 taps x 4 phases


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("resampling", RESAMPLINGS, ids=RESAMPLING_IDS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_backward(backend, device, resampling, fused):
    skip_unavailable(backend, device)
    k, up, down = resampling
    f = setup_filter((1, 3, 3, 1)).to(device)
    x, weight, styles = make(2, 4, 3, k, (6, 5), torch.float32, device, torch.channels_last, grad=True)
    out = modulated_conv2d(x, weight, styles, True, up, down, f, k // 2, fused, backend=backend)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, weight, styles), grad)
    inputs64, expected = oracle(x, weight, styles, True, up, down, f.double(), k // 2)
    want = torch.autograd.grad(expected, inputs64, grad.double())
    for g, e in zip(got, want, strict=True):
        assert_close_grad(g, e, torch.float32)


@pytest.mark.parametrize("resampling", [(3, 2, 1), (3, 1, 2)], ids=["up2", "down2"])
@pytest.mark.parametrize("backend", cpu_backends("modulated_conv2d", torch.float64))
def test_gradcheck_gradgradcheck(resampling, backend):
    k, up, down = resampling
    f = setup_filter((1, 3, 3, 1)).double()
    x, weight, styles = make(2, 3, 2, k, (4, 4), torch.float64, grad=True)
    fn = lambda x, w, s: modulated_conv2d(x, w, s, True, up, down, f, 1, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, styles))
    assert torch.autograd.gradgradcheck(fn, (x, weight, styles))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_fp16_guard_keeps_large_weights_finite(fused):
    # StyleGAN2 rescales weight and styles to max |.| = 1 before the squared sums when x is fp16
    # and demodulating (demodulation cancels the scale): weights near 300 give sums near 1e7,
    # past fp16's 65504, so without the guard every output would be 0
    f = setup_filter((1, 3, 3, 1))
    x, weight, styles = (t.half() for t in make(2, 16, 4, 3, (6, 6), torch.float32))
    weight = weight * 300
    w = weight.unsqueeze(0) * styles.reshape(2, 1, -1, 1, 1)
    assert torch.isinf(w.square().sum(dim=[2, 3, 4])).any()  # what the guard prevents
    out = modulated_conv2d(x, weight, styles, True, 1, 1, f, 1, fused)
    _, expected = oracle(x, weight, styles, True, 1, 1, f.double(), 1)
    assert_close(out, expected, torch.float16, scale=2.0)


def test_layers_match_stylegan2_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8)
    f = setup_filter((1, 3, 3, 1))
    assert torch.allclose(f, torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64)
    up, down = Upsample2dFIR(), Downsample2dFIR()
    torch.testing.assert_close(up(x), upfirdn2d_ref(x, f, up=2, padding=[2, 1, 2, 1], gain=4))
    torch.testing.assert_close(down(x), upfirdn2d_ref(x, f, down=2, padding=[1, 1, 1, 1]))
    assert up(x).shape == (2, 8, 16, 16) and down(x).shape == (2, 8, 4, 4)
    # a constant image stays constant away from the borders (gain factor^2 keeps the mean)
    torch.testing.assert_close(up(torch.ones(1, 1, 8, 8))[..., 2:-2, 2:-2], torch.ones(1, 1, 12, 12))

    layer = ModulatedConv2d(8, 4, 3, style_dim=16, up=2)
    assert sorted(layer.state_dict()) == ["affine.bias", "affine.weight", "resample_filter", "weight"]
    wlat = torch.randn(2, 16)
    styles = wlat @ (layer.affine.weight / 4).t() + layer.affine.bias  # 1 / sqrt(style_dim) = 1/4
    want = modulated_conv2d_ref(x, layer.weight, styles, True, 2, 1, f, 1, flip_weight=False)
    torch.testing.assert_close(layer(x, wlat), want.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer(x, wlat, fused_modconv=False), want.float(), atol=1e-4, rtol=1e-4)


def test_equalized_linear():
    layer = EqualizedLinear(16, 5, activation="lrelu", lr_multiplier=0.01, bias_init=0.5)
    x = torch.randn(3, 16)
    y = torch.nn.functional.leaky_relu(x @ (layer.weight * 0.01 / 4).t() + layer.bias * 0.01, 0.2) * 2 ** 0.5
    torch.testing.assert_close(layer(x), y)


def test_compile_fullgraph():
    layer = ModulatedConv2d(4, 4, 3, style_dim=8, up=2)
    check_compiled_layer(layer, torch.randn(2, 4, 6, 6), "auto", torch.randn(2, 8))


def test_bad_arguments():
    f = setup_filter((1, 3, 3, 1))
    x, weight, styles = make(2, 4, 3, 3, (6, 6), torch.float32)
    with pytest.raises(RuntimeError, match=r"styles must be \(2, 4\)"):
        modulated_conv2d(x, weight, styles[:, :3], up=2, resample_filter=f)
    with pytest.raises(RuntimeError, match="weight must be"):
        modulated_conv2d(x, weight[:, :3], styles)
    with pytest.raises(ValueError, match="resample_filter is required"):
        modulated_conv2d(x, weight, styles, up=2)
    with pytest.raises(ValueError, match="up must be an int >= 1"):
        modulated_conv2d(x, weight, styles, up=0, resample_filter=f)
    with pytest.raises(RuntimeError, match="must have x's dtype"):
        modulated_conv2d(x, weight.double(), styles)
    with pytest.raises(ValueError, match="resample_filter must be 1-D or 2-D"):
        setup_filter(torch.ones(2, 2, 2))


def test_up2_never_materializes_the_zero_inserted_image():
    # every tensor the fast path creates, recorded at the dispatcher: none has the input channels at
    # twice the resolution (the reference's zero-inserted image does)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.seen.append(tuple(t.shape))
            return out

    f = setup_filter((1, 3, 3, 1))
    x, weight, styles = make(2, 6, 4, 3, (8, 8), torch.float32)

    def zero_inserted(shapes):  # (1, N*I, >=16, >=16) grouped or (N, I, >=16, >=16)
        return [s for s in shapes if len(s) == 4 and s[1] in (6, 12) and s[2] >= 16]

    for backend, fused in (("composite", True), ("cpu", True), ("cpu", False)):
        with Shapes() as mode:
            modulated_conv2d(x, weight, styles, True, 2, 1, f, 1, fused, backend=backend)
        assert not zero_inserted(mode.seen), (backend, fused, zero_inserted(mode.seen))
    with Shapes() as mode:  # the check does see the reference's
        modulated_conv2d(x, weight, styles, True, 2, 1, f, 1, backend="reference")
    assert zero_inserted(mode.seen)
