"""fastgen::upfirdn2d: upsample by zero insertion, pad, FIR filter, downsample (StyleGAN2's resampling).

Eager (the reference) materializes the zero-inserted image (up^2 times the input) and filters every
pixel that the downsampling then throws away. The composite runs a depthwise transposed convolution
for up > 1 (no zero insertion) and a strided depthwise convolution for down > 1; the kernels compute
each output pixel directly from the input pixels its filter taps land on. The gradient is upfirdn2d
itself (filter flipped, up and down swapped), so gradients of any order come for free.
Kernels: csrc/upfirdn2d.{cpp,cu} (C++ CPU and CUDA), kernels/upfirdn2d.py (Triton).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.dispatch import _INTERPRET, select
from fastgen.ops._registry import KERNELS_FIRST, NO_FLOAT64, Example, Impl, OpSpec, call, cpp_impls, define
from fastgen.ops._util import check_floating, check_tensor, memory_format, opmath_dtype


def upfirdn2d(x: Tensor, f: Tensor | None, up=1, down=1, padding=0, flip_filter: bool = False, gain: float = 1.0,
              *, backend: str | None = None) -> Tensor:
    """Upsample, pad, FIR-filter and downsample x without materializing the upsampled image.
    See upfirdn2d_ref."""
    f, (upx, upy), (downx, downy), pad = _check_upfirdn2d(x, f, up, down, padding, flip_filter, gain)
    # auto's size class: upsampling (measured apart: bench-cpu.json)
    name = select(SPEC, x, backend, variant="up" if max(upx, upy) > 1 else None)
    if name == "reference":
        return upfirdn2d_ref(x, f, up, down, padding, flip_filter, gain)
    return call(SPEC, x, f, [upx, upy], [downx, downy], list(pad), flip_filter, float(gain), name)


def upfirdn2d_ref(x: Tensor, f: Tensor | None, up=1, down=1, padding=0, flip_filter: bool = False,
                  gain: float = 1.0) -> Tensor:
    """StyleGAN2's upfirdn2d (torch_utils/ops/upfirdn2d.py), written out in plain torch ops.

    1. zero insertion: x (N, C, H, W) -> (N, C, H*upy, W*upx), x[i, j] at (i*upy, j*upx), zeros elsewhere
    2. pad by (padx0, padx1, pady0, pady1) zeros; a negative amount crops
    3. filter: f scaled by gain ** (f.ndim / 2), flipped unless flip_filter (a true convolution),
       applied per channel as a 2-D (fh, fw) kernel, or for a 1-D (k,) filter along H then along W
    4. keep every downy-th row and downx-th column, starting at 0

    Args:
        x:           (N, C, H, W) floating point, NCHW or channels_last.
        f:           (fh, fw) or (k,) (separable) float filter, or None for [[1]]; no gradient flows to it.
        up, down:    int, or [x, y] per axis; >= 1.
        padding:     int, [px, py], or [px0, px1, py0, py1]; negative crops.
        flip_filter: False: convolution (StyleGAN2's default); True: correlation.
        gain:        the filter's overall gain (up**2 to keep the mean when upsampling).
    Returns:
        (N, C, (H*upy + py0 + py1 - fh) // downy + 1, (W*upx + px0 + px1 - fw) // downx + 1),
        in x's memory format.
    """
    _check_upfirdn2d(x, f, up, down, padding, flip_filter, gain)
    f = torch.ones(1, 1, device=x.device) if f is None else f
    upx, upy = (up, up) if isinstance(up, int) else up
    downx, downy = (down, down) if isinstance(down, int) else down
    padding = [padding] * 2 if isinstance(padding, int) else padding
    px0, px1, py0, py1 = [padding[0], padding[0], padding[1], padding[1]] if len(padding) == 2 else padding
    n, c, h, w = x.shape
    x = x.reshape(n, c, h, 1, w, 1)
    x = F.pad(x, [0, upx - 1, 0, 0, 0, upy - 1]).reshape(n, c, h * upy, w * upx)
    x = F.pad(x, [px0, px1, py0, py1])  # negative amounts crop
    f = (f * gain ** (f.dim() / 2)).to(x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.dim())))
    if f.dim() == 2:
        x = F.conv2d(x, f.expand(c, 1, *f.shape), groups=c)
    else:
        x = F.conv2d(x, f.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        x = F.conv2d(x, f.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return x[:, :, ::downy, ::downx]


def _pair(name: str, v) -> tuple[int, int]:
    """(x, y) from an int or an [x, y] pair, each an int >= 1."""
    pair = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v) if isinstance(v, (list, tuple)) else None
    if pair is None or len(pair) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in pair):
        raise ValueError(f"{name} must be an int >= 1 or an [x, y] pair of them, got {v!r}")
    return pair


def _padding(v) -> tuple[int, int, int, int]:
    """(px0, px1, py0, py1) from an int, [px, py] or [px0, px1, py0, py1]."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v, v, v, v
    if isinstance(v, (list, tuple)) and all(isinstance(p, int) and not isinstance(p, bool) for p in v):
        if len(v) == 2:
            return v[0], v[0], v[1], v[1]
        if len(v) == 4:
            return tuple(v)
    raise ValueError(f"padding must be an int, [px, py] or [px0, px1, py0, py1], got {v!r}")


def _check_upfirdn2d(x, f, up, down, padding, flip_filter, gain):
    """Validates; returns (f, (upx, upy), (downx, downy), (px0, px1, py0, py1)), f [[1]] for None."""
    check_tensor("x", x, dim=4)
    check_floating("x", x)
    if f is None:
        f = torch.ones(1, 1, dtype=torch.float32, device=x.device)
    check_filter("f", f, x.device)
    if f.requires_grad and torch.is_grad_enabled():
        raise ValueError("f: upfirdn2d has no gradient for the filter (it is a fixed buffer); pass f.detach()")
    upxy, downxy, pad = _pair("up", up), _pair("down", down), _padding(padding)
    if not isinstance(flip_filter, bool):
        raise ValueError(f"flip_filter must be a bool, got {flip_filter!r}")
    if isinstance(gain, bool) or not isinstance(gain, (int, float)):
        raise ValueError(f"gain must be a number, got {gain!r}")
    fh, fw = (f.shape[0], f.shape[-1])
    out_h = x.shape[2] * upxy[1] + pad[2] + pad[3] - fh
    out_w = x.shape[3] * upxy[0] + pad[0] + pad[1] - fw
    if out_h < 0 or out_w < 0:
        raise RuntimeError(f"upfirdn2d: the padded, upsampled image ({x.shape[2] * upxy[1] + pad[2] + pad[3]} x "
                           f"{x.shape[3] * upxy[0] + pad[0] + pad[1]}) is smaller than the filter ({fh} x {fw})")
    return f, upxy, downxy, pad


def check_filter(name: str, f, device: torch.device) -> None:
    """A FIR filter: a floating (fh, fw) or separable (k,) tensor on x's device."""
    check_tensor(name, f)
    check_floating(name, f)
    if f.dim() not in (1, 2) or f.numel() == 0:
        raise RuntimeError(f"{name} must be a non-empty (fh, fw) or (k,) filter, got shape {tuple(f.shape)}")
    if f.device != device:
        raise RuntimeError(f"{name} must be on x's device {device}, got {f.device}")


def setup_filter(f, normalize: bool = True, gain: float = 1.0, separable: bool | None = None) -> torch.Tensor:
    """StyleGAN2's FIR filter from taps, e.g. (1, 3, 3, 1): a 1-D list becomes its outer product
    (unless separable, StyleGAN2's default for 8 taps or more), normalized to sum 1, times gain."""
    f = torch.as_tensor(f, dtype=torch.float32)
    if f.dim() == 0:
        f = f[None]
    if f.dim() not in (1, 2) or f.numel() == 0:
        raise ValueError(f"resample_filter must be 1-D or 2-D taps, got shape {tuple(f.shape)}")
    if separable is None:
        separable = f.dim() == 1 and f.numel() >= 8
    if f.dim() == 1 and not separable:
        f = torch.outer(f, f)
    if normalize:
        f = f / f.sum()
    return f * gain ** (f.dim() / 2)


def resample_padding(f: Tensor, up: int = 1, down: int = 1, pad=(0, 0, 0, 0)) -> tuple[int, int, int, int]:
    """StyleGAN2's padding for resampling by the FIR filter f (upsample2d, downsample2d and
    conv2d_resample): pad (x0, x1, y0, y1) plus, for up > 1, ((f + up - 1) // 2, (f - up) // 2) per
    axis and, for down > 1, ((f - down + 1) // 2, (f - down) // 2): the output exactly up (or
    1/down) times the input, the filter centred."""
    fh, fw = f.shape[0], f.shape[-1]
    px0, px1, py0, py1 = pad
    if up > 1:
        px0, px1, py0, py1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2, py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
    return px0, px1, py0, py1


def _out_size(x: Tensor, fh: int, fw: int, up, down, pad) -> tuple[int, int]:
    (upx, upy), (downx, downy), (px0, px1, py0, py1) = up, down, pad
    return ((x.shape[2] * upy + py0 + py1 - fh) // downy + 1, (x.shape[3] * upx + px0 + px1 - fw) // downx + 1)


def _taps(f: Tensor, flip_filter: bool, gain: float, dtype: torch.dtype) -> Tensor:
    """The 2-D (fh, fw) correlation taps the kernels apply: gain folded in, flipped for a convolution,
    a separable filter as its outer product."""
    f = f.to(dtype) * gain ** (f.dim() / 2)
    if f.dim() == 1:
        f = f[:, None] * f[None, :]
    return (f if flip_filter else f.flip([0, 1])).contiguous()


# ---------------------------------------------------------------------------------------------
# composite: depthwise convolutions that skip the zeros and the thrown-away pixels

def _resample_axis_free(x: Tensor, w: Tensor, up, down, pad, out_hw) -> Tensor:
    """One depthwise pass with weight w (C, 1, kh, kw), a convolution's taps (not yet flipped).

    With u the zero-inserted, padded image, output pixel i is sum_k g[k] u[i*down + k - pad0]
    (g = the correlation taps = w flipped). For up = 1 that is a padded, strided conv2d with g. For
    up > 1, conv_transpose2d(x, w, stride=up) at position t is sum_k w[k] x[(t - k) / up], which is
    output pixel i at t = i*down + kh - 1 - pad0: one transposed convolution, then a crop (or pad)
    and a stride."""
    (upx, upy), (downx, downy), (px0, px1, py0, py1) = up, down, pad
    c, kh, kw = w.shape[0], w.shape[2], w.shape[3]
    oh, ow = out_hw
    if upx == 1 and upy == 1:
        xp = F.pad(x, [px0, px1, py0, py1])  # negative amounts crop
        return F.conv2d(xp, w.flip([2, 3]), stride=(downy, downx), groups=c)
    t = F.conv_transpose2d(x, w, stride=(upy, upx), groups=c)
    sy, sx = kh - 1 - py0, kw - 1 - px0
    # t[sy + i*downy], i < oh: crop (or zero-pad) t to rows [sy, sy + (oh - 1)*downy + 1)
    t = F.pad(t, [-sx, sx + (ow - 1) * downx + 1 - t.shape[3], -sy, sy + (oh - 1) * downy + 1 - t.shape[2]])
    return t[:, :, ::downy, ::downx]


def _upfirdn2d_composite(x, f, up, down, pad, flip_filter, gain):
    c = x.shape[1]
    dtype = opmath_dtype(x.dtype) if x.device.type == "cpu" else x.dtype
    f = f.to(dtype) * gain ** (f.dim() / 2)
    if flip_filter:  # the pass below takes convolution taps
        f = f.flip(list(range(f.dim())))
    fh, fw = f.shape[0], f.shape[-1]
    oh, ow = _out_size(x, fh, fw, up, down, pad)
    xs = x.to(dtype)
    if f.dim() == 2:
        y = _resample_axis_free(xs, f.expand(c, 1, fh, fw), up, down, pad, (oh, ow))
    else:  # separable: along H (x's up/down/pad are identities there), then along W
        (upx, upy), (downx, downy), (px0, px1, py0, py1) = up, down, pad
        rows = (oh, xs.shape[3])
        xs = _resample_axis_free(xs, f.view(1, 1, -1, 1).expand(c, 1, fh, 1), (1, upy), (1, downy),
                                 (0, 0, py0, py1), rows)
        y = _resample_axis_free(xs, f.view(1, 1, 1, -1).expand(c, 1, 1, fw), (upx, 1), (downx, 1),
                                (px0, px1, 0, 0), (oh, ow))
    return y.to(x.dtype).contiguous(memory_format=memory_format(x))


# ---------------------------------------------------------------------------------------------
# kernel launchers

def _upfirdn2d_fused(x, f, up, down, pad, flip_filter, gain):
    """The C++ kernels: CPU ("cpu" backend) or CUDA ("cuda" backend), by x's device."""
    taps = _taps(f, flip_filter, gain, opmath_dtype(x.dtype))
    return torch.ops.fastgen._upfirdn2d_fused(x, taps, list(up), list(down), list(pad))


def _upfirdn2d_triton(x, f, up, down, pad, flip_filter, gain):
    import triton

    from fastgen.kernels.upfirdn2d import _upfirdn2d_fwd_kernel

    taps = _taps(f, flip_filter, gain, torch.float32)
    fh, fw = taps.shape
    oh, ow = _out_size(x, fh, fw, up, down, pad)
    n, c, h, w = x.shape
    out = torch.empty((n, c, oh, ow), device=x.device, dtype=x.dtype, memory_format=memory_format(x))
    block = 256
    _upfirdn2d_fwd_kernel[(n * c * triton.cdiv(oh * ow, block),)](  # one dimension: y stops at 65535
        x, taps, out, c, h, w, oh, ow, *x.stride(), *out.stride(), *up, *down, pad[0], pad[2],
        FH=fh, FW=fw, EMULATE_BF16=x.dtype == torch.bfloat16 and _INTERPRET, BLOCK=block)
    return out


# ---------------------------------------------------------------------------------------------
# registration (up, down and padding arrive as lists)

def _fake_upfirdn2d(x: Tensor, f: Tensor, up: list[int], down: list[int], padding: list[int], flip_filter: bool,
                    gain: float, backend: str) -> Tensor:
    oh, ow = _out_size(x, f.shape[0], f.shape[-1], tuple(up), tuple(down), tuple(padding))
    return x.new_empty((x.shape[0], x.shape[1], oh, ow)).contiguous(memory_format=memory_format(x))


def _setup_context_upfirdn2d(ctx, inputs, output):
    x, f, up, down, padding, flip_filter, gain, backend = inputs
    ctx.save_for_backward(f)
    ctx.args = (tuple(x.shape), tuple(output.shape), up, down, padding, flip_filter, gain, backend)


def _backward_upfirdn2d(ctx, grad: Tensor):
    """The adjoint of upfirdn2d is upfirdn2d of the flipped filter with up and down swapped: the
    zero insertion's adjoint is the subsampling and the other way round, and the padding moves so
    that the taps line up again (StyleGAN2 derives the same four amounts)."""
    (f,) = ctx.saved_tensors
    in_shape, out_shape, (upx, upy), (downx, downy), (px0, px1, py0, py1), flip_filter, gain, backend = ctx.args
    if not ctx.needs_input_grad[0]:
        return (None,) * 8
    fh, fw = f.shape[0], f.shape[-1]
    (ih, iw), (oh, ow) = in_shape[2:], out_shape[2:]
    pad = [fw - px0 - 1, iw * upx - ow * downx + px0 - upx + 1, fh - py0 - 1, ih * upy - oh * downy + py0 - upy + 1]
    gx = torch.ops.fastgen.upfirdn2d(grad, f, [downx, downy], [upx, upy], pad, not flip_filter, gain, backend)
    return gx, None, None, None, None, None, None, None


SPEC = define(OpSpec(
    name="upfirdn2d", public=upfirdn2d,
    impls={"composite": Impl(_upfirdn2d_composite), "triton": Impl(_upfirdn2d_triton, NO_FLOAT64),
           **cpp_impls(_upfirdn2d_fused, "_upfirdn2d_fused")},
    custom_op=True,
    # channels_last in low precision, where the C++ kernel converts element by element: eager in
    # bfloat16 (bench-cpu-bfloat16-quick.json); in float16 aten's own convolution is slow (150 ms where
    # the composite takes 2.6), so the composite (benchmarks/results/cpu-float16-untuned.json)
    auto={**KERNELS_FIRST, "cpu/nhwc/bfloat16": ("reference", "composite"), "cpu/nhwc/float16": ("composite",),
          # channels_last upsampling (StyleGAN2's 3-channel ToRGB skip): the composite's one transposed
          # convolution beats the C++ kernel, which spreads its vector lanes over the 3 channels: 0.75
          # vs 1.07 ms forward, 1.6 vs 1.9 ms with the backward (its gradient arriving channels_last,
          # as a channels_last model hands it back; with an NCHW gradient the C++ backward had won)
          "cpu/up/nhwc": ("composite", "cpu")},
    examples=(Example("upfirdn2d_up2", lambda: (torch.randn(2, 3, 8, 7), setup_filter((1, 3, 3, 1))),
                      {"up": 2, "padding": [2, 1, 2, 1], "gain": 4.0}),
              Example("upfirdn2d_down2_separable", lambda: (torch.randn(2, 3, 8, 7), torch.tensor([1.0, 3, 3, 1]) / 8),
                      {"down": 2, "padding": 1})),
))
