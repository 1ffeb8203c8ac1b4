"""StyleGAN2's layers on fastgen's ops: bias + activation, FIR resampling, modulated convolution."""

from __future__ import annotations

import torch
from torch import nn

from fastgen.ops.bias_act import bias_act
from fastgen.ops.modulated_conv2d import modulated_conv2d
from fastgen.ops.upfirdn2d import resample_padding, setup_filter, upfirdn2d


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


class _FIRResample(nn.Module):
    """A FIR filter buffer `resample_filter` and a resampling factor."""

    def __init__(self, resample_filter=(1, 3, 3, 1), factor: int = 2, gain: float = 1.0):
        super().__init__()
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.factor, self.gain = factor, gain

    def extra_repr(self) -> str:
        return f"factor={self.factor}, filter={tuple(self.resample_filter.shape)}"


class Upsample2dFIR(_FIRResample):
    """StyleGAN2's upsample2d: zero insertion by `factor`, then the FIR filter with gain factor^2
    (fastgen.ops.upfirdn2d). Buffer `resample_filter`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.resample_filter
        return upfirdn2d(x, f, up=self.factor, padding=list(resample_padding(f, up=self.factor)),
                         gain=self.gain * self.factor ** 2)


class Downsample2dFIR(_FIRResample):
    """StyleGAN2's downsample2d: the FIR filter, then every factor-th pixel
    (fastgen.ops.upfirdn2d). Buffer `resample_filter`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.resample_filter
        return upfirdn2d(x, f, down=self.factor, padding=list(resample_padding(f, down=self.factor)), gain=self.gain)


class EqualizedLinear(nn.Module):
    """StyleGAN2's FullyConnectedLayer: weights stored N(0, 1) / lr_multiplier and scaled at run
    time by lr_multiplier / sqrt(in_features) (equalized learning rate), bias times lr_multiplier,
    then bias_act's activation. State dict: `weight` (out, in), `bias` (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "linear",
                 lr_multiplier: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init))) if bias else None
        self.activation = activation
        self.weight_gain = lr_multiplier / in_features ** 0.5
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = None if self.bias is None else self.bias.to(x.dtype) * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, activation={self.activation}"


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated convolution layer (the convolution of its SynthesisLayer): a style
    vector w through `affine` (an EqualizedLinear, bias initialized to 1) gives per-input-channel
    scales; the weight is modulated per sample, demodulated, and convolved with optional 2x up- or
    downsampling through the FIR filter (fastgen.ops.modulated_conv2d). As in StyleGAN2's synthesis
    layers, flip_weight = (up == 1): an upsampling layer's transposed convolution takes the weight
    as stored.
    State dict: `weight` (out, in, k, k), `affine.weight`, `affine.bias`, buffer `resample_filter`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int, demodulate: bool = True,
                 up: int = 1, down: int = 1, resample_filter=(1, 3, 3, 1)):
        super().__init__()
        self.affine = EqualizedLinear(style_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.demodulate, self.up, self.down, self.padding = demodulate, up, down, kernel_size // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool = True) -> torch.Tensor:
        styles = self.affine(w.to(x.dtype))
        return modulated_conv2d(x, self.weight.to(x.dtype), styles, self.demodulate, self.up, self.down,
                                self.resample_filter, self.padding, fused_modconv, flip_weight=self.up == 1)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, kernel_size={k}, demodulate={self.demodulate}, up={self.up}, down={self.down}"
