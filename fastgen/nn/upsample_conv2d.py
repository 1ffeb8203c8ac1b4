"""UpsampleConv2d: nn.Upsample followed by nn.Conv2d, as one layer."""

from __future__ import annotations

import torch
from torch import nn

from fastgen.ops.upsample_conv2d import SCALES, upsample_conv2d


class UpsampleConv2d(nn.Conv2d):
    """nn.Upsample(scale_factor, mode) then nn.Conv2d(in_channels, out_channels, kernel_size,
    padding=padding), fused. It is an nn.Conv2d (stride 1, groups 1), so its parameters and
    state_dict keys are exactly nn.Conv2d's and an nn.Conv2d state dict loads directly.

    padding=None means kernel_size // 2 (the output is exactly scale_factor times larger).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, scale_factor: int = 2,
                 mode: str = "nearest", padding: int | None = None, bias: bool = True,
                 device=None, dtype=None):
        if not isinstance(kernel_size, int) or kernel_size % 2 == 0 or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        if mode not in SCALES or scale_factor not in SCALES[mode]:
            raise ValueError(f"mode={mode!r} with scale_factor={scale_factor!r} is not supported; "
                             f"supported: {SCALES}")
        pad = kernel_size // 2 if padding is None else padding
        super().__init__(in_channels, out_channels, kernel_size, padding=pad, bias=bias,
                         device=device, dtype=dtype)
        self.scale_factor = int(scale_factor)
        self.mode = mode

    @classmethod
    def from_modules(cls, upsample: nn.Upsample, conv: nn.Conv2d) -> "UpsampleConv2d":
        """Fuse an nn.Upsample and the nn.Conv2d after it; the new layer shares conv's parameters."""
        if not isinstance(upsample, nn.Upsample) or not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected (nn.Upsample, nn.Conv2d), got ({type(upsample).__name__}, "
                            f"{type(conv).__name__})")
        scale = upsample.scale_factor
        if upsample.size is not None or scale is None:
            raise ValueError("upsample must be given by scale_factor, not size")
        if isinstance(scale, tuple):
            if len(set(scale)) != 1:
                raise ValueError(f"upsample.scale_factor must be the same on both axes, got {scale}")
            scale = scale[0]
        if upsample.mode == "bilinear" and upsample.align_corners:
            raise ValueError("bilinear upsampling with align_corners=True is not supported")
        k = conv.kernel_size
        if (conv.stride, conv.dilation, conv.groups) != ((1, 1), (1, 1), 1) or k[0] != k[1] \
                or conv.padding_mode != "zeros" or not isinstance(conv.padding, tuple) \
                or conv.padding[0] != conv.padding[1]:
            raise ValueError(f"conv must be a stride-1, groups-1, square-kernel, symmetric zero-padded "
                             f"convolution, got {conv}")
        if scale != int(scale):
            raise ValueError(f"upsample.scale_factor must be an integer, got {scale}")
        layer = cls(conv.in_channels, conv.out_channels, k[0], int(scale), upsample.mode,
                    conv.padding[0], conv.bias is not None, device="meta")
        layer.weight = conv.weight
        layer.bias = conv.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_conv2d(x, self.weight, self.bias, scale_factor=self.scale_factor,
                               mode=self.mode, padding=self.padding[0])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale_factor={self.scale_factor}, mode={self.mode!r}"
