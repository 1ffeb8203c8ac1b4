"""Every reference generator of fastgen.models (and a converted diffusers AutoencoderKL) on an XLA
device: output and parameter gradients against CPU eager, no op run on the CPU (fallback), and
called again with new inputs of the same shapes, no graph compiled again after a warm-up. StyleGAN2's R1 penalty (a
double backward) and path-length penalty (the gradient with respect to the dlatents) too.

The CPU side runs the reference backend (the unfused torch layers, `<op>_ref`): an independent path,
not the same composite code on both sides.

Run by tools/test_xla.sh in the XLA environment (torch_xla on the CPU); README's TPU section."""

import copy

import pytest
import torch

import fastgen
from fastgen import xla
from fastgen.models import VAE, Autoencoder, DCGANDiscriminator, DCGANGenerator, StyleGAN2Discriminator, StyleGAN2Generator

DEVICE = xla.device()
TOL = dict(atol=2e-4, rtol=2e-4)  # float32 on both sides: XLA:CPU's and eager's rounding differ

# name -> (the model, its inputs (CPU), the call)
MODELS = {
    "dcgan-g": (lambda: DCGANGenerator(16, 16, 3, 8, "upsample_conv"), lambda: (torch.randn(4, 16),), None),
    "dcgan-g-transpose": (lambda: DCGANGenerator(16, 16, 3, 8, "transpose"), lambda: (torch.randn(4, 16),), None),
    "dcgan-d": (lambda: DCGANDiscriminator(16, 3, 8), lambda: (torch.randn(4, 3, 16, 16),), None),
    "autoencoder": (lambda: Autoencoder(3, 4, (8, 16), 4), lambda: (torch.randn(2, 3, 16, 16),), None),
    "stylegan2-g": (lambda: StyleGAN2Generator(16, 0, 16, 16, 3, channel_base=128, channel_max=16),
                    lambda: (torch.randn(2, 16), None), lambda m, z, c: m(z, c, noise_mode="const")),
    "stylegan2-d": (lambda: StyleGAN2Discriminator(0, 16, 3, channel_base=128, channel_max=16),
                    lambda: (torch.randn(4, 3, 16, 16), None), None),
    "vae-encode": (lambda: _vae(), lambda: (torch.randn(2, 3, 16, 16),), lambda m, x: m.encode(x).latent_dist.mean),
    "vae-decode": (lambda: _vae(), lambda: (torch.randn(2, 4, 4, 4),), lambda m, z: m.decode(z).sample),
}


def _vae():
    return VAE(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
               latent_channels=4, norm_num_groups=4, sample_size=16)


def on_xla(t):
    return None if t is None else t.detach().to(DEVICE).requires_grad_(t.requires_grad)


def forward_and_gradients(model, inputs, call):
    out = (call or (lambda m, *a: m(*a)))(model, *inputs)
    # allow_unused: the VAE's encode leaves the decoder's parameters out, and its decode the encoder's
    grads = torch.autograd.grad(out.square().mean(), list(model.parameters()), allow_unused=True)
    return [out] + [torch.zeros(()) if g is None else g for g in grads]


@pytest.mark.parametrize("name", MODELS)
def test_model_on_xla_matches_cpu_without_fallback_or_recompilation(name):
    build, make_inputs, call = MODELS[name]
    torch.manual_seed(0)
    model = build().train()
    model_xla = copy.deepcopy(model).to(DEVICE)
    graphs = []
    for _ in range(3):
        inputs = make_inputs()
        watch = xla.Watch()
        got = forward_and_gradients(model_xla, [on_xla(t) for t in inputs], call)
        xla.end_step(DEVICE)
        watch.mark()
        graphs.append(watch.summary()["graphs_compiled"])
        assert watch.summary()["fallbacks"] == {}, f"{name}: ran on the CPU: {watch.summary()['fallbacks']}"
        with fastgen.use_backend("reference"):
            want = forward_and_gradients(model, inputs, call)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            torch.testing.assert_close(g.cpu(), w.detach(), **TOL, msg=lambda m: f"{name}, tensor {i}: {m}")
        assert sum(g.numel() > 1 for g in want[1:]) > 2  # gradients, not only zeros for unused parameters
    # the first two calls may compile (the second sees the buffers the first computed, e.g. batch norm's
    # running statistics, as new inputs); after that, none
    assert graphs[2] == 0, f"{name}: graphs compiled by each of 3 calls: {graphs}"


def test_stylegan2_r1_and_path_length_penalties_on_xla():
    """R1 (D's input gradient, then its norm's gradient: a double backward through bias_act, upfirdn2d
    and the modulated convolutions) and the path-length penalty (G's image gradient w.r.t. ws, then
    its backward), as the training recipe computes them, against the CPU."""
    from fastgen.train.stylegan2 import StyleGAN2

    torch.manual_seed(0)
    D = StyleGAN2Discriminator(0, 16, 3, channel_base=128, channel_max=16)
    G = StyleGAN2Generator(16, 0, 16, 16, 3, channel_base=128, channel_max=16)
    real, z = torch.randn(4, 3, 16, 16), torch.randn(2, 16)

    def penalties(D, G, real, z):
        real = real.requires_grad_(True)
        r1 = StyleGAN2.r1_penalty(D(real, None), real).mean()
        ws = G.mapping(z, None)
        img = G.synthesis(ws, noise_mode="const")
        pl = StyleGAN2.pl_lengths(img, ws, torch.ones_like(img) / 4).mean()
        return [r1, pl] + list(torch.autograd.grad(r1 + pl, list(D.parameters()) + list(G.parameters()),
                                                    allow_unused=True))

    watch = xla.Watch()
    got = penalties(copy.deepcopy(D).to(DEVICE), copy.deepcopy(G).to(DEVICE), real.to(DEVICE), z.to(DEVICE))
    xla.end_step(DEVICE)
    assert watch.summary()["fallbacks"] == {}
    with fastgen.use_backend("reference"):
        want = penalties(D, G, real, z)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if w is None or g is None:  # a parameter one formulation does not use: the other's gradient is 0
            assert all(t is None or not t.cpu().any() for t in (g, w)), f"tensor {i}"
        else:
            torch.testing.assert_close(g.cpu(), w.detach(), **TOL, msg=lambda m: f"tensor {i}: {m}")


def test_converted_autoencoder_kl_on_xla():
    """diffusers' AutoencoderKL through fastgen.convert: encode and decode on XLA, and the decoder's
    parameter gradients, against the original on the CPU; no fallback."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                          latent_channels=4, norm_num_groups=4, sample_size=16).eval()
    converted = fastgen.convert(copy.deepcopy(model)).to(DEVICE)
    assert len(converted.fastgen_report.fused) > 5
    x = torch.randn(2, 3, 16, 16)

    def encode_decode(m, x):
        out = m.decode(m.encode(x).latent_dist.mean).sample
        return [out] + list(torch.autograd.grad(out.square().mean(), list(m.decoder.parameters())))

    watch = xla.Watch()
    got = encode_decode(converted, x.to(DEVICE))
    xla.end_step(DEVICE)
    assert watch.summary()["fallbacks"] == {}
    want = encode_decode(model, x)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g.cpu(), w.detach(), **TOL, msg=lambda m: f"tensor {i}: {m}")


def test_the_fallback_check_catches_an_op_without_a_lowering():
    """A planted op that torch_xla 2.9 cannot lower (upsample_nearest3d, pytorch/xla #6932) shows up."""
    watch = xla.Watch()
    y = torch.nn.functional.interpolate(torch.randn(1, 2, 2, 3, 3).to(DEVICE), scale_factor=2, mode="nearest")
    xla.end_step(DEVICE)
    assert y.shape == (1, 2, 4, 6, 6)
    assert any("upsample_nearest3d" in op for op in watch.summary()["fallbacks"]), watch.summary()


def test_the_recompilation_check_catches_a_step_that_recompiles():
    """A step whose graph changes every time (here its batch size) compiles every time: the count the
    model tests bound grows with each call."""
    watch = xla.Watch()
    for n in range(1, 4):
        total = (torch.randn(n, 5).to(DEVICE) * 2).sum()  # noqa: F841 (alive: what the step computes)
        xla.end_step(DEVICE)
        watch.mark()
    assert watch.graphs_after == [1, 2, 3]
