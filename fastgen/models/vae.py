"""A KL autoencoder with the architecture, configuration arguments and state dict keys of diffusers'
AutoencoderKL (Stable Diffusion's VAE): a Stable Diffusion VAE state dict loads unchanged, and
encode / decode return what diffusers returns (objects with `latent_dist` and `sample`).

Written from the published architecture (Rombach et al. 2022; diffusers' public configuration and
state dict layout): ResNet blocks of GroupNorm + SiLU + 3x3 conv, a single-head self-attention in
the middle (F.scaled_dot_product_attention), strided-conv downsampling, nearest 2x upsampling + conv,
and a diagonal Gaussian posterior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.models._blocks import Upsample, group_norm_act


class ResnetBlock(nn.Module):
    """norm1 + SiLU, conv1, norm2 + SiLU, conv2, plus a 1x1 conv_shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float, fused: bool):
        super().__init__()
        self.norm1, self.act1 = group_norm_act(groups, in_channels, eps, "silu", fused)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2, self.act2 = group_norm_act(groups, out_channels, eps, "silu", fused)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act1(self.norm1(x)))
        h = self.conv2(self.act2(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """GroupNorm, then single-head self-attention over the positions, then a residual add."""

    def __init__(self, channels: int, groups: int, eps: float, fused: bool):
        super().__init__()
        self.group_norm, _ = group_norm_act(groups, channels, eps, "identity", fused)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        t = self.group_norm(x).reshape(n, c, h * w).transpose(1, 2)  # (N, HW, C)
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # one head
        t = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        t = self.to_out[1](self.to_out[0](t))
        return x + t.transpose(1, 2).reshape(n, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, eps: float, fused: bool, attention: bool = True):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups, eps, fused)] if attention else [])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups, eps, fused) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Pad right and bottom by one, then a 3x3 stride-2 convolution (diffusers' Downsample2D, padding 0)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class ResnetStack(nn.Module):
    """`layers` ResNet blocks, then the resampler (if any) in a list under `kind`: diffusers'
    DownEncoderBlock2D (kind "downsamplers") and UpDecoderBlock2D (kind "upsamplers")."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, eps: float, kind: str,
                 resampler: nn.Module | None, fused: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, eps,
                                                  fused) for i in range(layers)])
        self.kind = kind
        setattr(self, kind, nn.ModuleList([] if resampler is None else [resampler]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in (*self.resnets, *getattr(self, self.kind)):
            x = module(x)
        return x


class Encoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, widths: tuple[int, ...], layers: int, groups: int,
                 fused: bool, mid_attention: bool = True, eps: float = 1e-6):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            ResnetStack(widths[max(i - 1, 0)], widths[i], layers, groups, eps, "downsamplers",
                        Downsample(widths[i]) if i < len(widths) - 1 else None, fused)
            for i in range(len(widths))])
        self.mid_block = MidBlock(widths[-1], groups, eps, fused, mid_attention)
        self.conv_norm_out, self.conv_act = group_norm_act(groups, widths[-1], eps, "silu", fused)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, widths: tuple[int, ...], layers: int, groups: int,
                 fused: bool, mid_attention: bool = True, eps: float = 1e-6):
        super().__init__()
        top = list(reversed(widths))
        self.conv_in = nn.Conv2d(in_channels, top[0], 3, padding=1)
        self.up_blocks = nn.ModuleList([  # registered before the mid block, as diffusers does
            ResnetStack(top[max(i - 1, 0)], top[i], layers + 1, groups, eps, "upsamplers",
                        Upsample(top[i], top[i], fused=fused) if i < len(top) - 1 else None, fused)
            for i in range(len(top))])
        self.mid_block = MidBlock(top[0], groups, eps, fused, mid_attention)
        self.conv_norm_out, self.conv_act = group_norm_act(groups, widths[0], eps, "silu", fused)
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The posterior N(mean, exp(logvar)) from the encoder's 2 * latent channels (logvar clamped to
    [-30, 20], as diffusers does)."""

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = self.logvar.clamp(-30.0, 20.0)
        self.std, self.var = torch.exp(0.5 * self.logvar), torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: Optional["DiagonalGaussian"] = None) -> torch.Tensor:
        """KL(self || N(0, 1)) (or || other), summed over (C, H, W), per sample."""
        if other is None:
            return 0.5 * torch.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=[1, 2, 3])


@dataclass
class EncoderOutput:
    latent_dist: DiagonalGaussian


@dataclass
class DecoderOutput:
    sample: torch.Tensor


class VAE(nn.Module):
    """diffusers' AutoencoderKL, from fastgen layers (fused=True) or the plain torch layers
    (fused=False); the same configuration arguments and state dict keys either way."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
                 up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",), block_out_channels: tuple[int, ...] = (64,),
                 layers_per_block: int = 1, act_fn: str = "silu", latent_channels: int = 4, norm_num_groups: int = 32,
                 sample_size: int = 32, scaling_factor: float = 0.18215, shift_factor: Optional[float] = None,
                 force_upcast: bool = True, use_quant_conv: bool = True, use_post_quant_conv: bool = True,
                 mid_block_add_attention: bool = True, *, fused: bool = True):
        super().__init__()
        widths = tuple(block_out_channels)
        if len(down_block_types) != len(widths) or len(up_block_types) != len(widths):
            raise ValueError(f"one block type per width: {len(widths)} widths, {len(down_block_types)} down and "
                             f"{len(up_block_types)} up block types")
        if set(down_block_types) != {"DownEncoderBlock2D"} or set(up_block_types) != {"UpDecoderBlock2D"}:
            raise ValueError("only DownEncoderBlock2D / UpDecoderBlock2D blocks (the Stable Diffusion VAE's)")
        if act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn must be 'silu' (the Stable Diffusion VAE's), got {act_fn!r}")
        if any(w % norm_num_groups for w in widths):
            raise ValueError(f"norm_num_groups {norm_num_groups} must divide every width {widths}")
        self.config = dict(in_channels=in_channels, out_channels=out_channels, down_block_types=tuple(down_block_types),
                           up_block_types=tuple(up_block_types), block_out_channels=widths,
                           layers_per_block=layers_per_block, act_fn=act_fn, latent_channels=latent_channels,
                           norm_num_groups=norm_num_groups, sample_size=sample_size, scaling_factor=scaling_factor,
                           shift_factor=shift_factor, force_upcast=force_upcast, use_quant_conv=use_quant_conv,
                           use_post_quant_conv=use_post_quant_conv, mid_block_add_attention=mid_block_add_attention)
        self.fused = fused
        self.encoder = Encoder(in_channels, 2 * latent_channels, widths, layers_per_block, norm_num_groups, fused,
                               mid_block_add_attention)
        self.decoder = Decoder(latent_channels, out_channels, widths, layers_per_block, norm_num_groups, fused,
                               mid_block_add_attention)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        posterior = DiagonalGaussian(moments)
        return EncoderOutput(posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        sample = self.decoder(z)
        return DecoderOutput(sample) if return_dict else (sample,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: Optional[torch.Generator] = None):
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict)
