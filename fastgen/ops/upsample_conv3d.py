"""fastgen::upsample_conv3d: nearest upsampling of a video clip (per axis: frames, rows, columns) +
zero padding (symmetric, or causal in time as diffusers' causal convolutions pad) + a 3-D convolution,
without the upsampled or the padded clip.

The fused formulation folds the upsampling into the weights: along an axis upsampled S times, the
output at S*q + r reads x at q + a for a few a only, with the taps i of the kernel that land on the
same a summed. A 3x3x3 kernel after a 2x2x2 upsampling becomes 8 phases of 2x2x2 taps: 8/27 of the
unfused work, and the 8x larger upsampled clip is never written. Without upsampling it is the
convolution itself, the causal padding applied to the small input.

Backends: `composite` (the phases as one transposed convolution of stride S whose taps are the folded
ones (per axis, the padding's two sides apart; derivation: fastgen/ops/upsample_conv2d.py
`_transposed`): aten's own convolution choice, XLA lowers it, CUDA runs cuDNN), `cpu` (the same, with
the 3-D convolutions handed to oneDNN directly: aten's CPU heuristic sends small-batch 3-D
convolutions, N*C*T*H <= 20480, to its unvectorized im2col path, 2-7x slower at video VAE shapes;
benchmarks/NOTES.md), `triton` (kernels/upsample_conv3d.py: the phases as one implicit GEMM over x)
and `cuda` (csrc/upsample_conv3d.cu, the same GEMM). The backward is aten's convolution backward of
the composite's formulation, for every backend (double backward works).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.dispatch import _INTERPRET, select
from fastgen.ops._registry import NO_FLOAT64, Example, Impl, OpSpec, call, define
from fastgen.ops._util import check_floating, check_tensor, memory_format
from fastgen.ops.upsample_conv2d import INT32_INDICES, _fold_axis, _tiles


def upsample_conv3d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, scale_factor=1, padding=0, *,
                    backend: Optional[str] = None) -> Tensor:
    """conv3d(pad(upsample_nearest(x, scale_factor), padding), weight, bias) without the upsampled
    or padded clip. See upsample_conv3d_ref."""
    scales, pads = _check_upsample_conv3d(x, weight, bias, scale_factor, padding)
    name = select(SPEC, x, backend)
    if name == "reference":
        return upsample_conv3d_ref(x, weight, bias, scale_factor, padding)
    return call(SPEC, x, weight, bias, list(scales), list(pads), name)


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
# the composite: per axis, the fold as one transposed convolution

def _out_size(x_shape, ks, scales, pads) -> list[int]:
    return [s * n + pads[4 - 2 * d] + pads[5 - 2 * d] - k + 1
            for d, (s, k, n) in enumerate(zip(scales, ks, x_shape[2:]))]


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


@dataclass(frozen=True)
class _Plan:
    """How the composite computes one call; its backward follows the same plan."""
    kind: str                  # "conv" (no upsampling), "transposed" (the fold) or "upsampled" (the reference's clip)
    pre: tuple                 # F.pad of x before the convolution (F.pad's order)
    padding: tuple = ()        # the convolution's own padding per axis
    output_padding: tuple = ()  # transposed only: ...
    crop: tuple = ()           # ... outputs dropped at the end of each axis
    taps: tuple = ()           # ... and per axis the tap matrix M of _axis_fold


def _plan(x_shape, ks, scales, pads) -> _Plan:
    axes = [(scales[d], ks[d], pads[4 - 2 * d], pads[5 - 2 * d]) for d in range(3)]
    if scales == (1, 1, 1):
        # the symmetric part of the padding in the convolution, the rest (causal time) on the small x
        sym = tuple(min(front, back) for _, _, front, back in axes)
        return _Plan("conv", tuple(p - sym[2 - i // 2] for i, p in enumerate(pads)), sym)
    # the axes at scale 1 padded (on the small x) as far as the transposed form needs
    pre = [0] * 6
    folds = []
    for d, (s, k, front, back) in enumerate(axes):
        if s == 1:
            keep = min(front, back, k - 1)
            pre[4 - 2 * d], pre[5 - 2 * d] = front - keep, back - keep
            front = back = keep
        fold = _axis_fold(s, k, front, back, x_shape[2 + d] + pre[4 - 2 * d] + pre[5 - 2 * d])
        if fold is None:  # not one transposed convolution: the reference's upsampled clip
            return _Plan("upsampled", pads, (0, 0, 0))
        folds.append(fold)
    return _Plan("transposed", tuple(pre), *(tuple(f[j] for f in folds) for j in (1, 2, 3, 0)))


def _pad(x: Tensor, pads) -> Tensor:
    return F.pad(x, pads) if any(pads) else x


def _unpad(g: Tensor, pads) -> Tensor:
    """The adjoint of _pad (pads non-negative)."""
    t, h, w = g.shape[2:]
    return g[:, :, pads[4]:t - pads[5], pads[2]:h - pads[3], pads[0]:w - pads[1]]


def _apply_taps(w: Tensor, taps) -> Tensor:
    """w (A, B, K0, K1, K2) -> (B, A, K0', K1', K2'): along each of the last three axes, output tap t is
    the sum of the input taps i with taps[axis][t][i] = 1. Slices and sums of w only: a tensor made from
    host data inside the XLA kernel of a custom op (torch.tensor(...).to(xla): an empty tensor + copy_,
    below functionalization) came out wrong there, and with it a tap-matrix einsum (torch_xla 2.9)."""
    for d, m in enumerate(taps):
        rows = []
        for row in m:
            parts = [w.select(2 + d, i) for i, v in enumerate(row) if v]
            rows.append(sum(parts[1:], parts[0]) if parts else torch.zeros_like(w.select(2 + d, 0)))
        w = torch.stack(rows, 2 + d)
    return w.transpose(0, 1)


def _transposed_weight(weight: Tensor, taps) -> Tensor:
    """(CO, C, KT, KH, KW) -> the transposed convolution's (C, CO, KT', KH', KW'), summed in fp32."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return _apply_taps(weight.to(acc), taps).to(weight.dtype)


def _conv3d(x, weight, bias, padding, onednn: bool):
    if onednn:
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(padding), [1, 1, 1], [1, 1, 1], 1)
    return F.conv3d(x, weight, bias, padding=tuple(padding))


def _upsample_conv3d(x, weight, bias, scales, pads, onednn=False):
    fmt = memory_format(x)
    scales, pads = tuple(scales), tuple(pads)
    plan = _plan(x.shape, weight.shape[2:], scales, pads)
    if plan.kind == "upsampled":
        return upsample_conv3d_ref(x, weight, bias, scales, pads).contiguous(memory_format=fmt)
    if plan.kind == "conv":
        return _conv3d(_pad(x, plan.pre), weight, bias, plan.padding, onednn).contiguous(memory_format=fmt)
    out = F.conv_transpose3d(_pad(x, plan.pre), _transposed_weight(weight, plan.taps), bias,
                             stride=scales, padding=plan.padding, output_padding=plan.output_padding)
    if any(plan.crop):
        t, h, w = out.shape[2:]
        out = out[:, :, :t - plan.crop[0], :h - plan.crop[1], :w - plan.crop[2]]
    return out.contiguous(memory_format=fmt)


def _upsample_conv3d_composite(x, weight, bias, scale_factor, padding):
    return _upsample_conv3d(x, weight, bias, scale_factor, padding)


_ONEDNN = torch.backends.mkldnn.is_available()  # read once: torch.compile does not trace the call


def _upsample_conv3d_cpu(x, weight, bias, scale_factor, padding):
    """The convolutions through oneDNN (float32 and bfloat16; aten's own choice for the others)."""
    onednn = _ONEDNN and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
    return _upsample_conv3d(x, weight, bias, scale_factor, padding, onednn=onednn)


# ---------------------------------------------------------------------------------------------
# kernel launchers (derivation of the phase GEMM: kernels/upsample_conv3d.py)

def _packed_weight(weight: Tensor, scales, pads) -> tuple[Tensor, tuple[int, int, int]]:
    """Per phase, the taps that land on the same x position summed (fp32; fp64 for fp64), as the kernels
    read them: (ST * SH * SW, KFT, KFH, KFW, C, CO) contiguous, and (KFT, KFH, KFW)."""
    folds = [_fold_axis(s, k, pads[4 - 2 * d]) for d, (s, k) in enumerate(zip(scales, weight.shape[2:]))]
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    mt, mh, mw = (torch.tensor(f[2], dtype=acc, device=weight.device) for f in folds)  # (S, KF, K) per axis
    kf = tuple(f[1] for f in folds)
    packed = torch.einsum("rai,sbj,tck,oxijk->rstabcxo", mt, mh, mw, weight.to(acc))
    return packed.reshape(-1, *kf, *weight.shape[1::-1]).to(weight.dtype).contiguous(), kf


def _upsample_conv3d_triton(x, weight, bias, scale_factor, padding):
    import triton

    from fastgen.kernels.upsample_conv3d import _upsample_conv3d_fwd_kernel

    packed, kf = _packed_weight(weight, scale_factor, padding)
    n, c = x.shape[:2]
    co = weight.shape[0]
    outs = _out_size(x.shape, weight.shape[2:], scale_factor, padding)
    per_phase = [-(-o // s) for o, s in zip(outs, scale_factor)]
    positions = n * per_phase[0] * per_phase[1] * per_phase[2]
    out = torch.empty((n, co, *outs), dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    emulate_bf16 = x.dtype == torch.bfloat16 and _INTERPRET
    # Three axes of source indices cost registers: fp16/bf16 with channels strided (NCDHW) spilled 8-88 B
    # at 4 warps, none at 8 (tools/triton_aot.py)
    block_m, block_n, block_k, launch = _tiles(x.dtype, c, co, eight_warps=x.stride(1) != 1)
    grid = (triton.cdiv(positions, block_m), triton.cdiv(co, block_n), scale_factor[0] * scale_factor[1] * scale_factor[2])
    _upsample_conv3d_fwd_kernel[grid](
        x, packed, bias.contiguous() if bias is not None else packed, out,  # bias read as contiguous
        n, c, *x.shape[2:], co, *outs, *per_phase, *x.stride(), *out.stride(), padding[4], padding[2], padding[0],
        ST=scale_factor[0], SH=scale_factor[1], SW=scale_factor[2], KFT=kf[0], KFH=kf[1], KFW=kf[2],
        HAS_BIAS=bias is not None,
        # bf16 under the interpreter: fp32 tiles and rounding by hand (kernels/upsample_conv2d.py's launcher)
        DOT_IN_FP32=x.dtype == torch.float32 or emulate_bf16, EMULATE_BF16=emulate_bf16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, M_FITS_INT32=positions + block_m < INT32_INDICES,
        **launch,
    )
    return out


def _upsample_conv3d_cuda(x, weight, bias, scale_factor, padding):
    packed, _ = _packed_weight(weight, scale_factor, padding)
    return torch.ops.fastgen._upsample_conv3d_fused(x, packed, bias, list(scale_factor), list(padding),
                                                    list(weight.shape[2:]))


# ---------------------------------------------------------------------------------------------
# registration: `backend` is always a concrete name here (resolved by the public function).

def _fake_upsample_conv3d(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale_factor: list[int],
                          padding: list[int], backend: str) -> Tensor:
    _check_upsample_conv3d(x, weight, bias, scale_factor, padding)
    return torch.empty((x.shape[0], weight.shape[0], *_out_size(x.shape, weight.shape[2:], scale_factor, padding)),
                       dtype=x.dtype, device=x.device, memory_format=memory_format(x))


def _setup_context_upsample_conv3d(ctx, inputs, output):
    x, weight, bias, scale_factor, padding, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.args = (tuple(scale_factor), tuple(padding))


def _backward_upsample_conv3d(ctx, grad: Tensor):
    """aten's convolution backward of the composite's plan (each step differentiable and lowered by
    XLA, so double backward works): the fold's adjoint for the weights, no upsampled clip."""
    x, weight = ctx.saved_tensors
    scales, pads = ctx.args
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    fmt = memory_format(x)
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        # aten's CPU bfloat16 3-D convolution backward (oneDNN) returns a wrong, at times uninitialized,
        # weight gradient for channels_last_3d inputs (errors up to 1e38, torch 2.14; contiguous is right):
        # the backward of that case runs on contiguous tensors
        x, grad = x.contiguous(), grad.contiguous()
    plan = _plan(x.shape, weight.shape[2:], scales, pads)
    ones, mask = [1, 1, 1], [need_x, need_w, False]
    gx = gw = None
    if plan.kind == "transposed":
        crop = plan.crop
        g = F.pad(grad, (0, crop[2], 0, crop[1], 0, crop[0])) if any(crop) else grad
        gxp, gwt, _ = torch.ops.aten.convolution_backward(
            g, _pad(x, plan.pre), _transposed_weight(weight, plan.taps), None, list(scales), list(plan.padding), ones,
            True, list(plan.output_padding), 1, mask)
        if need_w:
            acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
            gw = _apply_taps(gwt.to(acc), [list(zip(*m)) for m in plan.taps]).to(weight.dtype)  # the adjoint
    else:
        xp = _pad(x if plan.kind == "conv" else F.interpolate(x, scale_factor=scales, mode="nearest"), plan.pre)
        gxp, gw, _ = torch.ops.aten.convolution_backward(
            grad, xp, weight, None, ones, list(plan.padding), ones, False, [0, 0, 0], 1, mask)
    if need_x:
        gx = _unpad(gxp, plan.pre)
        if plan.kind == "upsampled":  # the adjoint of nearest upsampling: each block of S summed
            for d, s in enumerate(scales):
                gx = gx.unflatten(2 + d, (gx.shape[2 + d] // s, s)).sum(3 + d) if s > 1 else gx
        gx = gx.contiguous(memory_format=fmt)
    gb = grad.sum((0, 2, 3, 4)) if need_b and ctx.has_bias else None
    return gx, gw, gb, None, None, None


SPEC = define(OpSpec(
    name="upsample_conv3d", public=upsample_conv3d,
    impls={"composite": Impl(_upsample_conv3d_composite), "cpu": Impl(_upsample_conv3d_cpu),
           "triton": Impl(_upsample_conv3d_triton, NO_FLOAT64),
           "cuda": Impl(_upsample_conv3d_cuda, kernels=("_upsample_conv3d_fused",))},
    auto={"cpu": ("cpu", "composite")},
    custom_op=True,
    examples=(
        Example("upsample_conv3d_causal", lambda: (torch.randn(1, 4, 3, 5, 6), torch.randn(6, 4, 3, 3, 3) / 6,
                                                   torch.randn(6)), {"padding": (1, 1, 1, 1, 2, 0)}, (0, 1, 2)),
        Example("upsample_conv3d_up2", lambda: (torch.randn(1, 4, 3, 4, 5), torch.randn(5, 4, 3, 3, 3) / 6,
                                                torch.randn(5)), {"scale_factor": 2, "padding": 1}, (0, 1, 2)),
        Example("upsample_conv3d_up_spatial_causal", lambda: (torch.randn(2, 3, 2, 4, 3), torch.randn(4, 3, 3, 3, 3) / 5,
                                                              None), {"scale_factor": (1, 2, 2), "padding": (1, 1, 1, 1, 2, 0)},
                (0, 1))),
))
