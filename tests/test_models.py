"""The reference generators built fused and unfused with the same weights: outputs and the gradients
of a loss agree (the flash rule against float64), on every backend every op has (Triton through the
interpreter at small sizes), fp32 and bf16, both memory formats; state dicts load both ways."""

import copy
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import fastgen
from fastgen.models import (Autoencoder, DCGANDiscriminator, DCGANGenerator, StyleGAN2Discriminator,
                            StyleGAN2Generator)
from fastgen.ops import bias_act_ref, modulated_conv2d_ref, upfirdn2d_ref
from tolerances import assert_within_eager_error

# name -> (builder(fused), input maker, the loss's output of the model)
MODELS = {
    "dcgan-g-transpose": (lambda fused: DCGANGenerator(16, 16, 3, 8, "transpose", fused=fused),
                          lambda: (torch.randn(4, 16),)),
    "dcgan-g-upsample-conv": (lambda fused: DCGANGenerator(16, 16, 3, 8, "upsample_conv", fused=fused),
                              lambda: (torch.randn(4, 16),)),
    "dcgan-d": (lambda fused: DCGANDiscriminator(16, 3, 8, fused=fused), lambda: (torch.randn(4, 3, 16, 16),)),
    "autoencoder": (lambda fused: Autoencoder(3, 4, (8, 16), 4, fused=fused), lambda: (torch.randn(2, 3, 16, 16),)),
    "stylegan2": (lambda fused: StyleGAN2Generator(32, 0, 32, 16, 3, channel_base=256, channel_max=32, fused=fused),
                  lambda: (torch.randn(2, 32), None)),
    "stylegan2-d": (lambda fused: StyleGAN2Discriminator(0, 16, 3, channel_base=128, channel_max=16, fused=fused),
                    lambda: (torch.randn(4, 3, 16, 16), None)),
}
KWARGS = {"stylegan2": {"noise_mode": "const"}}
# every op of every model has these backends (cpu: not pixel_norm nor upsample_conv2d, so auto covers it)
BACKENDS = ["auto", "composite", "triton"]


def pair(name):
    """(fused, unfused) with the same weights, in training mode (batch statistics)."""
    build, _ = MODELS[name]
    torch.manual_seed(0)
    unfused = build(False).train()
    fused = build(True).train()
    fused.load_state_dict(unfused.state_dict(), strict=True)
    return fused, unfused


def run(model, inputs, name, dtype=torch.float32, fmt=torch.contiguous_format):
    model = copy.deepcopy(model).to(dtype)
    inputs = [t if t is None else t.to(dtype) for t in inputs]
    inputs = [t.to(memory_format=fmt) if t is not None and t.dim() == 4 else t for t in inputs]
    if fmt == torch.channels_last:
        model = model.to(memory_format=fmt)
    out = model(*inputs, **KWARGS.get(name, {}))
    grads = torch.autograd.grad(out.float().square().mean(), list(model.parameters()))
    return [out.detach()] + [g.float() for g in grads]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_fused_matches_unfused_on_every_backend(name, backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1")
    fused, unfused = pair(name)
    inputs = MODELS[name][1]()
    want = run(unfused, inputs, name, torch.float64)
    eager = run(unfused, inputs, name)
    with fastgen.use_backend(backend):
        got = run(fused, inputs, name)
    assert_within_eager_error(got, eager, want)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_dtypes_and_memory_formats(name, dtype, fmt):
    fused, unfused = pair(name)
    inputs = MODELS[name][1]()
    want = run(unfused, inputs, name, torch.float64)
    assert_within_eager_error(run(fused, inputs, name, dtype, fmt), run(unfused, inputs, name, dtype, fmt), want,
                              factor=3.0 if dtype == torch.float32 else 2.0)


@pytest.mark.parametrize("name", MODELS)
def test_state_dicts_load_both_ways(name):
    fused, unfused = pair(name)
    assert list(fused.state_dict()) == list(unfused.state_dict())
    unfused.load_state_dict(fused.state_dict(), strict=True)
    back = fastgen.unconvert(fused)
    back.load_state_dict(unfused.state_dict(), strict=True)


def test_bad_configs():
    with pytest.raises(ValueError, match="img_resolution must be a power of two"):
        DCGANGenerator(img_resolution=48)
    with pytest.raises(ValueError, match="upsample must be"):
        DCGANGenerator(upsample="bilinear")
    with pytest.raises(ValueError, match="img_resolution must be a power of 2"):
        StyleGAN2Generator(8, 0, 8, 24, 3)
    with pytest.raises(NotImplementedError, match="skip architecture"):
        StyleGAN2Generator(8, 0, 8, 16, 3, architecture="resnet")


# ---------------------------------------------------------------------------------------------
# StyleGAN2: the official interface

def official_keys(resolution: int, z_dim: int, c_dim: int, num_layers: int = 8) -> set[str]:
    """The state dict keys of networks_stylegan2.Generator (mapping, then blocks b4 .. b<res>)."""
    keys = {"mapping.w_avg", *(f"mapping.fc{i}.{p}" for i in range(num_layers) for p in ("weight", "bias"))}
    if c_dim:
        keys |= {"mapping.embed.weight", "mapping.embed.bias"}
    layer = ("weight", "bias", "noise_strength", "noise_const", "resample_filter", "affine.weight", "affine.bias")
    res = 4
    while res <= resolution:
        block = f"synthesis.b{res}"
        keys |= {f"{block}.resample_filter", *(f"{block}.torgb.{p}" for p in ("weight", "bias", "affine.weight",
                                                                              "affine.bias"))}
        keys |= {f"{block}.conv1.{p}" for p in layer}
        keys |= {f"{block}.const"} if res == 4 else {f"{block}.conv0.{p}" for p in layer}
        res *= 2
    return keys


def test_stylegan2_state_dict_is_the_official_generators():
    g = StyleGAN2Generator(16, 5, 16, 32, 3, channel_base=512, channel_max=32)
    assert set(g.state_dict()) == official_keys(32, 16, 5)
    assert g.num_ws == 2 * 4 - 1 + 1  # conv1 at 4x4, conv0 + conv1 above, the last toRGB
    sd = g.state_dict()
    assert sd["synthesis.b4.const"].shape == (32, 4, 4) and sd["synthesis.b32.conv0.weight"].shape == (16, 32, 3, 3)
    assert sd["mapping.embed.weight"].shape == (16, 5) and sd["mapping.fc0.weight"].shape == (16, 32)
    assert sd["synthesis.b8.conv0.noise_const"].shape == (8, 8) and sd["synthesis.b8.conv0.noise_strength"].dim() == 0


def stylegan2_from_the_paper(sd: dict, z: torch.Tensor, resolutions: list[int], psi: float = 1.0) -> torch.Tensor:
    """The generator written out from the state dict alone, op by op with the fastgen references
    (independent of the model's modules): mapping with equalized lr 0.01, w broadcast and truncated,
    then per block modulated convolutions, constant noise, bias + lrelu * sqrt 2 clamped to 256, and
    the skip toRGB images summed through 2x FIR upsampling."""
    def fc(x, prefix, lr=1.0, act="linear"):
        w, b = sd[prefix + ".weight"], sd[prefix + ".bias"]
        return bias_act_ref(x @ (w * lr / math.sqrt(w.shape[1])).t(), b * lr, act=act)

    x = z * torch.rsqrt(z.square().mean(1, keepdim=True) + 1e-8)
    for i in range(8):
        x = fc(x, f"mapping.fc{i}", 0.01, "lrelu")
    x = sd["mapping.w_avg"].lerp(x, psi)
    ws = iter([x] * 100)
    img = h = None
    for res in resolutions:
        block = f"synthesis.b{res}"
        f = sd[f"{block}.resample_filter"]
        layers = ["conv1"] if res == 4 else ["conv0", "conv1"]
        if res == 4:
            h = sd[f"{block}.const"].unsqueeze(0).repeat(z.shape[0], 1, 1, 1)
        for name in layers:
            p = f"{block}.{name}"
            up = 2 if name == "conv0" else 1
            h = modulated_conv2d_ref(h, sd[p + ".weight"], fc(next(ws), p + ".affine"), True, up, 1, f, 1,
                                     flip_weight=up == 1)
            h = h + sd[p + ".noise_const"] * sd[p + ".noise_strength"]
            h = bias_act_ref(h, sd[p + ".bias"], act="lrelu", clamp=256)
        styles = fc(x, f"{block}.torgb.affine") / math.sqrt(h.shape[1])
        y = bias_act_ref(modulated_conv2d_ref(h, sd[f"{block}.torgb.weight"], styles, False), sd[f"{block}.torgb.bias"],
                         clamp=256)
        img = y if img is None else upfirdn2d_ref(img, f, up=2, padding=[2, 1, 2, 1], gain=4) + y
    return img


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_stylegan2_draws_the_image_the_paper_describes(fused):
    torch.manual_seed(0)
    g = StyleGAN2Generator(16, 0, 16, 32, 3, channel_base=512, channel_max=32, fused=fused).double()
    with torch.no_grad():  # a trained-looking state: noise on, w_avg away from 0
        for name, t in g.named_parameters():
            if name.endswith("noise_strength"):
                t.fill_(0.3)
        g.mapping.w_avg.normal_()
    z = torch.randn(3, 16, dtype=torch.float64)
    for psi in (1.0, 0.7):
        got = g(z, None, truncation_psi=psi, noise_mode="const")
        want = stylegan2_from_the_paper(g.state_dict(), z, [4, 8, 16, 32], psi)
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-7)
    none = g(z, None, noise_mode="none")
    assert not torch.allclose(none, g(z, None, noise_mode="const"))
    cut = g(z, None, truncation_psi=0.5, truncation_cutoff=2, noise_mode="const")
    assert cut.shape == (3, 3, 32, 32) and not torch.allclose(cut, g(z, None, truncation_psi=0.5, noise_mode="const"))


def test_stylegan2_fused_modconv_inference_only(monkeypatch):
    """The official training configs' fused_modconv_default="inference_only" (the training recipe's):
    in training the per-sample scales around one shared-weight convolution, in eval the grouped
    convolution; the same images as the default generator either way, images and gradients."""
    mc = sys.modules["fastgen.ops.modulated_conv2d"]  # the module (fastgen.ops.modulated_conv2d is the function)
    groups = []
    conv = mc.conv2d_resample
    monkeypatch.setattr(mc, "conv2d_resample", lambda *a: groups.append(a[6]) or conv(*a))
    torch.manual_seed(0)
    g = StyleGAN2Generator(16, 0, 16, 16, 3, channel_base=256, channel_max=32).double()
    h = StyleGAN2Generator(16, 0, 16, 16, 3, channel_base=256, channel_max=32, fused_modconv_default="inference_only")
    h.double().load_state_dict(g.state_dict())
    z = torch.randn(3, 16, dtype=torch.float64)
    for mode, want_groups in ((True, {1}), (False, {3})):
        g.train(mode), h.train(mode)
        want = g(z, None, noise_mode="const")
        groups.clear()
        got = h(z, None, noise_mode="const")
        assert set(groups) == want_groups, f"train={mode}: convolution groups {set(groups)}"
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    (grad_g,) = torch.autograd.grad(g(z, None, noise_mode="const").square().sum(), g.synthesis.b8.conv0.weight)
    (grad_h,) = torch.autograd.grad(h.train()(z, None, noise_mode="const").square().sum(), h.synthesis.b8.conv0.weight)
    torch.testing.assert_close(grad_h, grad_g, atol=1e-10, rtol=1e-9)


def test_stylegan2_class_conditioning_and_w_avg_update():
    g = StyleGAN2Generator(8, 4, 8, 8, 3, channel_base=64, channel_max=16).train()
    c = F.one_hot(torch.tensor([0, 3]), 4).float()
    before = g.mapping.w_avg.clone()
    img = g(torch.randn(2, 8), c, update_emas=True)
    assert img.shape == (2, 3, 8, 8) and not torch.equal(before, g.mapping.w_avg)


def official_discriminator_keys(resolution: int) -> set[str]:
    """networks_stylegan2.Discriminator's keys (residual architecture, no class label)."""
    conv = ("weight", "bias", "resample_filter")
    keys = {f"b4.conv.{p}" for p in conv} | {"b4.fc.weight", "b4.fc.bias", "b4.out.weight", "b4.out.bias"}
    res = resolution
    while res > 4:
        block = f"b{res}"
        keys |= {f"{block}.resample_filter", f"{block}.skip.weight", f"{block}.skip.resample_filter"}
        keys |= {f"{block}.{layer}.{p}" for layer in ("conv0", "conv1") for p in conv}
        if res == resolution:
            keys |= {f"{block}.fromrgb.{p}" for p in conv}
        res //= 2
    return keys


def test_stylegan2_discriminator_state_dict_is_the_official_ones():
    d = StyleGAN2Discriminator(0, 32, 3, channel_base=512, channel_max=32)
    assert set(d.state_dict()) == official_discriminator_keys(32)
    dc = StyleGAN2Discriminator(5, 16, 3, channel_base=256, channel_max=32)
    assert {"mapping.embed.weight", "mapping.fc0.weight"} <= set(dc.state_dict())
    assert "mapping.w_avg" not in dc.state_dict()
    assert dc(torch.randn(2, 3, 16, 16), F.one_hot(torch.tensor([1, 4]), 5).float()).shape == (2, 1)


def test_stylegan2_r1_penalty_fused_vs_unfused():
    """R1: the gradient of D's output w.r.t. real images, then its squared norm's gradient w.r.t.
    D's parameters (a double backward through bias_act and upfirdn2d)."""
    fused, unfused = pair("stylegan2-d")
    x = torch.randn(4, 3, 16, 16)

    def r1_gradients(model, dtype=torch.float32):
        model = copy.deepcopy(model).to(dtype)
        real = x.to(dtype).requires_grad_(True)
        (g,) = torch.autograd.grad(model(real, None).sum(), real, create_graph=True)
        penalty = g.square().sum([1, 2, 3]).mean()
        grads = torch.autograd.grad(penalty, list(model.parameters()), allow_unused=True)  # out.bias: unused
        return [penalty.detach()] + [torch.zeros(1) if t is None else t.float() for t in grads]

    assert_within_eager_error(r1_gradients(fused), r1_gradients(unfused), r1_gradients(unfused, torch.float64))


@pytest.mark.parametrize("demodulate", [True, False], ids=["conv", "torgb"])
def test_stylegan2_fp16_layers_modulate_in_float32(demodulate):
    """In fp16 blocks the style affine and the demodulation run in float32 from the float32 weight and
    styles, as the official code does; only the convolution is float16 (here on the CPU)."""
    from fastgen.models.stylegan2 import SynthesisLayer, ToRGBLayer, _modulated

    torch.manual_seed(0)
    layer = SynthesisLayer(16, 8, 32, 8, kernel_size=3) if demodulate else ToRGBLayer(16, 3, 32)
    x, w = torch.randn(2, 16, 8, 8), torch.randn(2, 32)
    gain = 1.0 if demodulate else layer.weight_gain
    want = modulated_conv2d_ref(x.double(), layer.weight.double(), (layer.affine(w) * gain).double(), demodulate,
                                1, 1, None, layer.padding)
    seen = []
    layer.affine.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    got = _modulated(layer, x.half(), w, demodulate, True, gain)
    assert got.dtype == torch.float16 and seen == [torch.float32]
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)
