"""StyleGAN2's generator (Karras et al. 2020, configs E-F) on fastgen's ops, with the constructor
arguments, parameter and buffer names and forward signature of the official StyleGAN2-ADA /
StyleGAN3 `networks_stylegan2.Generator`: a trained generator's state dict loads unchanged
(strict=True) and draws the same images.

Written from the paper and that public interface: a mapping network (pixel norm of z, eight
equalized-lr fully connected layers with lrelu, the tracked average w for truncation), and a
synthesis network of blocks per resolution: a learned constant (4x4) or a modulated 3x3
convolution with 2x FIR upsampling, a second modulated convolution, per-pixel noise times a learned
strength, bias + lrelu * sqrt(2) clamped to +-conv_clamp (bias_act), and a 1x1 modulated toRGB whose
image is added to the FIR-upsampled image of the blocks below (the skip architecture).

fused=True runs fastgen's fast backends (`auto`); fused=False runs every op's reference (the
published formulation in plain torch) under `fastgen.use_backend("reference")`.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from fastgen.activations import activation as activation_row
from fastgen.dispatch import use_backend
from fastgen.nn import EqualizedLinear, ModulatedConv2d
from fastgen.ops import bias_act, modulated_conv2d, pixel_norm, upfirdn2d
from fastgen.ops.modulated_conv2d import conv2d_resample
from fastgen.ops.upfirdn2d import resample_padding, setup_filter



def activation_gain(name: str) -> float:
    """StyleGAN2's default gain of an activation (sqrt 2 for relu, lrelu, swish)."""
    return activation_row(name).gain


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """StyleGAN2 computes in float32 (float16 in its fp16 blocks on CUDA) whatever the parameters'
    dtype; a float64 model (a test oracle) stays in float64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _modulated(layer, x: torch.Tensor, w: torch.Tensor, demodulate: bool, fused_modconv: bool, style_gain: float = 1.0):
    """A synthesis layer's modulated convolution as the official code computes it: the style affine
    and the demodulation coefficients in the parameters' precision (float32), whatever x's; in an
    fp16 block only the convolution runs in float16, after the official pre-normalization of weight
    and styles (max-abs, against fp16 overflow; demodulation cancels it), its output scaled by the
    float32 coefficients (the official non-fused form: the scale commutes with the FIR filter)."""
    up, f = layer.up, getattr(layer, "resample_filter", None)
    if x.dtype != torch.float16 or layer.weight.dtype == torch.float16:  # not an fp16 block: all in x's dtype
        styles = layer.affine(w.to(x.dtype)) * style_gain
        return modulated_conv2d(x, layer.weight.to(x.dtype), styles, demodulate, up, 1, f, layer.padding,
                                fused_modconv, flip_weight=up == 1)
    styles = layer.affine(w.to(layer.weight.dtype)) * style_gain
    weight, dcoefs = layer.weight, None
    if demodulate:
        weight = weight * (1 / math.sqrt(weight[0].numel()) / weight.abs().amax(dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.abs().amax(dim=1, keepdim=True)
        dcoefs = ((weight.unsqueeze(0) * styles[:, None, :, None, None]).square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
    y = modulated_conv2d(x, weight.to(x.dtype), styles.to(x.dtype), False, up, 1, f, layer.padding, fused_modconv,
                         flip_weight=up == 1)
    return y if dcoefs is None else y * dcoefs.to(x.dtype)[:, :, None, None]


class MappingNetwork(nn.Module):
    """z (and a class label c) -> w, broadcast to num_ws copies; truncation towards w_avg."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int | None, num_layers: int = 8,
                 embed_features: int | None = None, layer_features: int | None = None, activation: str = "lrelu",
                 lr_multiplier: float = 0.01, w_avg_beta: float | None = 0.998):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.num_layers, self.w_avg_beta = num_layers, w_avg_beta
        embed_features = 0 if c_dim == 0 else (w_dim if embed_features is None else embed_features)
        layer_features = w_dim if layer_features is None else layer_features
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = EqualizedLinear(c_dim, embed_features)
        for i in range(num_layers):
            setattr(self, f"fc{i}", EqualizedLinear(features[i], features[i + 1], activation=activation,
                                                    lr_multiplier=lr_multiplier))
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z, c, truncation_psi: float = 1, truncation_cutoff: int | None = None,
                update_emas: bool = False) -> torch.Tensor:
        x = None
        dtype = _compute_dtype(self.fc0.weight)
        if self.z_dim > 0:
            x = pixel_norm(z.to(dtype), 1e-8)  # StyleGAN2's normalize_2nd_moment
        if self.c_dim > 0:
            y = pixel_norm(self.embed(c.to(dtype)), 1e-8)
            x = y if x is None else torch.cat([x, y], dim=1)
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        if update_emas and self.w_avg_beta is not None:
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x = x.clone()
                x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
        return x


class SynthesisLayer(ModulatedConv2d):
    """A modulated convolution (2x upsampling when up=2), per-pixel noise, then bias + lrelu * gain
    clamped to +-conv_clamp. Adds to ModulatedConv2d's names `noise_strength`, `noise_const`, `bias`."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, kernel_size: int = 3,
                 up: int = 1, use_noise: bool = True, activation: str = "lrelu", resample_filter=(1, 3, 3, 1),
                 conv_clamp: float | None = None, channels_last: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, w_dim, True, up, 1, resample_filter)
        if channels_last:
            self.weight.data = self.weight.data.contiguous(memory_format=torch.channels_last)
        self.resolution, self.use_noise, self.activation, self.conv_clamp = resolution, use_noise, activation, conv_clamp
        if use_noise:
            self.register_buffer("noise_const", torch.randn(resolution, resolution))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x, w, noise_mode: str = "random", fused_modconv: bool = True, gain: float = 1):
        if noise_mode not in ("random", "const", "none"):
            raise ValueError(f"noise_mode must be 'random', 'const' or 'none', got {noise_mode!r}")
        x = _modulated(self, x, w, True, fused_modconv)
        if self.use_noise and noise_mode == "random":
            x = x + torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device,
                                dtype=x.dtype) * self.noise_strength.to(x.dtype)
        elif self.use_noise and noise_mode == "const":
            x = x + (self.noise_const * self.noise_strength).to(x.dtype)
        clamp = None if self.conv_clamp is None else self.conv_clamp * gain
        return bias_act(x, self.bias.to(x.dtype), act=self.activation, gain=activation_gain(self.activation) * gain,
                        clamp=clamp)


class ToRGBLayer(ModulatedConv2d):
    """A 1x1 modulated convolution without demodulation (styles scaled by 1/sqrt(in)), bias, clamp."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1,
                 conv_clamp: float | None = None, channels_last: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, w_dim, False)
        del self.resample_filter  # StyleGAN2's toRGB layer has none
        if channels_last:
            self.weight.data = self.weight.data.contiguous(memory_format=torch.channels_last)
        self.conv_clamp = conv_clamp
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x, w, fused_modconv: bool = True):
        x = _modulated(self, x, w, False, fused_modconv, self.weight_gain)
        return bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the skip architecture: (const | conv0 with 2x up), conv1, toRGB added to
    the upsampled image. fp16 on CUDA when use_fp16, as StyleGAN2 does (fp32 elsewhere)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 is_last: bool, architecture: str = "skip", resample_filter=(1, 3, 3, 1), conv_clamp: float | None = 256,
                 use_fp16: bool = False, fp16_channels_last: bool = False, fused_modconv_default=True,
                 **layer_kwargs):
        super().__init__()
        if architecture != "skip":
            raise NotImplementedError(f"architecture={architecture!r}: fastgen's StyleGAN2 generator is the skip "
                                      f"architecture (config F)")
        self.in_channels, self.w_dim, self.resolution, self.img_channels = in_channels, w_dim, resolution, img_channels
        self.is_last, self.architecture, self.use_fp16 = is_last, architecture, use_fp16
        self.channels_last = use_fp16 and fp16_channels_last
        self.fused_modconv_default = fused_modconv_default
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_conv, self.num_torgb = 0, 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2,
                                        resample_filter=resample_filter, conv_clamp=conv_clamp,
                                        channels_last=self.channels_last, **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp,
                                    channels_last=self.channels_last, **layer_kwargs)
        self.num_conv += 1
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp,
                                channels_last=self.channels_last)
        self.num_torgb += 1

    def forward(self, x, img, ws, force_fp32: bool = False, fused_modconv=None, update_emas: bool = False,
                **layer_kwargs):
        w_iter = iter(ws.unbind(dim=1))
        force_fp32 = force_fp32 or ws.device.type != "cuda"
        compute = _compute_dtype(self.conv1.weight)
        dtype = torch.float16 if self.use_fp16 and not force_fp32 and compute != torch.float64 else compute
        fmt = torch.channels_last if self.channels_last and not force_fp32 else torch.contiguous_format
        if fused_modconv is None:
            fused_modconv = self.fused_modconv_default
        if fused_modconv == "inference_only":
            fused_modconv = not self.training
        if self.in_channels == 0:
            x = self.const.to(dtype=dtype, memory_format=fmt).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
        else:
            x = x.to(dtype=dtype, memory_format=fmt)
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
        if img is not None:  # StyleGAN2's upsample2d: zero insertion, the filter centred, gain 4
            f = self.resample_filter
            img = upfirdn2d(img, f, up=2, padding=list(resample_padding(f, up=2)), gain=4)
        y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv)
        y = y.to(dtype=compute, memory_format=torch.contiguous_format)
        return x, y if img is None else img + y


class SynthesisNetwork(nn.Module):
    """Blocks b4, b8, ..., b<img_resolution>; channels min(channel_base / res, channel_max); fp16 in
    the num_fp16_res highest resolutions (on CUDA)."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, channel_base: int = 32768,
                 channel_max: int = 512, num_fp16_res: int = 4, **block_kwargs):
        super().__init__()
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ValueError(f"img_resolution must be a power of 2, at least 4, got {img_resolution}")
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.img_resolution_log2 = int(math.log2(img_resolution))
        self.num_fp16_res = num_fp16_res
        self.block_resolutions = [2 ** i for i in range(2, self.img_resolution_log2 + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        fp16_resolution = max(2 ** (self.img_resolution_log2 + 1 - num_fp16_res), 8)
        self.num_ws = 0
        for res in self.block_resolutions:
            is_last = res == img_resolution
            block = SynthesisBlock(channels[res // 2] if res > 4 else 0, channels[res], w_dim, res, img_channels,
                                   is_last, use_fp16=res >= fp16_resolution, **block_kwargs)
            self.num_ws += block.num_conv + (block.num_torgb if is_last else 0)
            setattr(self, f"b{res}", block)

    def forward(self, ws, **block_kwargs):
        if ws.dim() != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise RuntimeError(f"ws must be (N, {self.num_ws}, {self.w_dim}), got {tuple(ws.shape)}")
        ws = ws.to(_compute_dtype(self.b4.conv1.weight))
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            cur = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)  # toRGB shares the next block's w
            w_idx += block.num_conv
            x, img = block(x, img, cur, **block_kwargs)
        return img


class StyleGAN2Generator(nn.Module):
    """networks_stylegan2.Generator: forward(z, c, truncation_psi=1, truncation_cutoff=None,
    update_emas=False, noise_mode='random'|'const'|'none', force_fp32=False, fused_modconv=None).
    The same state dict as the official generator; `fused` picks fastgen's backends or the references."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, img_resolution: int, img_channels: int,
                 mapping_kwargs: dict | None = None, *, fused: bool = True, **synthesis_kwargs):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels, self.fused = img_resolution, img_channels, fused
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, img_channels, **synthesis_kwargs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, c_dim, w_dim, self.num_ws, **(mapping_kwargs or {}))

    def forward(self, z, c, truncation_psi: float = 1, truncation_cutoff: int | None = None, update_emas: bool = False,
                **synthesis_kwargs):
        with contextlib.nullcontext() if self.fused else use_backend("reference"):
            ws = self.mapping(z, c, truncation_psi, truncation_cutoff, update_emas)
            return self.synthesis(ws, update_emas=update_emas, **synthesis_kwargs)


# ---------------------------------------------------------------------------------------------
# the discriminator (residual architecture, StyleGAN2's config F), for training

class Conv2dLayer(nn.Module):
    """An equalized-lr convolution (weights scaled by 1/sqrt(fan_in) at run time) with optional 2x
    FIR down- or upsampling (StyleGAN2's conv2d_resample), then bias + activation * gain, clamped."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: str = "linear", up: int = 1, down: int = 1, resample_filter=(1, 3, 3, 1),
                 conv_clamp: float | None = None, channels_last: bool = False):
        super().__init__()
        self.activation, self.up, self.down, self.conv_clamp = activation, up, down, conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)
        self.act_gain = activation_gain(activation)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size).to(memory_format=fmt))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x, gain: float = 1):
        w = (self.weight * self.weight_gain).to(x.dtype)
        x = conv2d_resample(x, w, self.resample_filter, self.up, self.down, (self.padding,) * 4, 1, self.up == 1,
                            upfirdn2d)
        clamp = None if self.conv_clamp is None else self.conv_clamp * gain
        b = None if self.bias is None else self.bias.to(x.dtype)
        return bias_act(x, b, act=self.activation, gain=self.act_gain * gain, clamp=clamp)


class DiscriminatorBlock(nn.Module):
    """fromRGB (the first block), conv0, conv1 with 2x downsampling, and a 1x1 downsampling skip,
    the two branches summed with gain sqrt(1/2)."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, resolution: int, img_channels: int,
                 first_layer_idx: int = 0, architecture: str = "resnet", activation: str = "lrelu",
                 resample_filter=(1, 3, 3, 1), conv_clamp: float | None = None, use_fp16: bool = False,
                 fp16_channels_last: bool = False):
        super().__init__()
        if architecture != "resnet":
            raise NotImplementedError(f"architecture={architecture!r}: fastgen's StyleGAN2 discriminator is the "
                                      f"residual architecture (config F)")
        self.in_channels, self.resolution, self.img_channels = in_channels, resolution, img_channels
        self.first_layer_idx, self.architecture, self.use_fp16 = first_layer_idx, architecture, use_fp16
        self.channels_last = use_fp16 and fp16_channels_last
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        common = dict(activation=activation, conv_clamp=conv_clamp, channels_last=self.channels_last)
        self.num_layers = 0
        if in_channels == 0:
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, 1, **common)
            self.num_layers += 1
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, **common)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, 3, down=2, resample_filter=resample_filter, **common)
        self.skip = Conv2dLayer(tmp_channels, out_channels, 1, bias=False, down=2, resample_filter=resample_filter,
                                channels_last=self.channels_last)
        self.num_layers += 3

    def forward(self, x, img, force_fp32: bool = False):
        device = (x if x is not None else img).device
        compute = _compute_dtype(self.conv0.weight)
        dtype = torch.float16 if self.use_fp16 and not force_fp32 and device.type == "cuda" \
            and compute != torch.float64 else compute
        fmt = torch.channels_last if self.channels_last and dtype == torch.float16 else torch.contiguous_format
        if x is not None:
            x = x.to(dtype=dtype, memory_format=fmt)
        if self.in_channels == 0:
            y = self.fromrgb(img.to(dtype=dtype, memory_format=fmt))
            x = y if x is None else x + y
            img = None
        y = self.skip(x, gain=math.sqrt(0.5))
        x = self.conv1(self.conv0(x), gain=math.sqrt(0.5))
        return y + x, img


class MinibatchStdLayer(nn.Module):
    """Appends the standard deviation across groups of group_size samples (averaged over channel
    groups and pixels) as num_channels extra feature maps."""

    def __init__(self, group_size: int | None, num_channels: int = 1):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x):
        n, c, h, w = x.shape
        g = min(self.group_size, n) if self.group_size is not None else n
        f = self.num_channels
        y = x.reshape(g, -1, f, c // f, h, w)
        y = (y - y.mean(dim=0)).square().mean(dim=0)
        y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4]).reshape(-1, f, 1, 1)
        return torch.cat([x, y.repeat(g, 1, h, w)], dim=1)


class DiscriminatorEpilogue(nn.Module):
    """The 4x4 end: minibatch stddev, a 3x3 conv, a fully connected layer, the output (projected on
    the mapped class label when conditional)."""

    def __init__(self, in_channels: int, cmap_dim: int, resolution: int, img_channels: int,
                 architecture: str = "resnet", mbstd_group_size: int | None = 4, mbstd_num_channels: int = 1,
                 activation: str = "lrelu", conv_clamp: float | None = None):
        super().__init__()
        self.in_channels, self.cmap_dim, self.resolution, self.img_channels = in_channels, cmap_dim, resolution, img_channels
        self.architecture = architecture
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, 3, activation=activation,
                                conv_clamp=conv_clamp)
        self.fc = EqualizedLinear(in_channels * resolution ** 2, in_channels, activation=activation)
        self.out = EqualizedLinear(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x, img, cmap, force_fp32: bool = False):
        x = x.to(dtype=_compute_dtype(self.conv.weight), memory_format=torch.contiguous_format)
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.out(self.fc(self.conv(x).flatten(1)))
        if self.cmap_dim > 0:
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / math.sqrt(self.cmap_dim))
        return x


class StyleGAN2Discriminator(nn.Module):
    """networks_stylegan2.Discriminator (residual): blocks b<img_resolution> .. b8, the epilogue b4,
    and for class labels a mapping network; forward(img, c) -> one logit per sample."""

    def __init__(self, c_dim: int, img_resolution: int, img_channels: int, architecture: str = "resnet",
                 channel_base: int = 32768, channel_max: int = 512, num_fp16_res: int = 4,
                 conv_clamp: float | None = 256, cmap_dim: int | None = None, block_kwargs: dict | None = None,
                 mapping_kwargs: dict | None = None, epilogue_kwargs: dict | None = None, *, fused: bool = True):
        super().__init__()
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ValueError(f"img_resolution must be a power of 2, at least 4, got {img_resolution}")
        self.c_dim, self.img_resolution, self.img_channels, self.fused = c_dim, img_resolution, img_channels, fused
        self.img_resolution_log2 = int(math.log2(img_resolution))
        self.block_resolutions = [2 ** i for i in range(self.img_resolution_log2, 2, -1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions + [4]}
        fp16_resolution = max(2 ** (self.img_resolution_log2 + 1 - num_fp16_res), 8)
        cmap_dim = 0 if c_dim == 0 else (channels[4] if cmap_dim is None else cmap_dim)
        common = dict(img_channels=img_channels, architecture=architecture, conv_clamp=conv_clamp)
        layer_idx = 0
        for res in self.block_resolutions:
            block = DiscriminatorBlock(channels[res] if res < img_resolution else 0, channels[res], channels[res // 2],
                                       res, first_layer_idx=layer_idx, use_fp16=res >= fp16_resolution,
                                       **(block_kwargs or {}), **common)
            setattr(self, f"b{res}", block)
            layer_idx += block.num_layers
        if c_dim > 0:
            self.mapping = MappingNetwork(0, c_dim, cmap_dim, None, w_avg_beta=None, **(mapping_kwargs or {}))
        self.b4 = DiscriminatorEpilogue(channels[4], cmap_dim, 4, **(epilogue_kwargs or {}), **common)

    def forward(self, img, c, update_emas: bool = False, **block_kwargs):
        with contextlib.nullcontext() if self.fused else use_backend("reference"):
            x = None
            for res in self.block_resolutions:
                x, img = getattr(self, f"b{res}")(x, img, **block_kwargs)
            cmap = self.mapping(None, c) if self.c_dim > 0 else None
            return self.b4(x, img, cmap)
