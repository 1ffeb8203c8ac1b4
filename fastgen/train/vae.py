"""A small Stable-Diffusion-style VAE (fastgen.models.VAE, diffusers' AutoencoderKL layout) on the
digits: the negative ELBO, a Gaussian reconstruction term (sum of squared errors over 2 sigma^2,
sigma^2 = 0.5) plus the KL of the posterior to N(0, I), per image; Adam(1e-3)."""

from __future__ import annotations

import torch
from torch import nn

from fastgen.models import VAE as VAEModel
from fastgen.train.recipe import Recipe

LATENT = (4, 4, 4)  # 32x32 -> three downsamplings -> 4x4, 4 channels: a latent small enough that
# samples from the prior N(0, I) decode to whole digits


class _NegativeELBO(nn.Module):
    """One module whose forward is the whole loss, so that one forward precedes each backward (DDP)."""

    def __init__(self, vae: VAEModel):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * eps  # the reparameterization, with the run's own noise
        recon = self.vae.decode(z).sample
        return (recon - x).square().sum(dim=(1, 2, 3)).mean(), posterior.kl().mean()


class VAE(Recipe):
    name = "vae"
    defaults = {"steps": 1000, "batch": 32}
    losses = ("loss", "recon", "kl")

    def build(self, fused: bool):
        vae = VAEModel(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32),
                       layers_per_block=1, latent_channels=LATENT[0], norm_num_groups=8, sample_size=32,
                       fused=fused)
        self.elbo = self.module(_NegativeELBO(vae))
        self.opt = torch.optim.Adam(self.elbo.parameters(), lr=1e-3)

    def step(self, t: int, reals: torch.Tensor, batches) -> dict:
        eps = self.cast(batches.randn(t, 1, *LATENT))
        self.opt.zero_grad(set_to_none=True)
        recon, kl = self.elbo(reals, eps)
        loss = recon + kl
        loss.backward()
        self.opt.step()
        return {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def samples(self, z: torch.Tensor) -> torch.Tensor:
        return self.plain(self.elbo).vae.decode(self.cast(z)).sample.clamp(-1, 1)

    def sample_shape(self) -> tuple:
        return LATENT

    def state(self) -> dict:
        return {"vae": self.plain(self.elbo).vae, "opt": self.opt}
