"""Normalization + activation layers: drop-in for the torch norm layer followed by the activation."""

from __future__ import annotations

import torch
from torch import nn

from fastgen.ops._activation import activation_of, check_activation
from fastgen.ops.group_norm_act import group_norm_act


class GroupNormAct(nn.GroupNorm):
    """nn.GroupNorm(num_groups, num_channels, eps, affine) then the activation, fused. It is an
    nn.GroupNorm: same arguments first, same parameters and state_dict keys."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: str = "silu", negative_slope: float = 0.01, device=None, dtype=None):
        check_activation(activation, negative_slope)
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = negative_slope

    @classmethod
    def from_modules(cls, norm: nn.GroupNorm, act: nn.Module | None = None) -> "GroupNormAct":
        """Fuse an nn.GroupNorm and the activation layer after it; shares norm's parameters."""
        if not isinstance(norm, nn.GroupNorm):
            raise TypeError(f"norm must be an nn.GroupNorm, got {type(norm).__name__}")
        name, slope = activation_of(act)
        layer = cls(norm.num_groups, norm.num_channels, norm.eps, False, name, slope)
        layer.affine = norm.affine
        layer.weight, layer.bias = norm.weight, norm.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, self.activation,
                              self.negative_slope)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return f"{super().extra_repr()}, activation={self.activation!r}{slope}"
