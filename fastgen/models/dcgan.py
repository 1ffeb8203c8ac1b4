"""DCGAN (Radford et al. 2016) and a small convolutional autoencoder, as nn.Sequential stacks with
the parameter names of PyTorch's DCGAN example (`main.<index>`). The fused build is the unfused one
with fastgen's layers in the pairs' places: BatchNorm2d + activation -> BatchNormAct2d, Upsample +
Conv2d -> UpsampleConv2d, GroupNorm + activation -> GroupNormAct, each leaving an nn.Identity where
the absorbed layer stood, so the indices and the state dict keys are the same in both builds."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastgen.nn import BatchNormAct2d, GroupNormAct, UpsampleConv2d


def _levels(img_resolution: int) -> int:
    """Doublings from 4x4 to img_resolution (a power of two, at least 8)."""
    levels = int(math.log2(img_resolution)) - 2
    if img_resolution < 8 or 2 ** (levels + 2) != img_resolution:
        raise ValueError(f"img_resolution must be a power of two, at least 8, got {img_resolution}")
    return levels


def _finish(main: nn.Sequential, fused: bool) -> nn.Sequential:
    if not fused:
        return main
    layers = list(main)
    for i, (a, b) in enumerate(zip(layers, layers[1:])):
        if type(a) in (nn.BatchNorm2d, nn.GroupNorm) and type(b).__module__ == "torch.nn.modules.activation":
            fused_layer = (BatchNormAct2d if type(a) is nn.BatchNorm2d else GroupNormAct).from_modules(a, b)
            layers[i], layers[i + 1] = fused_layer, nn.Identity()
        elif type(a) is nn.Upsample and type(b) is nn.Conv2d:
            layers[i], layers[i + 1] = nn.Identity(), UpsampleConv2d.from_modules(a, b)
    return nn.Sequential(*layers)


def _upsampling(in_channels: int, out_channels: int, upsample: str) -> list[nn.Module]:
    if upsample == "transpose":
        return [nn.ConvTranspose2d(in_channels, out_channels, 4, 2, 1, bias=False)]
    if upsample == "upsample_conv":  # no checkerboard artifacts (Odena et al. 2016)
        return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False)]
    raise ValueError(f"upsample must be 'transpose' or 'upsample_conv', got {upsample!r}")


class DCGANGenerator(nn.Module):
    """z (N, z_dim) -> image (N, img_channels, R, R) in [-1, 1]: a 4x4 transposed convolution, then
    per doubling an upsampling (a stride-2 transposed convolution, or nearest 2x + 3x3 conv) and
    BatchNorm + ReLU, then the image layer and tanh. Widths ngf * 2^k, halving towards the image."""

    def __init__(self, z_dim: int = 100, img_resolution: int = 64, img_channels: int = 3, ngf: int = 64,
                 upsample: str = "transpose", *, fused: bool = True):
        super().__init__()
        levels = _levels(img_resolution)
        self.z_dim, self.img_resolution, self.fused = z_dim, img_resolution, fused
        width = ngf * 2 ** (levels - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(z_dim, width, 4, 1, 0, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU(True)]
        for _ in range(levels - 1):
            layers += [*_upsampling(width, width // 2, upsample), nn.BatchNorm2d(width // 2), nn.ReLU(True)]
            width //= 2
        layers += [*_upsampling(width, img_channels, upsample), nn.Tanh()]
        self.main = _finish(nn.Sequential(*layers), fused)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z.reshape(z.shape[0], self.z_dim, 1, 1))


class DCGANDiscriminator(nn.Module):
    """image -> one logit per sample: stride-2 4x4 convolutions with LeakyReLU(0.2) (BatchNorm after
    all but the first), then a 4x4 valid convolution. No sigmoid: pair it with a logits loss."""

    def __init__(self, img_resolution: int = 64, img_channels: int = 3, ndf: int = 64, *, fused: bool = True):
        super().__init__()
        levels = _levels(img_resolution)
        self.fused = fused
        layers: list[nn.Module] = [nn.Conv2d(img_channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        width = ndf
        for _ in range(levels - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2),
                       nn.LeakyReLU(0.2, True)]
            width *= 2
        layers += [nn.Conv2d(width, 1, 4, 1, 0, bias=False)]
        self.main = _finish(nn.Sequential(*layers), fused)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.main(img).flatten(1)


class Autoencoder(nn.Module):
    """A convolutional autoencoder: encoder of stride-2 convolutions with GroupNorm + SiLU down to
    latent_channels at R / 2^levels; decoder of nearest 2x + 3x3 convolutions with GroupNorm + SiLU
    (fused: UpsampleConv2d and GroupNormAct) back to the image."""

    def __init__(self, img_channels: int = 3, latent_channels: int = 4, widths: tuple[int, ...] = (32, 64, 128),
                 groups: int = 8, *, fused: bool = True):
        super().__init__()
        self.fused = fused
        enc: list[nn.Module] = [nn.Conv2d(img_channels, widths[0], 3, 1, 1)]
        for w_in, w_out in zip(widths, widths[1:]):
            enc += [nn.GroupNorm(groups, w_in), nn.SiLU(), nn.Conv2d(w_in, w_out, 4, 2, 1)]
        enc += [nn.GroupNorm(groups, widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], latent_channels, 3, 1, 1)]
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, widths[-1], 3, 1, 1)]
        for w_in, w_out in zip(widths[::-1], widths[::-1][1:]):
            dec += [nn.GroupNorm(groups, w_in), nn.SiLU(), nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(w_in, w_out, 3, 1, 1)]
        dec += [nn.GroupNorm(groups, widths[0]), nn.SiLU(), nn.Conv2d(widths[0], img_channels, 3, 1, 1)]
        self.encoder = _finish(nn.Sequential(*enc), fused)
        self.decoder = _finish(nn.Sequential(*dec), fused)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
