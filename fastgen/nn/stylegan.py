"""StyleGAN2's layers on fastgen's ops: bias + activation, FIR resampling, modulated convolution."""

from __future__ import annotations

import torch
from torch import nn

from fastgen.ops.bias_act import bias_act


class BiasAct(nn.Module):
    """A learned bias along `dim`, then StyleGAN2's activation, gain and clamp, fused
    (fastgen.ops.bias_act). State dict: `bias` (num_channels,), initialized to bias_init."""

    def __init__(self, num_channels: int, act: str = "linear", alpha: float | None = None, gain: float | None = None,
                 clamp: float | None = None, dim: int = 1, bias_init: float = 0.0):
        super().__init__()
        self.bias = nn.Parameter(torch.full((num_channels,), float(bias_init)))
        self.act, self.alpha, self.gain, self.clamp, self.dim = act, alpha, gain, clamp, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_act(x, self.bias.to(x.dtype), self.dim, self.act, self.alpha, self.gain, self.clamp)

    def extra_repr(self) -> str:
        return f"{self.bias.shape[0]}, act={self.act!r}, alpha={self.alpha}, gain={self.gain}, clamp={self.clamp}"
