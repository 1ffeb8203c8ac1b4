"""fastgen.convert on diffusers' AutoencoderKL (random weights from a config: nothing downloaded):
the Stable Diffusion 1.x/2.x and SDXL VAE configurations and a reduced-width one. diffusers is in
README's test environment (requirements.txt; `pip install fastgen[diffusers]` for users)."""

import copy
import os
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

import fastgen
from fastgen.nn import GroupNormAct, UpsampleConv2d
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
    assert all(isinstance(m.conv, UpsampleConv2d) for m in converted.modules() if isinstance(m, Upsample2D))
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
    assert not any(isinstance(m, GroupNormAct) for m in back.modules())
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
