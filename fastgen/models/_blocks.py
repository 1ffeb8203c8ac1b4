"""Building blocks shared by the reference generators, each built fused (fastgen layers) or unfused
(the torch layers a user writes) with the same parameter and buffer names, so that one state dict
loads into both."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.activations import torch_layer
from fastgen.nn import GroupNormAct, UpsampleConv2d


def group_norm_act(num_groups: int, channels: int, eps: float, activation: str, fused: bool) -> tuple[nn.Module, nn.Module]:
    """(norm, activation) modules: fused, a GroupNormAct and an identity; unfused, nn.GroupNorm and
    the activation's torch layer. Either way the norm's state dict keys are nn.GroupNorm's."""
    if fused:
        return GroupNormAct(num_groups, channels, eps, activation=activation), nn.Identity()
    return nn.GroupNorm(num_groups, channels, eps), torch_layer(activation)


class Upsample(nn.Module):
    """Nearest 2x upsampling then a convolution (kernel k, padding k // 2), the convolution under
    `conv` (diffusers' Upsample2D names). Fused: one UpsampleConv2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, fused: bool = True):
        super().__init__()
        self.fused = fused
        conv = UpsampleConv2d if fused else nn.Conv2d
        self.conv = conv(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if self.fused else self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
