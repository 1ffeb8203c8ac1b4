"""fastgen.models.VAE against diffusers' AutoencoderKL: the same state dict keys, a diffusers state
dict loads unchanged into both builds, and encode / decode return what diffusers returns."""

import copy

import pytest
import torch
from diffusers import AutoencoderKL

from fastgen.models import VAE
from fastgen.nn import GroupNormAct, UpsampleConv2d
from test_convert_diffusers import CONFIGS, vae
from tolerances import assert_close, assert_within_eager_error


@pytest.mark.parametrize("name", ["reduced", "sd"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_loads_a_diffusers_state_dict_and_matches_it(name, fused):
    reference = vae(name)
    model = VAE(**CONFIGS[name], fused=fused).eval()
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict(), strict=True)
    assert any(isinstance(m, GroupNormAct) for m in model.modules()) == fused
    assert any(isinstance(m, UpsampleConv2d) for m in model.modules()) == fused
    z, x = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 32, 32)
    ref64 = copy.deepcopy(reference).double()
    with torch.no_grad():
        got, want = model.encode(x).latent_dist, ref64.encode(x.double()).latent_dist
        for a, b in ((got.mean, want.mean), (got.std, want.std), (got.kl(), want.kl())):
            assert_close(a, b, torch.float32, scale=8.0)
        assert_close(model.decode(z).sample, ref64.decode(z.double()).sample, torch.float32, scale=8.0)
        assert_close(model(x).sample, ref64(x.double()).sample, torch.float32, scale=8.0)
        g = torch.Generator().manual_seed(3)
        sample = model.encode(x).latent_dist.sample(generator=g)
        want_sample = reference.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(3))
        assert_close(sample, want_sample.double(), torch.float32, scale=8.0)
        (tup,) = model.decode(z, return_dict=False)
        assert tup.shape == (2, 3, 64, 64)


def test_state_dict_goes_back_to_diffusers_and_between_builds():
    fused = VAE(**CONFIGS["reduced"], fused=True)
    unfused = VAE(**CONFIGS["reduced"], fused=False)
    unfused.load_state_dict(fused.state_dict(), strict=True)
    AutoencoderKL(**CONFIGS["reduced"]).load_state_dict(fused.state_dict(), strict=True)


def test_training_gradients_fused_vs_unfused():
    """The ELBO (reconstruction + KL) through both builds with the same weights: the fused build's
    gradients within 3x the unfused float32 error against float64 (the flash rule)."""
    torch.manual_seed(0)
    unfused = VAE(**CONFIGS["reduced"], fused=False).train()
    fused = VAE(**CONFIGS["reduced"], fused=True).train()
    fused.load_state_dict(unfused.state_dict())
    x = torch.randn(2, 3, 32, 32)

    def gradients(m, dtype=torch.float32):
        posterior = m.encode(x.to(dtype)).latent_dist
        out = m.decode(posterior.mode()).sample
        loss = (out - x.to(dtype)).square().mean() + 1e-3 * posterior.kl().mean()
        return torch.autograd.grad(loss, list(m.parameters()))

    want = gradients(copy.deepcopy(unfused).double(), torch.float64)
    assert_within_eager_error(gradients(fused), gradients(unfused), want)


def test_channels_last_and_bfloat16():
    torch.manual_seed(0)
    unfused = VAE(**CONFIGS["reduced"], fused=False).eval()
    fused = VAE(**CONFIGS["reduced"], fused=True).eval()
    fused.load_state_dict(unfused.state_dict())
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        want = copy.deepcopy(unfused).double().decode(z.double()).sample
        for dtype in (torch.float32, torch.bfloat16):
            got = copy.deepcopy(fused).to(dtype, memory_format=torch.channels_last).decode(
                z.to(dtype, memory_format=torch.channels_last)).sample
            eager = copy.deepcopy(unfused).to(dtype, memory_format=torch.channels_last).decode(
                z.to(dtype, memory_format=torch.channels_last)).sample
            assert_within_eager_error([got], [eager], [want], factor=2.0)


def test_bad_configs():
    with pytest.raises(ValueError, match="one block type per width"):
        VAE(block_out_channels=(32, 64))
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAE(block_out_channels=(48,), norm_num_groups=32)
    with pytest.raises(ValueError, match="act_fn"):
        VAE(act_fn="relu")
