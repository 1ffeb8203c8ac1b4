"""Fused upsample + conv2d as one implicit GEMM that reads the un-upsampled input.

Derivation (one axis; the other is the same). Output row Y of conv(upsample(x)) with kernel k,
padding p, scale s reads upsampled rows Y + i - p, i < k.
  nearest:  upsampled row u is x row floor(u / s), zero outside [0, s*H) exactly when the x row is
            outside [0, H). Write Y = s*m + r (phase r): tap i reads x row m + floor((r + i - p) / s),
            so per phase the k taps collapse onto KF <= ceil(k / s) + 1 rows starting at
            lo(r) = floor((r - p) / s). The host folds the weights per phase (summing the taps that
            land on the same row), and each phase is a KFxKF convolution over x: for k=3, s=2,
            four 2x2 kernels, 16 instead of 36 multiply-adds per input pixel.
  bilinear: (s = 2, align_corners=False) upsampled row u = 2*m + r is 0.75*x[m] + 0.25*x[m -/+ 1]
            (r = 0 / 1), the neighbour clamped to [0, H); rows outside [0, 2H) are the conv's zero
            padding. The kernel forms those values on the fly while gathering the A tile.
GEMM view per phase: M = N * HM * WM output pixels, N = CO output channels, K = KF * KF * C.
Each program computes a BLOCK_M x BLOCK_N tile and writes it straight to its interleaved places.
"""

import triton
import triton.language as tl

from ._common import _round_to_bf16


@triton.jit
def _floordiv(a, b):
    # floor division for possibly negative a and positive b (integer // truncates toward zero)
    return tl.where(a >= 0, a // b, -((-a + b - 1) // b))


@triton.jit
def _accumulate(acc, a_tile, w_tap, offs_k, mask_k, offs_n, mask_n, CO, DOT_IN_FP32: tl.constexpr):
    """acc + a_tile @ the weights' (K tile x N tile) of one tap, w_tap (C, CO) contiguous."""
    w_tile = tl.load(w_tap + offs_k[:, None] * CO + offs_n[None, :], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
    if DOT_IN_FP32:  # exact IEEE fp32 products (no TF32)
        return acc + tl.dot(a_tile.to(tl.float32), w_tile.to(tl.float32), input_precision="ieee")
    return acc + tl.dot(a_tile, w_tile)


@triton.jit(do_not_specialize=['N', 'C', 'H', 'W', 'CO', 'HOUT', 'WOUT', 'HM', 'WM'])  # sizes: one compiled variant, not one per size class
def _upsample_conv2d_fwd_kernel(
    x_ptr,  # (N, C, H, W), any strides
    w_ptr,  # (PHASES * PHASES, KF, KF, C, CO) contiguous, x's dtype
    b_ptr,  # (CO,) or a dummy when HAS_BIAS is False
    out_ptr,  # (N, CO, HOUT, WOUT), any strides
    N, C, H, W, CO, HOUT, WOUT,
    HM, WM,  # pixel grid per phase: ceil(HOUT / S) for nearest, HOUT for bilinear
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_on, stride_oc, stride_oh, stride_ow,
    PAD,  # the conv's zero padding, on the upsampled image
    S: tl.constexpr,  # scale factor
    PHASES: tl.constexpr,  # S for nearest (one program column per phase), 1 for bilinear
    KF: tl.constexpr,  # taps per axis: folded for nearest, the kernel size for bilinear
    BILINEAR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # multiply tiles as fp32 with exact IEEE products (no TF32)
    EMULATE_BF16: tl.constexpr,  # bf16 under the interpreter: round in fp32 with _round_to_bf16
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    M_FITS_INT32: tl.constexpr,  # every pixel index (N * HM * WM, plus a block) below 2^31
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    phase = tl.program_id(2)
    ry = phase // PHASES
    rx = phase % PHASES

    if M_FITS_INT32:  # pixel indices divided in int32: an int64 division is a called routine (a stack frame)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N * HM * WM
        n = (offs_m // (HM * WM)).to(tl.int64)
    else:
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < N.to(tl.int64) * HM * WM
        n = offs_m // (HM * WM)
    my = ((offs_m // WM) % HM).to(tl.int32)  # below HOUT
    mx = (offs_m % WM).to(tl.int32)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < CO
    x_base = x_ptr + n * stride_xn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(KF * KF):
        a = tap // KF
        b = tap % KF
        if BILINEAR:
            uy = my + a - PAD  # upsampled coordinates this tap reads
            ux = mx + b - PAD
            valid = mask_m & (uy >= 0) & (uy < 2 * H) & (ux >= 0) & (ux < 2 * W)
            y0 = tl.maximum(uy, 0) // 2
            x0 = tl.maximum(ux, 0) // 2
            y1 = tl.where(uy % 2 == 1, tl.minimum(y0 + 1, H - 1), tl.maximum(y0 - 1, 0))
            x1 = tl.where(ux % 2 == 1, tl.minimum(x0 + 1, W - 1), tl.maximum(x0 - 1, 0))
            off00 = y0.to(tl.int64) * stride_xh + x0 * stride_xw
            off01 = y0.to(tl.int64) * stride_xh + x1 * stride_xw
            off10 = y1.to(tl.int64) * stride_xh + x0 * stride_xw
            off11 = y1.to(tl.int64) * stride_xh + x1 * stride_xw
        else:
            iy = my + _floordiv(ry - PAD, S) + a
            ix = mx + _floordiv(rx - PAD, S) + b
            valid = mask_m & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            off00 = iy.to(tl.int64) * stride_xh + ix * stride_xw
        w_tap = w_ptr + (phase * KF * KF + tap) * C * CO
        for c0 in range(0, C, BLOCK_K):
            offs_k = c0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < C
            mask_a = valid[:, None] & mask_k[None, :]
            ch = offs_k[None, :].to(tl.int64) * stride_xc
            if BILINEAR:
                v = 0.5625 * tl.load(x_base[:, None] + ch + off00[:, None], mask=mask_a, other=0.0).to(tl.float32)
                v += 0.1875 * tl.load(x_base[:, None] + ch + off01[:, None], mask=mask_a, other=0.0).to(tl.float32)
                v += 0.1875 * tl.load(x_base[:, None] + ch + off10[:, None], mask=mask_a, other=0.0).to(tl.float32)
                v += 0.0625 * tl.load(x_base[:, None] + ch + off11[:, None], mask=mask_a, other=0.0).to(tl.float32)
                # round like eager, which materializes the upsampled image in x's dtype
                if EMULATE_BF16:
                    a_tile = _round_to_bf16(v)
                else:
                    a_tile = v.to(x_ptr.dtype.element_ty)
            else:
                a_tile = tl.load(x_base[:, None] + ch + off00[:, None], mask=mask_a, other=0.0)
            acc = _accumulate(acc, a_tile, w_tap, offs_k, mask_k, offs_n, mask_n, CO, DOT_IN_FP32)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if BILINEAR:
        oy = my
        ox = mx
    else:
        oy = my * S + ry
        ox = mx * S + rx
    if EMULATE_BF16:
        acc = _round_to_bf16(acc)
    mask_o = mask_m[:, None] & mask_n[None, :] & (oy < HOUT)[:, None] & (ox < WOUT)[:, None]
    out_offs = (n * stride_on + oy.to(tl.int64) * stride_oh + ox * stride_ow)[:, None] \
        + offs_n[None, :].to(tl.int64) * stride_oc
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_o)
