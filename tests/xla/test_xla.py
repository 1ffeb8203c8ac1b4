"""Every fastgen op and layer on an XLA device (torch_xla; PJRT_DEVICE=CPU in CI, TPU on a TPU VM):
forward and backward against CPU eager (the op's _ref), and after each, no op may have fallen back
to the CPU (torch_xla runs an op it cannot lower on the CPU silently: shared/TOOLCHAIN.md).

Run by tools/test_xla.sh in the XLA environment (torch 2.9.0 + torch_xla 2.9.0). The ops and their
inputs are the examples in each op's spec (fastgen.ops.REGISTRY); adding a layer is one line in LAYERS.
"""

import copy
import math

import pytest
import torch
import torch_xla
import torch_xla.debug.metrics as met
from torch import nn

import fastgen
from fastgen import nn as fnn
from fastgen import ops

DEVICE = torch_xla.device()


def sync():
    torch_xla.sync()


randn = torch.randn


# every example of every op spec (fastgen.ops.REGISTRY): name -> (spec, example)
OPS = {ex.name: (spec, ex) for spec in ops.REGISTRY.values() for ex in spec.examples}

# name -> (a factory of the layer, a factory of its inputs (CPU tensors))
LAYERS = {
    "UpsampleConv2d": (lambda: fnn.UpsampleConv2d(4, 3, 3), lambda: (randn(2, 4, 5, 6),)),
    "GroupNormAct": (lambda: fnn.GroupNormAct(4, 8), lambda: (randn(2, 8, 5, 6),)),
    "GroupNormAct_video": (lambda: fnn.GroupNormAct(4, 8), lambda: (randn(1, 8, 3, 5, 6),)),
    "RMSNormAct_video": (lambda: fnn.RMSNormAct(8, bias=True, clamp=True), lambda: (randn(1, 8, 3, 5, 6),)),
    "UpsampleConv3d_causal": (lambda: fnn.UpsampleConv3d(4, 5, 3, scale_factor=1, causal=True),
                              lambda: (randn(1, 4, 3, 5, 6),)),
    "UpsampleConv3d_up2": (lambda: fnn.UpsampleConv3d(4, 5, 3, scale_factor=2), lambda: (randn(1, 4, 2, 3, 4),)),
    "InstanceNormAct2d": (lambda: fnn.InstanceNormAct2d(6, affine=True), lambda: (randn(2, 6, 5, 4),)),
    "AdaIN": (lambda: fnn.AdaIN(6, 5), lambda: (randn(2, 6, 5, 4), randn(2, 5))),
    "BatchNormAct2d": (lambda: fnn.BatchNormAct2d(6), lambda: (randn(4, 6, 5, 4),)),
    "PixelNorm": (lambda: fnn.PixelNorm(), lambda: (randn(2, 8, 5, 6),)),
    "BiasAct": (lambda: fnn.BiasAct(8, act="lrelu", bias_init=0.3), lambda: (randn(2, 8, 5, 6),)),
    "EqualizedLinear": (lambda: fnn.EqualizedLinear(8, 5, activation="lrelu"), lambda: (randn(3, 8),)),
    "Upsample2dFIR": (lambda: fnn.Upsample2dFIR(), lambda: (randn(2, 3, 6, 5),)),
    "Downsample2dFIR": (lambda: fnn.Downsample2dFIR(), lambda: (randn(2, 3, 6, 8),)),
    "ModulatedConv2d_up": (lambda: fnn.ModulatedConv2d(4, 3, 3, style_dim=5, up=2),
                           lambda: (randn(2, 4, 6, 6), randn(2, 5))),
    "ModulatedConv2d_down": (lambda: fnn.ModulatedConv2d(4, 3, 3, style_dim=5, down=2),
                             lambda: (randn(2, 4, 6, 6), randn(2, 5))),
}


def to_xla(t):
    if not isinstance(t, torch.Tensor):
        return t
    return t.detach().to(DEVICE).requires_grad_(t.requires_grad)


def assert_no_fallback():
    assert met.executed_fallback_ops() == [], f"ran on the CPU, not on XLA: {met.executed_fallback_ops()}"


def close(got, want, what):
    torch.testing.assert_close(got.cpu().double(), want.detach().double(), atol=1e-4, rtol=1e-4, msg=what)


@pytest.mark.parametrize("name", OPS)
def test_op_forward_and_backward_on_xla(name):
    spec, example = OPS[name]
    op, ref, kw, grad_of = spec.public, spec.ref, dict(example.kwargs), example.grad_of
    torch.manual_seed(0)
    inputs = [t.requires_grad_(True) if i in grad_of else t for i, t in enumerate(example.inputs())]
    met.clear_all()
    xs = [to_xla(t) for t in inputs]
    out = op(*xs, **{k: to_xla(v) for k, v in kw.items()})
    grad = torch.randn(out.shape)
    grads = torch.autograd.grad(out, [xs[i] for i in grad_of], grad.to(DEVICE))
    sync()
    assert_no_fallback()
    want = ref(*inputs, **kw)
    close(out, want, f"{name}: output")
    want_grads = torch.autograd.grad(want, [inputs[i] for i in grad_of], grad)
    for i, g, w in zip(grad_of, grads, want_grads, strict=True):
        close(g, w, f"{name}: gradient of input {i}")


@pytest.mark.parametrize("name", LAYERS)
def test_layer_forward_and_backward_on_xla(name):
    make_layer, make_inputs = LAYERS[name]
    torch.manual_seed(0)
    layer = make_layer()
    with torch.no_grad():  # away from the default initial values (ones, zeros)
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    layer_xla = copy.deepcopy(layer).to(DEVICE)
    inputs = [t.requires_grad_(True) for t in make_inputs()]
    met.clear_all()
    xs = [to_xla(t) for t in inputs]
    out = layer_xla(*xs)
    grad = torch.randn(out.shape)
    out.backward(grad.to(DEVICE))
    sync()
    assert_no_fallback()
    with fastgen.use_backend("reference"):
        want = layer(*inputs)
    want.backward(grad)
    close(out, want, f"{name}: output")
    for i, (t, t_xla) in enumerate(zip(inputs, xs, strict=True)):
        close(t_xla.grad, t.grad, f"{name}: gradient of input {i}")
    for (pname, p), p_xla in zip(layer.named_parameters(), layer_xla.parameters(), strict=True):
        close(p_xla.grad, p.grad, f"{name}: gradient of {pname}")
    for (bname, b), b_xla in zip(layer.named_buffers(), layer_xla.buffers(), strict=True):
        close(b_xla, b, f"{name}: buffer {bname}")  # BatchNorm's running statistics


class Generator(nn.Module):
    """A small generator of fastgen layers: latent -> 4x4 -> 8x8 -> 16x16 RGB."""

    def __init__(self, latent=16, ch=16):
        super().__init__()
        self.fc = fnn.EqualizedLinear(latent, ch * 16, activation="lrelu")
        self.up1 = fnn.UpsampleConv2d(ch, ch, 3)
        self.norm1 = fnn.GroupNormAct(4, ch, activation="silu")
        self.up2 = fnn.UpsampleConv2d(ch, ch // 2, 3)
        self.norm2 = fnn.BatchNormAct2d(ch // 2, activation="relu")
        self.to_rgb = nn.Conv2d(ch // 2, 3, 3, padding=1)
        self.ch = ch

    def forward(self, z):
        x = self.fc(z).view(z.shape[0], self.ch, 4, 4)
        x = self.norm1(self.up1(x))
        x = self.norm2(self.up2(x))
        return torch.tanh(self.to_rgb(x))


def compiles() -> int:
    data = met.metric_data("CompileTime")
    return 0 if data is None else data[0]


def test_training_step_compiles_a_bounded_number_of_graphs():
    torch.manual_seed(0)
    gen = Generator().to(DEVICE)
    opt = torch.optim.SGD(gen.parameters(), lr=0.01)
    met.clear_all()
    counts = []
    for _ in range(5):
        z = torch.randn(4, 16).to(DEVICE)
        loss = gen(z).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sync()
        counts.append(compiles())
    assert_no_fallback()
    assert math.isfinite(loss.item())
    assert counts[1] == counts[4], f"graphs compiled after each of 5 steps: {counts} (recompiles after the 2nd)"


def test_torch_compile_openxla_matches_eager():
    torch.manual_seed(0)
    gen = Generator().eval()
    z = torch.randn(4, 16)
    want = gen(z)
    gen_xla = copy.deepcopy(gen).to(DEVICE)
    met.clear_all()
    got = torch.compile(gen_xla, backend="openxla")(z.to(DEVICE))
    sync()
    assert_no_fallback()
    close(got, want, "openxla")


@pytest.mark.parametrize("name", ["compvis-decoder", "guided-diffusion", "lucidrains", "pix2pixhd"])
def test_the_fastgen_compile_backend_runs_on_xla(name):
    """torch.compile(backend="fastgen") with the rewritten graph run as it is (Inductor has no XLA
    target): the fused ops on the XLA device, as the original on the CPU (tests/test_compiler.py's models)."""
    import functools
    import sys
    from pathlib import Path

    from fastgen import compiler
    from fastgen.dispatch import auto_choices

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_compiler import MODELS, _ran

    build, make_inputs, ops_per_forward = MODELS[name]
    torch.manual_seed(0)
    model, inputs = build().eval(), make_inputs()
    want = model(*inputs)
    torch._dynamo.reset()
    met.clear_all()
    with auto_choices() as picks:
        got = torch.compile(copy.deepcopy(model).to(DEVICE),
                            backend=functools.partial(compiler.backend, options={"inductor": False}))(
            *[t.to(DEVICE) for t in inputs])
        sync()
    assert_no_fallback()
    assert _ran(picks) == ops_per_forward
    close(got, want, name)


def test_converted_hunyuan_video_decodes_on_xla_without_fallback():
    """A converted video VAE (diffusers' HunyuanVideo: GroupNorm + SiLU on clips, causal 3-D
    convolutions, and its 3-D upsampler, folded by upsample_conv3d: XLA has no upsample_nearest3d
    lowering, so the original falls back to the CPU there) decodes on the XLA device. (Wan's decode
    cannot run on torch_xla 2.9 at all: its frame cache slices x[:, :, -2:] of a one-frame clip,
    which torch_xla refuses, converted or not.)"""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(0)
    model = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                                      down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                                      up_block_types=("HunyuanVideoUpBlock3D",) * 3, layers_per_block=1,
                                      norm_num_groups=4, spatial_compression_ratio=4, temporal_compression_ratio=4).eval()
    decodes_on_xla(model, fastgen.convert(model), torch.randn(1, 4, 2, 4, 4), "converted HunyuanVideo decode")


def decodes_on_xla(model, converted, z, what):
    """converted decodes z on the XLA device with no CPU fallback, as model does on the CPU."""
    met.clear_all()
    with torch.no_grad():
        got = converted.to(DEVICE).decode(z.to(DEVICE)).sample
        sync()
        assert_no_fallback()
        want = model.decode(z).sample
    close(got, want, what)


@pytest.mark.parametrize("name", ["ltx", "ltx2", "mochi"])
def test_converted_video_vaes_decode_on_xla_without_fallback(name):
    """LTX's channel RMS norms (rms_norm_act) and causal convolutions, LTX-2's per-channel RMS norms,
    Mochi's per-frame GroupNorm (group_norm_act on the frames as a batch) and CogVideoX-style causal
    convolutions, converted, decode on the XLA device."""
    from diffusers import AutoencoderKLLTX2Video, AutoencoderKLLTXVideo, AutoencoderKLMochi

    torch.manual_seed(0)
    build, shape = {
        "ltx": (lambda: AutoencoderKLLTXVideo(
            latent_channels=4, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
            layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
            spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
            patch_size=1, patch_size_t=1), (1, 4, 2, 4, 4)),
        "ltx2": (lambda: AutoencoderKLLTX2Video(
            latent_channels=4, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 3,
            layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 4, patch_size=1,
            upsample_residual=(False,) * 3, upsample_factor=(1,) * 3), (1, 4, 2, 2, 2)),
        "mochi": (lambda: AutoencoderKLMochi(
            encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4, latent_channels=4,
            layers_per_block=(1,) * 5, temporal_expansions=(1, 2, 3), spatial_expansions=(2, 2, 2),
            add_attention_block=(False,) * 5), (1, 4, 2, 2, 2)),
    }[name]
    model = build().eval()
    converted = fastgen.convert(model)
    assert len(converted.fastgen_report.fused) > 10
    decodes_on_xla(model, converted, torch.randn(shape), f"converted {name} decode")
