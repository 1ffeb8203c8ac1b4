"""fastgen::upsample_conv2d: nearest or bilinear upsampling followed by a convolution, fused.

Public function, reference (the spec), checks, the composite rewrite, kernel launchers, fake,
autograd and registration, top to bottom. Kernels: kernels/upsample_conv2d.py (Triton),
csrc/upsample_conv2d.cu (CUDA).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.dispatch import _INTERPRET, select
from fastgen.ops._registry import KERNELS_FIRST, NO_FLOAT64, Example, Impl, OpSpec, call, define
from fastgen.ops._util import check_floating, check_tensor, memory_format, opmath_dtype

SCALES = {"nearest": (2, 3, 4), "bilinear": (2,)}


def upsample_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, scale_factor=2,
                    mode: str = "nearest", padding: Optional[int] = None,
                    backend: Optional[str] = None) -> Tensor:
    """conv2d(interpolate(x, scale_factor, mode), weight, bias, padding), without ever
    materializing the upsampled image. See `upsample_conv2d_ref` for the exact semantics;
    `backend` picks the implementation (fastgen.dispatch)."""
    scale, pad = _check_upsample_conv2d(x, weight, bias, scale_factor, mode, padding)
    name = select(SPEC, x, backend, variant=mode)
    if name == "reference":
        return upsample_conv2d_ref(x, weight, bias, scale_factor=scale, mode=mode, padding=pad)
    return call(SPEC, x, weight, bias, scale, mode, pad, name)


def upsample_conv2d_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                        scale_factor=2, mode: str = "nearest",
                        padding: Optional[int] = None) -> Tensor:
    """Upsample then convolve, the way a user writes the unfused layers.

    1. xu = F.interpolate(x, scale_factor=scale_factor, mode=mode)   (bilinear: align_corners=False)
    2. y  = F.conv2d(xu, weight, bias, padding=padding)               (stride 1, groups 1)

    Args:
        x:            (N, C, H, W) floating point, NCHW or channels_last.
        weight:       (CO, C, k, k), k odd; x's dtype and device.
        bias:         (CO,) or None.
        scale_factor: integer; nearest: 2, 3 or 4; bilinear: 2.
        mode:         "nearest" or "bilinear".
        padding:      zero padding of the upsampled image; None means k // 2 (same size).
    Returns:
        (N, CO, s*H + 2*padding - k + 1, s*W + 2*padding - k + 1), in x's memory format.
    """
    _check_upsample_conv2d(x, weight, bias, scale_factor, mode, padding)
    pad = weight.shape[-1] // 2 if padding is None else padding
    align = False if mode == "bilinear" else None
    xu = F.interpolate(x, scale_factor=int(scale_factor), mode=mode, align_corners=align)
    return F.conv2d(xu, weight, bias, padding=pad)


def _check_upsample_conv2d(x, weight, bias, scale_factor, mode, padding) -> tuple[int, int]:
    """Validate the arguments; returns (integer scale, integer padding)."""
    check_tensor("x", x, 4)
    check_tensor("weight", weight, 4)
    check_floating("x", x)
    if mode not in SCALES:
        raise ValueError(f"mode must be one of {tuple(SCALES)}, got {mode!r}")
    if isinstance(scale_factor, bool) or not isinstance(scale_factor, (int, float)) \
            or scale_factor != int(scale_factor) or int(scale_factor) not in SCALES[mode]:
        raise ValueError(f"scale_factor must be one of {SCALES[mode]} for mode={mode!r}, got {scale_factor!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise RuntimeError(f"{name} must have x's dtype and device ({x.dtype}, {x.device}), "
                               f"got {t.dtype}, {t.device}")
    co, c, kh, kw = weight.shape
    if c != x.shape[1]:
        raise RuntimeError(f"weight of shape {tuple(weight.shape)} expects {c} input channels, "
                           f"but x has {x.shape[1]} (groups=1 only)")
    if kh != kw or kh % 2 == 0:
        raise ValueError(f"weight must have an odd square kernel, got {kh}x{kw}")
    if bias is not None:
        check_tensor("bias", bias, 1)
        if bias.shape[0] != co:
            raise RuntimeError(f"bias must have {co} elements (weight.shape[0]), got {bias.shape[0]}")
    if padding is None:
        padding = kh // 2
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int or None, got {padding!r}")
    scale = int(scale_factor)
    if min(x.shape[1:]) < 1 or scale * min(x.shape[2:]) + 2 * padding - kh + 1 < 1:
        raise RuntimeError(f"x of shape {tuple(x.shape)} is too small (or empty) for a {kh}x{kh} "
                           f"kernel with padding {padding} after {scale}x upsampling")
    return scale, padding


def _out_size(x: Tensor, k: int, scale: int, padding: int) -> tuple[int, int]:
    return tuple(scale * n + 2 * padding - k + 1 for n in x.shape[2:])


# ---------------------------------------------------------------------------------------------
# The nearest-mode phase fold (derivation: kernels/upsample_conv2d.py). Per axis, phase r reads
# x rows lo(r) .. lo(r) + kf - 1 relative to its output's source row.

def _fold_axis(scale: int, k: int, padding: int) -> tuple[list[int], int, list[list[list[float]]]]:
    """(lo per phase, folded taps kf, M[r][a][i] = 1 where tap i of phase r lands on folded tap a)."""
    lo = [(r - padding) // scale for r in range(scale)]
    kf = max((r + k - 1 - padding) // scale - lo[r] + 1 for r in range(scale))
    fold = [[[1.0 if (r + i - padding) // scale - lo[r] == a else 0.0 for i in range(k)]
             for a in range(kf)] for r in range(scale)]
    return lo, kf, fold


def _fold_matrix(fold, weight: Tensor) -> Tensor:
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return torch.tensor(fold, dtype=acc, device=weight.device)


def _folded_weight(weight: Tensor, scale: int, padding: int) -> tuple[Tensor, list[int], int]:
    """Per-phase folded weights (S, S, CO, C, kf, kf), summed in fp32 (fp64 for fp64)."""
    lo, kf, fold = _fold_axis(scale, weight.shape[-1], padding)
    m = _fold_matrix(fold, weight)
    wf = torch.einsum("rai,sbj,ocij->rsocab", m, m, weight.to(m.dtype))
    return wf.to(weight.dtype), lo, kf


def _packed_weight(weight: Tensor, scale: int, mode: str, padding: int) -> tuple[Tensor, int]:
    """Weights as the kernels read them: (P, KF, KF, C, CO) contiguous, and KF."""
    if mode == "bilinear":
        return weight.permute(2, 3, 1, 0).unsqueeze(0).contiguous(), weight.shape[-1]
    wf, _, kf = _folded_weight(weight, scale, padding)
    return wf.permute(0, 1, 4, 5, 3, 2).reshape(scale * scale, kf, kf, *weight.shape[1::-1]).contiguous(), kf


def _phase_grid(x_shape, k: int, scale: int, padding: int, lo: list[int], kf: int):
    """The one convolution that computes every phase: it runs over x padded by `pads` (F.pad
    order; negative = crop) to cover rows lo[0] .. hm-1 + lo[-1] + kf-1, and phase r's (hm, wm)
    outputs start at row and column lo[r] - lo[0] of its result. Returns (hm, wm, pads)."""
    h, w = x_shape[2:]
    hm, wm = -(-(scale * h + 2 * padding - k + 1) // scale), -(-(scale * w + 2 * padding - k + 1) // scale)
    return hm, wm, (-lo[0], wm + lo[-1] + kf - 1 - w, -lo[0], hm + lo[-1] + kf - 1 - h)


def _phase_conv_input(x: Tensor, pads) -> tuple[Tensor, int]:
    """x as the phase convolution reads it, and the convolution's own (symmetric) padding."""
    return (x, pads[0]) if all(p == pads[0] for p in pads) else (F.pad(x, pads), 0)


# ---------------------------------------------------------------------------------------------
# composite: aten only, so XLA lowers it and autograd needs no fallback.

def _upsample_conv2d_composite(x, weight, bias, scale, mode, padding, in_place_interleave=True):
    """in_place_interleave: write the phases into one output through views (CPU, CUDA: the output is
    written once); False stacks them (XLA, where a copy_ into a view of a fresh tensor inside a
    kernel does not reach the tensor: the output came back all zeros)."""
    fmt = memory_format(x)
    if mode == "bilinear":
        return F.conv2d(_upsample(x, scale, mode).contiguous(memory_format=fmt), weight, bias, padding=padding)
    if fmt == torch.channels_last and in_place_interleave and x.device.type == "cpu":
        # oneDNN's transposed convolution writes the interleaved channels-last output itself:
        # 1.3-1.5x faster than the phase convolution plus its interleaving copy (benchmarks/NOTES.md)
        out = _transposed(x, weight, bias, scale, padding)
        if out is not None:
            return out
    n, co, k = x.shape[0], weight.shape[0], weight.shape[-1]
    hout, wout = _out_size(x, k, scale, padding)
    wf, lo, kf = _folded_weight(weight, scale, padding)
    hm, wm, pads = _phase_grid(x.shape, k, scale, padding, lo, kf)
    xp, conv_pad = _phase_conv_input(x, pads)
    phases = F.conv2d(xp, wf.flatten(0, 2), None if bias is None else bias.repeat(scale * scale),
                      padding=conv_pad)

    def phase(ry, rx):  # output pixels (scale * y + ry, scale * x + rx)
        p, oy, ox = (ry * scale + rx) * co, lo[ry] - lo[0], lo[rx] - lo[0]
        return phases[:, p:p + co, oy:oy + hm, ox:ox + wm]

    if in_place_interleave:
        out = torch.empty((n, co, scale * hm, scale * wm), dtype=x.dtype, device=x.device, memory_format=fmt)
        interleaved = out.view(n, co, hm, scale, wm, scale)
        for ry in range(scale):
            for rx in range(scale):
                interleaved[:, :, :, ry, :, rx].copy_(phase(ry, rx))
    else:  # (n, co, hm, scale, wm, scale) indexed [y, ry, x, rx]
        rows = [torch.stack([phase(ry, rx) for rx in range(scale)], dim=-1) for ry in range(scale)]
        out = torch.stack(rows, dim=3).reshape(n, co, scale * hm, scale * wm).contiguous(memory_format=fmt)
    if (scale * hm, scale * wm) != (hout, wout):
        out = out[:, :, :hout, :wout].contiguous(memory_format=fmt)
    return out


def _transposed(x, weight, bias, scale, padding) -> Optional[Tensor]:
    """The nearest upsample + convolution as one transposed convolution of stride `scale`: output
    row S*m + r reads x[m + lo[r] + a] with folded tap a, which is the transposed convolution's tap
    t = r - S*(lo[r] + a) + P (P makes the smallest 0). Each (r, a) has its own t (r is t mod S),
    so its taps are the folded ones laid side by side: M[t, i] = fold[r][a][i]. None (the phase
    convolution then) when the padding would be negative or the output size needs an
    output_padding beyond the stride."""
    k = weight.shape[-1]
    lo, kf, fold = _fold_axis(scale, k, padding)
    taps = {(r, a): r - scale * (lo[r] + a) for r in range(scale) for a in range(kf)}
    pad = -min(taps.values())
    size = max(taps.values()) + pad + 1
    hout, wout = _out_size(x, k, scale, padding)
    extra = [o - ((i - 1) * scale - 2 * pad + size) for o, i in zip((hout, wout), x.shape[2:])]
    if pad < 0 or any(e < 0 or e >= scale for e in extra):
        return None
    rows = [[0.0] * k for _ in range(size)]
    for (r, a), t in taps.items():
        rows[t + pad] = fold[r][a]
    m = _fold_matrix(rows, weight)
    w = torch.einsum("yi,xj,ocij->coyx", m, m, weight.to(m.dtype)).to(weight.dtype).contiguous()
    return F.conv_transpose2d(x, w, bias, stride=scale, padding=pad, output_padding=tuple(extra))


def _upsample(x: Tensor, scale: int, mode: str) -> Tensor:
    """interpolate(x, scale, mode) in aten ops that XLA lowers, forward and backward."""
    n, c, h, w = x.shape
    if mode == "nearest":
        return x[:, :, :, None, :, None].expand(n, c, h, scale, w, scale).reshape(n, c, h * scale, w * scale)
    opmath = opmath_dtype(x.dtype)
    t = _lerp2x_last(x.to(opmath))
    return _lerp2x_last(t.transpose(-1, -2)).transpose(-1, -2).to(x.dtype)


def _upsample_adjoint(g: Tensor, scale: int, mode: str) -> Tensor:
    """The adjoint (vector-Jacobian product) of `_upsample`."""
    n, c, hs, ws = g.shape
    if mode == "nearest":
        return g.reshape(n, c, hs // scale, scale, ws // scale, scale).sum((3, 5))
    opmath = opmath_dtype(g.dtype)
    t = _lerp2x_last_adjoint(g.to(opmath).transpose(-1, -2)).transpose(-1, -2)
    return _lerp2x_last_adjoint(t).to(g.dtype)


def _lerp2x_last(t: Tensor) -> Tensor:
    # align_corners=False, scale 2: out[2m] = .75 t[m] + .25 t[m-1], out[2m+1] = .75 t[m] + .25 t[m+1],
    # neighbours clamped (the replicated edge).
    tp = torch.cat([t[..., :1], t, t[..., -1:]], -1)
    even = 0.75 * t + 0.25 * tp[..., :-2]
    odd = 0.75 * t + 0.25 * tp[..., 2:]
    return torch.stack([even, odd], -1).flatten(-2)


def _lerp2x_last_adjoint(g: Tensor) -> Tensor:
    n = g.shape[-1] // 2
    pairs = g.unflatten(-1, (n, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    # the adjoint onto the edge-padded input (n + 2 entries), then the edges folded back in
    gp = F.pad(0.25 * even, (0, 2)) + F.pad(0.75 * (even + odd), (1, 1)) + F.pad(0.25 * odd, (2, 0))
    return gp[..., 1:-1] + F.pad(gp[..., :1], (0, n - 1)) + F.pad(gp[..., -1:], (n - 1, 0))


# ---------------------------------------------------------------------------------------------
# kernel launchers

def _fp32_stages() -> int:
    """Pipeline stages of the fp32 tiles: 2 on sm_80, 1 from sm_90 (each setting spilled 4-8 B on the
    other architecture: tools/triton_aot.py); read from Triton's target, which its AOT driver sets too."""
    import triton

    try:
        return 2 if triton.runtime.driver.active.get_current_target().arch < 90 else 1
    except Exception:  # the interpreter has no GPU target; stages mean nothing there
        return 1


INT32_INDICES = 2 ** 31  # pixel indices below this are divided in int32 (tools/triton_aot.py lowers it once)


def _tiles(dtype: torch.dtype, c: int, co: int, eight_warps: bool) -> tuple[int, int, int, dict]:
    """The implicit GEMM's (BLOCK_M, BLOCK_N, BLOCK_K, launch options), for upsample_conv2d and
    upsample_conv3d. Registers, checked at every block size (tools/triton_aot.py): fp32 products go
    through FMAs, not tensor cores, and the pipeline's stages sit in registers: 64 x 32 tiles spilled
    4-628 B at every warp/stage setting tried on sm_80 or sm_90; 32 x 16 tiles with 4 warps none
    (_fp32_stages). fp16/bf16: 64-position tiles on tensor cores, 8 warps where the caller's gather needs them."""
    import triton

    block_n = max(16, min(64, triton.next_power_of_2(co)))
    if dtype == torch.float32:
        return 32, block_n, 16, dict(num_warps=4, num_stages=_fp32_stages())
    return 64, block_n, max(16, min(32, triton.next_power_of_2(c))), dict(num_warps=8) if eight_warps else {}


def _upsample_conv2d_triton(x, weight, bias, scale, mode, padding):
    import triton

    from fastgen.kernels.upsample_conv2d import _upsample_conv2d_fwd_kernel

    packed, kf = _packed_weight(weight, scale, mode, padding)
    n, c, h, w = x.shape
    co, k = weight.shape[0], weight.shape[-1]
    hout, wout = _out_size(x, k, scale, padding)
    bilinear = mode == "bilinear"
    phases = 1 if bilinear else scale
    hm, wm = (hout, wout) if bilinear else (-(-hout // scale), -(-wout // scale))
    out = torch.empty((n, co, hout, wout), dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    emulate_bf16 = x.dtype == torch.bfloat16 and _INTERPRET
    # Bilinear gathers four values per A element: with 4 warps fp16/bf16 NCHW spilled up to 832 B at a K
    # tile of 32, 8 none; channels_last (channels contiguous) none with 4, but 4 B on sm_80 with 8.
    block_m, block_n, block_k, launch = _tiles(x.dtype, c, co, eight_warps=bilinear and x.stride(1) != 1)
    grid = (triton.cdiv(n * hm * wm, block_m), triton.cdiv(co, block_n), phases * phases)
    _upsample_conv2d_fwd_kernel[grid](
        x, packed, bias.contiguous() if bias is not None else packed, out,  # bias read as contiguous
        n, c, h, w, co, hout, wout, hm, wm,
        *x.stride(), *out.stride(), padding,
        S=scale, PHASES=phases, KF=kf, BILINEAR=bilinear, HAS_BIAS=bias is not None,
        # The interpreter gets bf16 wrong (triton #4972; its fp32 -> bf16 cast truncates): there
        # bf16 tiles go through the dot as fp32, exact since bf16 products fit in fp32, as on
        # tensor cores, and roundings to bf16 are done by hand.
        DOT_IN_FP32=x.dtype == torch.float32 or emulate_bf16, EMULATE_BF16=emulate_bf16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, M_FITS_INT32=n * hm * wm + block_m < INT32_INDICES,
        **launch,
    )
    return out


def _upsample_conv2d_cuda(x, weight, bias, scale, mode, padding):
    packed, _ = _packed_weight(weight, scale, mode, padding)
    return torch.ops.fastgen._upsample_conv2d_fused(x, packed, bias, scale, mode == "bilinear", padding,
                                                    weight.shape[-1])


# ---------------------------------------------------------------------------------------------
# registration: `backend` is always a concrete name here (resolved by the public function).

def _upsample_conv2d_xla(x, weight, bias, scale_factor, mode, padding):
    return _upsample_conv2d_composite(x, weight, bias, scale_factor, mode, padding, in_place_interleave=False)


def _fake_upsample_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale_factor: int, mode: str, padding: int,
                          backend: str) -> Tensor:
    _check_upsample_conv2d(x, weight, bias, scale_factor, mode, padding)
    hout, wout = _out_size(x, weight.shape[-1], scale_factor, padding)
    return torch.empty((x.shape[0], weight.shape[0], hout, wout), dtype=x.dtype, device=x.device,
                       memory_format=memory_format(x))


def _setup_context_upsample_conv2d(ctx, inputs, output):
    x, weight, bias, scale_factor, mode, padding, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.args = (scale_factor, mode, padding)


def _backward_upsample_conv2d(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    scale, mode, padding = ctx.args
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    # Built from aten ops (each differentiable and lowered by XLA), so double backward works.
    if mode == "nearest":
        gx, gw = _backward_nearest(grad, x, weight, scale, padding, need_x, need_w)
    else:
        gxu, gw, _ = torch.ops.aten.convolution_backward(
            grad, _upsample(x, scale, mode), weight, None, [1, 1], [padding, padding], [1, 1], False,
            [0, 0], 1, [need_x, need_w, False])
        gx = _upsample_adjoint(gxu, scale, mode) if need_x else None
    gb = grad.sum((0, 2, 3)) if need_b and ctx.has_bias else None
    return gx, gw, gb, None, None, None, None


def _backward_nearest(grad, x, weight, scale, padding, need_x, need_w):
    """The adjoint of the composite's phase convolution: 16/36 of eager's backward work (k=3)."""
    n, co, hout, wout = grad.shape
    wf, lo, kf = _folded_weight(weight, scale, padding)
    hm, wm, pads = _phase_grid(x.shape, weight.shape[-1], scale, padding, lo, kf)
    # grad laid out as the phase convolution's output: (N, S*S*CO, hc, wc), zeros where no output
    g = F.pad(grad, (0, scale * wm - wout, 0, scale * hm - hout))
    g = g.reshape(n, co, hm, scale, wm, scale)
    hc, wc = hm + lo[-1] - lo[0], wm + lo[-1] - lo[0]
    phases = [F.pad(g[:, :, :, ry, :, rx], (lo[rx] - lo[0], wc - wm - lo[rx] + lo[0],
                                            lo[ry] - lo[0], hc - hm - lo[ry] + lo[0]))
              for ry in range(scale) for rx in range(scale)]
    xp, conv_pad = _phase_conv_input(x, pads)
    gxp, gwf, _ = torch.ops.aten.convolution_backward(
        torch.cat(phases, 1), xp, wf.flatten(0, 2), None, [1, 1], [conv_pad, conv_pad], [1, 1], False,
        [0, 0], 1, [need_x, need_w, False])
    gx = gw = None
    if need_x:
        gx = gxp if xp is x else F.pad(gxp, tuple(-p for p in pads))  # the adjoint of the pad
    if need_w:
        _, _, fold = _fold_axis(scale, weight.shape[-1], padding)
        m = _fold_matrix(fold, weight)
        gw = torch.einsum("rai,sbj,rsocab->ocij", m, m,
                          gwf.unflatten(0, (scale, scale, co)).to(m.dtype)).to(weight.dtype)
    return gx, gw


def _example_inputs():
    return torch.randn(2, 4, 5, 6), torch.randn(3, 4, 3, 3) / 6, torch.randn(3)


SPEC = define(OpSpec(
    name="upsample_conv2d", public=upsample_conv2d,
    impls={"composite": Impl(_upsample_conv2d_composite), "triton": Impl(_upsample_conv2d_triton, NO_FLOAT64),
           "cuda": Impl(_upsample_conv2d_cuda, kernels=("_upsample_conv2d_fused",))},
    # fastest first (benchmarks/NOTES.md). On the CPU, aten's bilinear upsampling kernel beats the
    # composite's explicit one: auto takes the plain eager layers there.
    auto={**KERNELS_FIRST, "cpu/bilinear": ("reference",)},
    custom_op=True,
    xla=_upsample_conv2d_xla,
    examples=(Example("upsample_conv2d_nearest", _example_inputs, grad_of=(0, 1, 2)),
              Example("upsample_conv2d_bilinear", _example_inputs, {"mode": "bilinear"}, (0, 1, 2))),
))
