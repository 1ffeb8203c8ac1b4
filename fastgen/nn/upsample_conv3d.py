"""UpsampleConv3d: nearest upsampling of a clip (frames, rows, columns) then an nn.Conv3d, optionally
causal in time (diffusers' causal video convolutions), as one layer."""

from __future__ import annotations

import torch
from torch import nn

from fastgen.ops.upsample_conv3d import _triple, upsample_conv3d


class UpsampleConv3d(nn.Conv3d):
    """nn.Upsample(scale_factor, mode="nearest") then nn.Conv3d(in_channels, out_channels, kernel_size,
    padding=padding), fused. It is an nn.Conv3d (stride 1, groups 1): its parameters and state_dict
    keys are nn.Conv3d's, and an nn.Conv3d state dict loads directly.

    causal=True pads time at the front only, 2 * padding[0] frames (diffusers' WanCausalConv3d): each
    output frame sees no later input frame. padding=None means kernel_size // 2 per axis.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, scale_factor=2, padding=None,
                 bias: bool = True, causal: bool = False, device=None, dtype=None):
        ks = _triple("kernel_size", kernel_size, 1, 2 ** 10)
        self_pad = tuple(k // 2 for k in ks) if padding is None else _triple("padding", padding, 0, 2 ** 10)
        self.scale_factor = _triple("scale_factor", scale_factor, 1, 4)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        super().__init__(in_channels, out_channels, ks, padding=self_pad, bias=bias, device=device, dtype=dtype)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.padding
        pads = (pw, pw, ph, ph, 2 * pt, 0) if self.causal else (pw, pw, ph, ph, pt, pt)
        return upsample_conv3d(x, self.weight, self.bias, self.scale_factor, pads)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale_factor={self.scale_factor}, causal={self.causal}"
