"""fastgen.convert on diffusers' AutoencoderKL (random weights from a config: nothing downloaded):
the Stable Diffusion 1.x/2.x and SDXL VAE configurations and a reduced-width one. diffusers is in
README's test environment (requirements.txt; `pip install fastgen[diffusers]` for users)."""

import copy
import os
from pathlib import Path

import pytest
import torch
from diffusers import (AutoencoderDC, AutoencoderKL, AutoencoderKLAllegro, AutoencoderKLCogVideoX, AutoencoderKLHunyuanVideo,
                       AutoencoderKLLTX2Video, AutoencoderKLLTXVideo, AutoencoderKLMochi, AutoencoderKLQwenImage, AutoencoderKLTemporalDecoder,
                       AutoencoderKLWan, AutoencoderOobleck, UNet2DModel)
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

import fastgen
from test_convert import conform
from tolerances import assert_close, assert_within_eager_error

FOUR = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu")
CONFIGS = {
    "sd": dict(FOUR, block_out_channels=(128, 256, 512, 512), sample_size=512, scaling_factor=0.18215),
    "sd2": dict(FOUR, block_out_channels=(128, 256, 512, 512), sample_size=768, scaling_factor=0.18215),
    "sdxl": dict(FOUR, block_out_channels=(128, 256, 512, 512), sample_size=1024, scaling_factor=0.13025,
                 force_upcast=True),
    "reduced": dict(FOUR, block_out_channels=(32, 64, 128, 128)),
}


def vae(name: str) -> AutoencoderKL:
    torch.manual_seed(0)
    model = AutoencoderKL(**CONFIGS[name]).eval()
    with torch.no_grad():  # norms away from their initial 1 and 0, so that a lost affine shows
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_converted_vae_decodes_and_encodes_as_diffusers(name):
    model = vae(name)
    converted = fastgen.convert(model)
    report = converted.fastgen_report
    assert report.left == [], report
    resnets = [m for m in model.modules() if isinstance(m, ResnetBlock2D)]
    upsamplers = [m for m in model.modules() if isinstance(m, Upsample2D)]
    assert len(report.fused) == 2 * len(resnets) + len(upsamplers) + 2  # + both conv_norm_out
    assert all(type(m) is not Upsample2D for m in converted.modules() if isinstance(m, Upsample2D))
    z = torch.randn(1, 4, 8, 8)
    x = torch.randn(1, 3, 32, 32)
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        assert_close(converted.decode(z).sample, reference.decode(z.double()).sample, torch.float32, scale=8.0)
        got = converted.encode(x).latent_dist
        want = reference.encode(x.double()).latent_dist
        assert_close(got.mean, want.mean, torch.float32, scale=8.0)


def test_state_dicts_load_both_ways_and_unconvert_restores_diffusers_classes():
    model = vae("reduced")
    converted = fastgen.convert(model)
    assert list(converted.state_dict()) == list(model.state_dict())
    other = vae("reduced")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    converted.load_state_dict(other.state_dict(), strict=True)
    back = fastgen.unconvert(converted)
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    assert sum(type(m) is Upsample2D for m in back.modules()) == 3
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(back.decode(z).sample, other.decode(z).sample)
    model.load_state_dict(converted.state_dict(), strict=True)


def test_channels_last_and_an_odd_output_size():
    model = vae("reduced").to(memory_format=torch.channels_last)
    converted = fastgen.convert(model)
    z = torch.randn(1, 4, 7, 9).to(memory_format=torch.channels_last)
    with torch.no_grad():
        got = converted.decode(z).sample
        assert_close(got, copy.deepcopy(model).double().decode(z.double()).sample, torch.float32, scale=8.0)
        up = converted.decoder.up_blocks[0].upsamplers[0]
        h = torch.randn(1, 128, 5, 6)
        want = torch.nn.functional.conv2d(torch.nn.functional.interpolate(h, size=(11, 13)), up.conv.weight,
                                          up.conv.bias, padding=1)
        torch.testing.assert_close(up(h, output_size=(11, 13)), want)  # not 2x: the original path


def test_training_step_gradients_match():
    """The ELBO's reconstruction term through the whole VAE: within 3x the unconverted model's
    float32 error against float64 (the flash rule)."""
    model = vae("reduced").train()
    x = torch.randn(2, 3, 32, 32)

    def gradients(m, dtype=torch.float32):
        out = m(x.to(dtype), sample_posterior=False).sample
        return torch.autograd.grad((out - x.to(dtype)).square().mean(), list(m.parameters()))

    got = gradients(fastgen.convert(model))
    eager = gradients(copy.deepcopy(model))
    want = gradients(copy.deepcopy(model).double(), torch.float64)
    assert_within_eager_error(got, eager, want)


def test_a_converted_vae_pickles_into_a_fresh_process(tmp_path):
    """The Fused* classes are importable by name from fastgen.conversion before any conversion ran."""
    import subprocess
    import sys

    converted = fastgen.convert(vae("reduced"))
    assert isinstance(converted.decoder.up_blocks[0].resnets[0], ResnetBlock2D)  # still diffusers' class
    torch.save(converted, tmp_path / "vae.pt")
    z = torch.randn(1, 4, 8, 8)
    torch.save(z, tmp_path / "z.pt")
    with torch.no_grad():
        torch.save(converted.decode(z).sample, tmp_path / "want.pt")
    code = ("import torch; m = torch.load('vae.pt', weights_only=False); z = torch.load('z.pt');"
            "torch.testing.assert_close(m.decode(z).sample, torch.load('want.pt')); print('ok')")
    root = str(Path(fastgen.__file__).resolve().parents[1])  # this checkout's fastgen in the child too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# diffusers models and blocks in the conformance suite (tests/test_convert.py's checks)

class PlainGroupNorm(torch.nn.GroupNorm):
    """A GroupNorm subclass: convert must not fuse it, and must leave the activation it shares alone."""


def resnet(**kwargs):
    return lambda: ResnetBlock2D(in_channels=8, out_channels=8, groups=4, **kwargs)


def partial_resnet():
    block = ResnetBlock2D(in_channels=8, out_channels=12, temb_channels=None, groups=4)
    block.norm1 = PlainGroupNorm(4, 8)
    return block


def decode(m, z):
    return m.decode(z).sample


def unet():
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))


def dc():
    return AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=4, encoder_block_types="ResBlock",
                         decoder_block_types="ResBlock", encoder_block_out_channels=(8, 16),
                         decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
                         decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                         decoder_qkv_multiscales=((), ()))


def wan():
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                            latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


def hunyuan_video():
    return AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                                     down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                                     up_block_types=("HunyuanVideoUpBlock3D",) * 3, layers_per_block=1,
                                     norm_num_groups=4, spatial_compression_ratio=4, temporal_compression_ratio=4)


def qwen_image():
    return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                  latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


def ltx(timestep_conditioning=False):
    # the encoder's convolutions causal, the decoder's not (LTX's defaults); patches of one pixel
    return lambda: AutoencoderKLLTXVideo(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
        timestep_conditioning=timestep_conditioning, patch_size=1, patch_size_t=1)


def ltx2():  # PerChannelRMSNorm; causal convolutions, the decoder's padding in space by reflection
    return AutoencoderKLLTX2Video(latent_channels=4, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 3,
                                  layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 4, patch_size=1,
                                  upsample_residual=(False,) * 3, upsample_factor=(1,) * 3)


def cogvideox():
    return AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 2, up_block_types=("CogVideoXUpBlock3D",) * 2,
                                  block_out_channels=(8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
                                  temporal_compression_ratio=2)


def mochi():  # its norms have 32 groups
    return AutoencoderKLMochi(encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4,
                              latent_channels=4, layers_per_block=(1,) * 5, temporal_expansions=(1, 2, 3),
                              spatial_expansions=(2, 2, 2), add_attention_block=(False,) * 5)


def allegro():
    return AutoencoderKLAllegro(down_block_types=("AllegroDownBlock3D",) * 2, up_block_types=("AllegroUpBlock3D",) * 2,
                                block_out_channels=(8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
                                temporal_downsample_blocks=(True, False), temporal_upsample_blocks=(False, True))


def temporal_decoder():
    return AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(32, 64),
                                        latent_channels=4, layers_per_block=1)


def whole(m, x):  # encoder and decoder: LTX's causal convolutions are the encoder's
    return m(x).sample


def ltx_decode(m, z, temb):
    return m.decode(z, temb=temb).sample


def allegro_decode(m, z):  # its decode() tiles only; the decoder is what it runs per tile
    return m.decoder(z)


def temporal_decode(m, z):
    return m.decode(z, num_frames=z.shape[0]).sample


# name -> (builder, inputs, call, fastgen ops run in one forward (counted as they run), what `left` must mention)
DIFFUSERS = {
    "resnet": (resnet(temb_channels=None), lambda: (torch.randn(2, 8, 5, 6), None), None, {"group_norm_act": 2}, ()),
    "resnet-temb": (resnet(temb_channels=6), lambda: (torch.randn(2, 8, 5, 6), torch.randn(2, 6)), None,
                    {"group_norm_act": 2}, ()),
    "resnet-scale-shift": (resnet(temb_channels=6, time_embedding_norm="scale_shift"),
                           lambda: (torch.randn(2, 8, 5, 6), torch.randn(2, 6)), None, {"group_norm_act": 1}, ()),
    "resnet-partial": (partial_resnet, lambda: (torch.randn(2, 8, 5, 6), None), None,
                       {"group_norm_act": 1}, ("subclass",)),
    "unet2d": (unet, lambda: (torch.randn(2, 3, 8, 8), 10), None, {"group_norm_act": 17, "upsample_conv2d": 1}, ()),
    "autoencoder-kl": (lambda: vae("reduced"), lambda: (torch.randn(1, 4, 4, 4),), decode,
                       {"group_norm_act": 29, "upsample_conv2d": 3}, ()),
    "autoencoder-dc": (dc, lambda: (torch.randn(1, 4, 2, 2),), decode, {"rms_norm_act": 3}, ()),
    # the video VAEs decode clips frame by frame through feature caches (Wan, QwenImage) or whole:
    # RMS norm + SiLU pairs, causal 3-D convolutions, the per-frame upsampling
    "wan": (wan, lambda: (torch.randn(1, 4, 3, 4, 4),), decode,
            {"rms_norm_act": 42, "upsample_conv3d": 42, "upsample_conv2d": 3}, ()),
    "qwenimage": (qwen_image, lambda: (torch.randn(1, 4, 3, 4, 4),), decode,
                  {"rms_norm_act": 42, "upsample_conv3d": 42, "upsample_conv2d": 3}, ()),
    "hunyuan-video": (hunyuan_video, lambda: (torch.randn(1, 4, 2, 4, 4),), decode,
                      {"group_norm_act": 17, "upsample_conv3d": 20}, ()),
    # LTX: channel RMS norms (x.movedim(1, -1) through diffusers' RMSNorm), its causal convolutions
    # (copies of the first frame); with timestep conditioning a scale and shift sit between norm and
    # activation: the norms alone
    "ltx": (ltx(), lambda: (torch.randn(1, 3, 5, 8, 8),), whole,
            {"rms_norm_act": 20, "upsample_conv3d": 26}, ("stride",)),
    "ltx-timestep": (ltx(True), lambda: (torch.randn(1, 4, 2, 4, 4), torch.tensor([0.3])), ltx_decode,
                     {"rms_norm_act": 10, "upsample_conv3d": 14}, ()),
    "ltx2": (ltx2, lambda: (torch.randn(1, 3, 9, 16, 16),), whole, {"rms_norm_act": 20, "upsample_conv3d": 29}, ()),
    # CogVideoX and Mochi: CogVideoXCausalConv3d (a cache between chunks of frames); Mochi's per-frame GroupNorm
    "cogvideox": (cogvideox, lambda: (torch.randn(1, 4, 3, 4, 4),), decode,
                  {"upsample_conv3d": 14}, ("CogVideoXUpsample3D",)),
    "mochi": (mochi, lambda: (torch.randn(1, 4, 2, 2, 2),), decode, {"group_norm_act": 10, "upsample_conv3d": 10}, ()),
    "allegro": (allegro, lambda: (torch.randn(1, 4, 3, 4, 4),), allegro_decode,
                {"group_norm_act": 41, "upsample_conv2d": 1}, ()),
    "temporal-decoder": (temporal_decoder, lambda: (torch.randn(2, 4, 4, 4),), temporal_decode,
                         {"group_norm_act": 21, "upsample_conv2d": 1}, ()),
}


@pytest.mark.parametrize("name", DIFFUSERS)
def test_conformance(name):
    build, make_inputs, call, ops, left = DIFFUSERS[name]
    conform(build, make_inputs, ops, left, call=call)


def test_legacy_weight_norm_model_says_inplace_works():
    model = AutoencoderOobleck(encoder_hidden_size=8, downsampling_ratios=[2, 2], channel_multiples=[1, 2],
                               decoder_channels=8, decoder_input_channels=4, audio_channels=2)
    with pytest.raises(RuntimeError, match="inplace=True"):
        fastgen.convert(model)
    assert fastgen.convert(model, inplace=True) is model


@pytest.mark.parametrize("build,shape,ops", [
    (wan, (1, 4, 3, 4, 4), {"rms_norm_act": 40, "upsample_conv3d": 40, "upsample_conv2d": 3}),
    (qwen_image, (1, 4, 3, 4, 4), {"rms_norm_act": 40, "upsample_conv3d": 40, "upsample_conv2d": 3}),
    (hunyuan_video, (1, 4, 2, 4, 4), {"group_norm_act": 17, "upsample_conv3d": 20}),
    (ltx(), (1, 4, 2, 4, 4), {"rms_norm_act": 10, "upsample_conv3d": 12}),
    (cogvideox, (1, 4, 3, 4, 4), {"upsample_conv3d": 14}),  # its decoder norms are SpatialNorm3D: not fused
    (mochi, (1, 4, 2, 2, 2), {"group_norm_act": 10, "upsample_conv3d": 10}),
    (ltx2, (1, 4, 2, 2, 2), {"rms_norm_act": 8, "upsample_conv3d": 12}),
], ids=["wan", "qwenimage", "hunyuan-video", "ltx", "cogvideox", "mochi", "ltx2"])
def test_video_vaes_decode_through_the_fused_ops(build, shape, ops):
    """Wan and QwenImage decode frame by frame through feature caches (lists their blocks' forwards
    mutate, which fx cannot follow): the fused ops must run on those calls, not only on traced ones."""
    from collections import Counter

    from fastgen.dispatch import auto_choices

    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():  # RMS norm gammas and biases away from 1 and 0
        for name, p in model.named_parameters():
            if name.endswith("gamma") or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                p.uniform_(0.5, 1.5)
    converted = fastgen.convert(model)
    z = torch.randn(shape)
    with torch.no_grad(), auto_choices() as picks:
        got = converted.decode(z).sample
    want = copy.deepcopy(model).double().decode(z.double()).sample
    assert_close(got, want, torch.float32, scale=8.0)
    ran = Counter(op for op, _ in picks)
    assert all(ran[op] >= n for op, n in ops.items()), ran


@pytest.mark.parametrize("factor", [(2, 2, 2), (1, 2, 2)])
@pytest.mark.parametrize("frames", [1, 2, 5])
def test_hunyuan_upsampler_folds_its_first_frame_and_replicate_padding(factor, frames):
    """HunyuanVideoUpsampleCausal3D (first frame in space only, replicate causal padding) as one
    upsample_conv3d of the clip with its first frame repeated: float64, exact to rounding; a hook on
    its convolution brings the original forward back."""
    from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import HunyuanVideoUpsampleCausal3D

    torch.manual_seed(0)
    model = HunyuanVideoUpsampleCausal3D(6, 5, upsample_factor=factor).double()
    converted = fastgen.convert(model)
    assert any("upsample_conv3d" in what for _, what in converted.fastgen_report.fused)
    x = torch.randn(2, 6, frames, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(converted(x), model(x))
    x = x.contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(converted(x), model(x))
    calls = []
    converted.conv.conv.register_forward_hook(lambda *a: calls.append(1))
    torch.testing.assert_close(converted(x), model(x))
    assert calls == [1]


class ChannelRMS(torch.nn.Module):
    """LTX's pattern: diffusers' RMSNorm over the channels through movedim, then an activation."""

    def __init__(self, affine=True, bias=False, over_channels=True):
        super().__init__()
        from diffusers.models.normalization import RMSNorm

        self.norm = RMSNorm(6 if over_channels else 5, eps=1e-6, elementwise_affine=affine, bias=bias)
        self.act = torch.nn.SiLU()
        self.over_channels = over_channels

    def forward(self, x):
        if self.over_channels:
            return self.act(self.norm(x.movedim(1, -1)).movedim(-1, 1))
        return self.act(self.norm(x))  # over the last dimension: not a channel norm


@pytest.mark.parametrize("dtype,weight_dtype,fuses", [
    (torch.float32, torch.float32, True), (torch.bfloat16, torch.bfloat16, True), (torch.float16, None, True),
    (torch.float32, torch.bfloat16, False),  # the forward rounds to the weight's dtype: its output is bf16
    (torch.float64, torch.float64, False),   # the forward takes the mean square in float32
])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_channel_rms_norm_fuses_only_where_it_computes_the_same(dtype, weight_dtype, fuses, memory_format):
    from fastgen.dispatch import auto_choices

    torch.manual_seed(0)
    model = ChannelRMS(affine=weight_dtype is not None, bias=True if weight_dtype is not None else False)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5)
    model = model.to(weight_dtype or dtype)
    converted = fastgen.convert(model)
    assert len(converted.fastgen_report.fused) == 1
    x = torch.randn(2, 6, 3, 5, 4).to(dtype).contiguous(memory_format=memory_format)
    with torch.no_grad(), auto_choices() as picks:
        got = converted(x)
    want = model(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert any(op == "rms_norm_act" for op, _ in picks) == fuses
    if fuses:
        assert_close(got, model.double()(x.double()), dtype, scale=4.0)
    else:
        assert torch.equal(got, want)


def test_rms_norm_over_the_last_dimension_and_hooks_are_left_alone():
    torch.manual_seed(0)
    model = ChannelRMS(over_channels=False)
    assert not fastgen.convert(model).fastgen_report.fused
    model = ChannelRMS()
    converted = fastgen.convert(model)
    converted.norm.register_forward_hook(lambda m, args, out: out * 2)
    x = torch.randn(2, 6, 3, 5)
    assert torch.equal(converted(x), model.act(2 * model.norm(x.movedim(1, -1)).movedim(-1, 1)))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_mochi_per_frame_group_norm(memory_format):
    """MochiChunkedGroupNorm3D normalizes each frame on its own (in chunks of 8 frames): the fused call
    runs group_norm_act on the frames as a batch; float64, exact to rounding, in either layout, with
    the original's strides."""
    from diffusers.models.autoencoders.autoencoder_kl_mochi import MochiResnetBlock3D

    torch.manual_seed(0)
    block = MochiResnetBlock3D(32).double()
    with torch.no_grad():
        for p in block.parameters():
            p.uniform_(0.5, 1.5)
    converted = fastgen.convert(block)
    assert sum("per frame" in what for _, what in converted.fastgen_report.fused) == 2
    x = torch.randn(2, 32, 11, 3, 4, dtype=torch.float64).contiguous(memory_format=memory_format)
    got, want = converted(x)[0], block(x)[0]
    torch.testing.assert_close(got, want)
    fused = fastgen.conversion._norm_act_call(converted.norm1, converted.nonlinearity, (), "silu", 0.0, x)
    original = block.nonlinearity(block.norm1(x))
    torch.testing.assert_close(fused, original)
    assert fused.stride() == original.stride()
