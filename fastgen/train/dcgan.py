"""DCGAN on the digits: the non-saturating GAN loss (Goodfellow et al. 2014), Adam(2e-4, 0.5, 0.999)
as in PyTorch's DCGAN example; BatchNorm + ReLU in the generator (BatchNormAct2d in the fused build)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgen.models import DCGANDiscriminator, DCGANGenerator
from fastgen.train.recipe import Recipe

Z_DIM = 64


class DCGAN(Recipe):
    name = "dcgan"
    defaults = {"steps": 2000, "batch": 64}
    losses = ("loss_D", "loss_G")

    def build(self, fused: bool):
        self.G = self.module(DCGANGenerator(Z_DIM, 32, 1, ngf=32, upsample="upsample_conv", fused=fused))
        self.D = self.module(DCGANDiscriminator(32, 1, ndf=32, fused=fused))
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=2e-4, betas=(0.5, 0.999))

    def step(self, t: int, reals: torch.Tensor, batches) -> dict:
        z = self.cast(batches.randn(t, 1, Z_DIM))
        fake = self.G(z)
        # D: real and generated images in separate passes (their own BatchNorm statistics), each
        # forward followed by its backward, as DistributedDataParallel wants
        self.opt_D.zero_grad(set_to_none=True)
        loss_fake = F.softplus(self.D(fake.detach())).mean()
        loss_fake.backward()
        loss_real = F.softplus(-self.D(reals)).mean()
        loss_real.backward()
        self.opt_D.step()
        # G: through the unwrapped D (its gradients are not wanted)
        self.opt_G.zero_grad(set_to_none=True)
        with self.frozen(self.D):
            loss_G = F.softplus(-self.plain(self.D)(fake)).mean()
        loss_G.backward()
        self.opt_G.step()
        return {"loss_D": (loss_fake + loss_real).detach(), "loss_G": loss_G.detach()}

    @torch.no_grad()
    def samples(self, z: torch.Tensor) -> torch.Tensor:
        G = self.plain(self.G)
        G.eval()
        try:
            return G(self.cast(z))
        finally:
            G.train()

    def sample_shape(self) -> tuple:
        return (Z_DIM,)

    def state(self) -> dict:
        return {"G": self.plain(self.G), "D": self.plain(self.D), "opt_G": self.opt_G, "opt_D": self.opt_D}
