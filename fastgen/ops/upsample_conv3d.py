"""upsample_conv3d: nearest upsampling of a video clip (per axis: frames, rows, columns) + zero
padding (symmetric, or causal in time as diffusers' causal convolutions pad) + a 3-D convolution,
without the upsampled or the padded clip.

The fused formulation folds the upsampling into the weights: along an axis upsampled S times, the
output at S*q + r reads x at q + a for a few a only, with the taps i of the kernel that land on the
same a summed. That is one transposed convolution of stride S whose taps are the folded ones (the
derivation: fastgen/ops/upsample_conv2d.py `_transposed`, per axis here, with the padding's two
sides apart). A 3x3x3 kernel after a 2x2x2 upsampling becomes 8 phases of 2x2x2 taps: 8/27 of the
unfused work, and the 8x larger upsampled clip is never written. Without upsampling it is the
convolution itself, the causal padding applied to the small input.

A composition of aten convolutions, not a custom op: autograd, torch.compile and XLA see aten ops.
Backends: `composite` (aten's own convolution choice; XLA lowers it, CUDA runs cuDNN) and `cpu`
(the same formulation with the 3-D convolutions handed to oneDNN directly: aten's CPU heuristic
sends small-batch 3-D convolutions, N*C*T*H <= 20480, to its unvectorized im2col path, 2-7x slower
at video VAE shapes; benchmarks/NOTES.md).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.dispatch import select
from fastgen.ops._registry import Example, Impl, OpSpec, define
from fastgen.ops._util import check_floating, check_tensor, memory_format


def upsample_conv3d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, scale_factor=1, padding=0, *,
                    backend: Optional[str] = None) -> Tensor:
    """conv3d(pad(upsample_nearest(x, scale_factor), padding), weight, bias) without the upsampled
    or padded clip. See upsample_conv3d_ref."""
    scales, pads = _check_upsample_conv3d(x, weight, bias, scale_factor, padding)
    name = select(SPEC, x, backend)
    if name == "reference":
        return upsample_conv3d_ref(x, weight, bias, scale_factor, padding)
    return SPEC.impls[name].run(x, weight, bias, scales, pads)


def upsample_conv3d_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, scale_factor=1,
                        padding=0) -> Tensor:
    """Nearest upsampling, zero padding, then a 3-D convolution, as a user writes the layers.

    1. x = F.interpolate(x, scale_factor=scale_factor, mode="nearest")      (skipped at scale 1)
    2. x = F.pad(x, pads)      pads in F.pad's order (w_left, w_right, h_top, h_bottom, t_front, t_back)
    3. return F.conv3d(x, weight, bias)

    Args:
        x:            (N, C, T, H, W) floating point, contiguous or channels_last_3d.
        weight:       (CO, C, KT, KH, KW), x's dtype and device; stride 1, no dilation, no groups.
        bias:         (CO,) or None.
        scale_factor: int or (st, sh, sw), each 1..4: nearest upsampling per axis.
        padding:      int or (pt, ph, pw) (nn.Conv3d's symmetric zero padding), or six ints in F.pad's
                      order, e.g. diffusers' causal (pw, pw, ph, ph, 2 * pt, 0).
    Returns:
        (N, CO, T', H', W') with T' = st * T + t_front + t_back - KT + 1 (and so on), x's memory format.
    """
    _check_upsample_conv3d(x, weight, bias, scale_factor, padding)
    scales = (scale_factor,) * 3 if isinstance(scale_factor, int) else tuple(scale_factor)
    padding = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
    pads = padding if len(padding) == 6 else (padding[2], padding[2], padding[1], padding[1], padding[0], padding[0])
    if scales != (1, 1, 1):
        x = F.interpolate(x, scale_factor=scales, mode="nearest")
    return F.conv3d(F.pad(x, pads), weight, bias)


def _triple(name: str, v, lo: int, hi: int) -> tuple[int, int, int]:
    vals = (v,) * 3 if isinstance(v, int) and not isinstance(v, bool) else tuple(v) if isinstance(v, Sequence) else None
    if vals is None or len(vals) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or not lo <= s <= hi
                                             for s in vals):
        raise ValueError(f"{name} must be an int or three ints in [{lo}, {hi}], got {v!r}")
    return vals


def _check_upsample_conv3d(x, weight, bias, scale_factor, padding):
    """(scales (st, sh, sw), pads in F.pad's order)."""
    check_tensor("x", x, 5)
    check_floating("x", x)
    check_tensor("weight", weight, 5)
    if weight.dtype != x.dtype or weight.device != x.device:
        raise RuntimeError(f"weight must have x's dtype and device ({x.dtype}, {x.device}), got {weight.dtype}, "
                           f"{weight.device}")
    if weight.shape[1] != x.shape[1]:
        raise RuntimeError(f"weight must be (CO, {x.shape[1]}, KT, KH, KW) for x's {x.shape[1]} channels, "
                           f"got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, 1)
        if bias.dtype != x.dtype or bias.device != x.device or bias.shape[0] != weight.shape[0]:
            raise RuntimeError(f"bias must be ({weight.shape[0]},) with x's dtype and device, got "
                               f"{tuple(bias.shape)} {bias.dtype} {bias.device}")
    scales = _triple("scale_factor", scale_factor, 1, 4)
    if isinstance(padding, Sequence) and not isinstance(padding, str) and len(padding) == 6:
        if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in padding):
            raise ValueError(f"padding must be non-negative ints, got {padding!r}")
        pads = tuple(padding)
    else:
        pt, ph, pw = _triple("padding", padding, 0, 2 ** 20)
        pads = (pw, pw, ph, ph, pt, pt)
    for axis, (s, k, size) in enumerate(zip(scales, weight.shape[2:], x.shape[2:])):
        if s * size + pads[4 - 2 * axis] + pads[5 - 2 * axis] < k:
            raise RuntimeError(f"the upsampled and padded x ({tuple(x.shape)}, scale {scales}, padding {pads}) is "
                               f"smaller than the kernel {tuple(weight.shape[2:])}")
    return scales, pads


# ---------------------------------------------------------------------------------------------
# the fold, per axis

def _axis_fold(scale: int, k: int, front: int, back: int, size: int):
    """Along one axis: the transposed convolution's taps M (kt x k, M[t][i] = 1 where tap i lands on
    t), its padding P, output_padding and how many outputs to drop at the end; None where this axis
    cannot be one transposed convolution (the caller pads or upsamples it instead)."""
    # output S*q + r reads upsampled row S*q + r - front + i, which is x row q + a, a = (r - front + i) // S:
    # the transposed convolution's tap t = r + P - S*a (distinct for distinct (r, a): t = r + P mod S)
    a = [[(r - front + i) // scale for i in range(k)] for r in range(scale)]
    pad = max(scale * a[r][i] - r for r in range(scale) for i in range(k))
    kt = max(r + pad - scale * a[r][i] for r in range(scale) for i in range(k)) + 1
    taps = [[0.0] * k for _ in range(kt)]
    for r in range(scale):
        for i in range(k):
            taps[r + pad - scale * a[r][i]][i] = 1.0
    wanted = scale * size + front + back - k + 1
    made = (size - 1) * scale + kt - 2 * pad
    extra = wanted - made
    if pad < 0 or extra >= scale:
        return None
    return taps, pad, max(extra, 0), max(-extra, 0)


def _conv3d(x, weight, bias, padding, onednn: bool):
    if onednn:
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(padding), [1, 1, 1], [1, 1, 1], 1)
    return F.conv3d(x, weight, bias, padding=tuple(padding))


def _upsample_conv3d(x, weight, bias, scales, pads, onednn=False):
    fmt = memory_format(x)
    ks = weight.shape[2:]
    axes = [(scales[d], ks[d], pads[4 - 2 * d], pads[5 - 2 * d]) for d in range(3)]
    if scales == (1, 1, 1):
        # the symmetric part of the padding in the convolution, the rest (causal time) on the small x
        sym = [min(front, back) for _, _, front, back in axes]
        rest = [p - sym[2 - i // 2] for i, p in enumerate(pads)]
        x = F.pad(x, rest) if any(rest) else x
        return _conv3d(x, weight, bias, sym, onednn).contiguous(memory_format=fmt)
    # the axes at scale 1 padded (on the small x) as far as the transposed form needs
    pre = [0] * 6
    folds = []
    for d, (s, k, front, back) in enumerate(axes):
        if s == 1:
            keep = min(front, back, k - 1)
            pre[4 - 2 * d], pre[5 - 2 * d] = front - keep, back - keep
            front = back = keep
        fold = _axis_fold(s, k, front, back, x.shape[2 + d] + pre[4 - 2 * d] + pre[5 - 2 * d])
        if fold is None:  # not one transposed convolution: the reference's upsampled clip
            return upsample_conv3d_ref(x, weight, bias, scales, pads).contiguous(memory_format=fmt)
        folds.append(fold)
    x = F.pad(x, pre) if any(pre) else x
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    mt, mh, mw = (torch.tensor(f[0], dtype=acc, device=weight.device) for f in folds)
    # (CO, C, KT, KH, KW) -> the transposed convolution's (C, CO, KT', KH', KW')
    wt = torch.einsum("ai,bj,ck,oxijk->xoabc", mt, mh, mw, weight.to(acc)).to(weight.dtype)
    out = F.conv_transpose3d(x, wt, bias, stride=scales, padding=[f[1] for f in folds],
                             output_padding=[f[2] for f in folds])
    crop = [f[3] for f in folds]
    if any(crop):
        out = out[:, :, :out.shape[2] - crop[0], :out.shape[3] - crop[1], :out.shape[4] - crop[2]]
    return out.contiguous(memory_format=fmt)


def _upsample_conv3d_composite(x, weight, bias, scales, pads):
    return _upsample_conv3d(x, weight, bias, scales, pads)


_ONEDNN = torch.backends.mkldnn.is_available()  # read once: torch.compile does not trace the call


def _upsample_conv3d_cpu(x, weight, bias, scales, pads):
    """The convolutions through oneDNN (float32 and bfloat16; aten's own choice for the others)."""
    onednn = _ONEDNN and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
    return _upsample_conv3d(x, weight, bias, scales, pads, onednn=onednn)


SPEC = define(OpSpec(
    name="upsample_conv3d", public=upsample_conv3d,
    impls={"composite": Impl(_upsample_conv3d_composite), "cpu": Impl(_upsample_conv3d_cpu)},
    auto={"cpu": ("cpu", "composite")},
    examples=(
        Example("upsample_conv3d_causal", lambda: (torch.randn(1, 4, 3, 5, 6), torch.randn(6, 4, 3, 3, 3) / 6,
                                                   torch.randn(6)), {"padding": (1, 1, 1, 1, 2, 0)}, (0, 1, 2)),
        Example("upsample_conv3d_up2", lambda: (torch.randn(1, 4, 3, 4, 5), torch.randn(5, 4, 3, 3, 3) / 6,
                                                torch.randn(5)), {"scale_factor": 2, "padding": 1}, (0, 1, 2)),
        Example("upsample_conv3d_up_spatial_causal", lambda: (torch.randn(2, 3, 2, 4, 3), torch.randn(4, 3, 3, 3, 3) / 5,
                                                              None), {"scale_factor": (1, 2, 2), "padding": (1, 1, 1, 1, 2, 0)},
                (0, 1))),
))
