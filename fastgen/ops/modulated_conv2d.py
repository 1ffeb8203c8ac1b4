"""modulated_conv2d: StyleGAN2's style-modulated, demodulated convolution with FIR resampling.

Not a custom op of its own, by design: its heavy part is a (grouped, possibly transposed or
strided) convolution, which cuDNN / oneDNN / XLA already do best, and its resampling is the
fastgen::upfirdn2d custom op. Written as that composition, it is differentiable to any order,
torch.compile traces it whole (fullgraph) and XLA lowers it, with no hand-written backward to get
wrong. `backend` picks the upfirdn2d kernels; "reference" runs modulated_conv2d_ref.

The fast path is StyleGAN2's: up=2 as a transposed convolution (stride 2, so the zero-inserted
image never exists) followed by the FIR filter; down=2 as the FIR filter followed by a strided
convolution; per-sample weights as one grouped convolution (fused_modconv) or the shared weight
with the activations scaled before and after (fused_modconv=False, better for large batches).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.dispatch import select
from fastgen.ops._registry import Example, OpSpec, define
from fastgen.ops._util import check_floating, check_tensor, memory_format
from fastgen.ops.upfirdn2d import SPEC as UPFIRDN2D
from fastgen.ops.upfirdn2d import _padding, check_filter, resample_padding, setup_filter, upfirdn2d, upfirdn2d_ref
_DEMOD_EPS = 1e-8


def modulated_conv2d(x: Tensor, weight: Tensor, styles: Tensor, demodulate: bool = True, up: int = 1, down: int = 1,
                     resample_filter: Tensor | None = None, padding=0, fused_modconv: bool = True,
                     flip_weight: bool = True, *, backend: str | None = None) -> Tensor:
    """StyleGAN2's modulated_conv2d (training/networks.py) with its conv2d_resample fast paths.
    See modulated_conv2d_ref for the semantics."""
    f, pad = _check_modulated_conv2d(x, weight, styles, demodulate, up, down, resample_filter, padding,
                                     fused_modconv, flip_weight)
    name = select(SPEC, x, backend)
    if name == "reference":
        return modulated_conv2d_ref(x, weight, styles, demodulate, up, down, resample_filter, padding, flip_weight)
    fir = functools.partial(upfirdn2d, backend=name)
    return _modulated_conv2d(x, weight, styles, demodulate, up, down, f, pad, fused_modconv, flip_weight, fir)


def _modulated_conv2d(x, weight, styles, demodulate, up, down, f, pad, fused_modconv, flip_weight, fir):
    """StyleGAN2's modulated_conv2d, its FIR filtering done by fir(t, f, up=, down=, padding=, gain=)
    (the benchmarks pass upfirdn2d_ref to time StyleGAN2's own formulation)."""
    n = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    if x.dtype == torch.float16 and demodulate:
        # StyleGAN2's fp16 guard: scale weight and styles to max |.| = 1 first (demodulation
        # cancels it) so that the squared sums below cannot overflow
        weight = weight * (1 / (in_channels * kh * kw) ** 0.5 / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)
    w = weight.unsqueeze(0) * styles.reshape(n, 1, -1, 1, 1)  # (N, O, I, k, k)
    dcoefs = (w.square().sum(dim=[2, 3, 4]) + _DEMOD_EPS).rsqrt() if demodulate else None  # (N, O)
    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(n, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), f, up, down, pad, 1, flip_weight, fir)
        return x * dcoefs.to(x.dtype).reshape(n, -1, 1, 1) if demodulate else x
    if demodulate:
        w = w * dcoefs.reshape(n, -1, 1, 1, 1)
    fmt = memory_format(x)
    y = conv2d_resample(x.reshape(1, -1, *x.shape[2:]), w.reshape(-1, in_channels, kh, kw).to(x.dtype), f, up,
                         down, pad, n, flip_weight, fir)
    return y.reshape(n, -1, *y.shape[2:]).contiguous(memory_format=fmt)


def modulated_conv2d_ref(x: Tensor, weight: Tensor, styles: Tensor, demodulate: bool = True, up: int = 1,
                         down: int = 1, resample_filter: Tensor | None = None, padding=0,
                         flip_weight: bool = True) -> Tensor:
    """The modulated convolution, written out the plain way (StyleGAN2's generic conv2d_resample).

    1. w[n] = weight * styles[n] (over input channels)                          (N, O, I, kh, kw)
    2. if demodulate: w[n, o] = w[n, o] / sqrt(sum(w[n, o]^2) + 1e-8)
    3. pad: padding (the convolution's) plus, for up > 1, ((f + up - 1) // 2, (f - up) // 2) per
       side and, for down > 1, ((f - down + 1) // 2, (f - down) // 2) (upfirdn2d.resample_padding)
    4. up > 1: x = upfirdn2d_ref(x, f, up=up, padding=pad, gain=up^2)  (the zero-inserted image)
       else:   x = zero-padded by pad
    5. y[n] = conv2d(x[n], w[n]) (valid; correlation, or convolution when flip_weight is False)
    6. down > 1: y = upfirdn2d_ref(y, f, down=down)

    Args:
        x:               (N, I, H, W) floating point, NCHW or channels_last.
        weight:          (O, I, kh, kw), x's dtype and device.
        styles:          (N, I), the per-sample scales of the input channels.
        up, down:        1 or 2 (any int >= 1 works).
        resample_filter: the FIR filter for up/down (a 2-D filter or a 1-D separable one; StyleGAN2
                         uses the normalized outer product of [1, 3, 3, 1]); required when up or
                         down > 1.
        padding:         int, [px, py] or [px0, px1, py0, py1]: the convolution's zero padding.
        flip_weight:     True: F.conv2d's correlation (StyleGAN2's default); StyleGAN2's synthesis
                         layers pass flip_weight=(up == 1).
    Returns:
        (N, O, OH, OW); OH = H * up / down for padding = k // 2 and StyleGAN2's 4-tap filter.
    """
    _check_modulated_conv2d(x, weight, styles, demodulate, up, down, resample_filter, padding, True, flip_weight)
    f = torch.ones(1, 1, device=x.device) if resample_filter is None else resample_filter
    padding = [padding] * 2 if isinstance(padding, int) else padding
    pad = [padding[0], padding[0], padding[1], padding[1]] if len(padding) == 2 else padding
    n = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    w = weight.unsqueeze(0) * styles.reshape(n, 1, -1, 1, 1)
    if demodulate:
        w = w * (w.square().sum(dim=[2, 3, 4], keepdim=True) + _DEMOD_EPS).rsqrt()
    if not flip_weight:
        w = w.flip([3, 4])
    p = list(pad)  # step 3, per axis (x, then y): the filter centred on the resampled image
    for axis, taps in ((0, f.shape[-1]), (2, f.shape[0])):
        if up > 1:
            p[axis], p[axis + 1] = p[axis] + (taps + up - 1) // 2, p[axis + 1] + (taps - up) // 2
        if down > 1:
            p[axis], p[axis + 1] = p[axis] + (taps - down + 1) // 2, p[axis + 1] + (taps - down) // 2
    if up > 1:
        x = upfirdn2d_ref(x, f, up=up, padding=p, gain=up ** 2)
    else:
        x = F.pad(x, p)
    y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), w.reshape(-1, in_channels, kh, kw), groups=n)
    y = y.reshape(n, -1, *y.shape[2:])
    if down > 1:
        y = upfirdn2d_ref(y, f, down=down)
    return y


def _check_modulated_conv2d(x, weight, styles, demodulate, up, down, f, padding, fused_modconv, flip_weight):
    """Validates; returns (f, (px0, px1, py0, py1))."""
    check_tensor("x", x, dim=4)
    check_floating("x", x)
    check_tensor("weight", weight, dim=4)
    check_tensor("styles", styles, dim=2)
    if weight.shape[1] != x.shape[1]:
        raise RuntimeError(f"weight must be (O, {x.shape[1]}, kh, kw) for x's {x.shape[1]} channels, "
                           f"got {tuple(weight.shape)}")
    if tuple(styles.shape) != (x.shape[0], x.shape[1]):
        raise RuntimeError(f"styles must be ({x.shape[0]}, {x.shape[1]}), got {tuple(styles.shape)}")
    for name, t in (("weight", weight), ("styles", styles)):
        if t.device != x.device or t.dtype != x.dtype:
            raise RuntimeError(f"{name} must have x's dtype and device ({x.dtype}, {x.device}), got {t.dtype}, {t.device}")
    for name, v in (("up", up), ("down", down)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    for name, v in (("demodulate", demodulate), ("fused_modconv", fused_modconv), ("flip_weight", flip_weight)):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be a bool, got {v!r}")
    if (up > 1 or down > 1) and f is None:
        raise ValueError("resample_filter is required when up or down > 1 (StyleGAN2: [1, 3, 3, 1])")
    pad = _padding(padding)
    if f is None:
        return torch.ones(1, 1, dtype=torch.float32, device=x.device), pad
    check_filter("resample_filter", f, x.device)
    return f, pad


def _conv(x: Tensor, w: Tensor, groups: int, flip_weight: bool, stride: int = 1, padding=0,
          transpose: bool = False) -> Tensor:
    if not flip_weight:
        w = w.flip([2, 3])
    if transpose:
        return F.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)
    return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def conv2d_resample(x, w, f, up, down, pad, groups, flip_weight, upfirdn):
    """StyleGAN2's conv2d_resample fast paths, the FIR filtering through upfirdn (fastgen::upfirdn2d)."""
    out_channels, in_per_group, kh, kw = w.shape
    px0, px1, py0, py1 = resample_padding(f, up, down, pad)

    def fir(t, **resampling):
        return upfirdn(t, f, **resampling)

    if kh == 1 and kw == 1 and down > 1 and up == 1:  # 1x1: downsample first, then convolve
        return _conv(fir(x, down=down, padding=[px0, px1, py0, py1]), w, groups, flip_weight)
    if kh == 1 and kw == 1 and up > 1 and down == 1:  # 1x1: convolve first, then upsample
        return fir(_conv(x, w, groups, flip_weight), up=up, padding=[px0, px1, py0, py1], gain=up ** 2)
    if down > 1 and up == 1:  # filter, then a strided convolution
        return _conv(fir(x, padding=[px0, px1, py0, py1]), w, groups, flip_weight, stride=down)
    if up > 1:  # a transposed convolution (no zero insertion), then the filter
        w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
        w = w.reshape(groups * in_per_group, out_channels // groups, kh, kw)
        px0, px1, py0, py1 = px0 - (kw - 1), px1 - (kw - up), py0 - (kh - 1), py1 - (kh - up)
        pxt, pyt = max(min(-px0, -px1), 0), max(min(-py0, -py1), 0)
        x = _conv(x, w, groups, not flip_weight, stride=up, padding=[pyt, pxt], transpose=True)
        x = fir(x, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt], gain=up ** 2)
        return fir(x, down=down) if down > 1 else x
    if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:  # a plain convolution
        return _conv(x, w, groups, flip_weight, padding=[py0, px0])
    x = F.pad(x, [px0, px1, py0, py1])  # asymmetric or negative padding
    return _conv(x, w, groups, flip_weight)


# A composition: its backends are upfirdn2d's (the FIR kernels), selected under its own name; its auto
# order is the usual one (its reference is the slow plain formulation, never worth taking).
SPEC = define(OpSpec(
    name="modulated_conv2d", public=modulated_conv2d, impls=UPFIRDN2D.impls,
    examples=(Example("modulated_conv2d_up2", lambda: (torch.randn(2, 4, 6, 6), torch.randn(3, 4, 3, 3),
                                                       torch.randn(2, 4) + 1),
                      {"up": 2, "resample_filter": setup_filter((1, 3, 3, 1)), "padding": 1}, (0, 1, 2)),),
))
