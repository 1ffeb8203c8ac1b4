"""Nearest upsample + zero padding + conv3d as one implicit GEMM that reads the small clip.

Derivation (one axis; the three are alike and independent). With scale S, padding F in front of the
upsampled axis and kernel taps i < K, output index o reads upsampled index o - F + i, which is x index
floor((o - F + i) / S) (zero outside [0, size): exactly the zero padding and the far side's padding).
Write o = S*q + r (phase r): tap i reads x index q + floor((r - F + i) / S), i.e. q + lo(r) + a with
lo(r) = floor((r - F) / S) and a < KF. The host sums, per phase, the taps that land on the same a
(fastgen/ops/upsample_conv3d.py `_packed_weight`); each phase is then a KFT x KFH x KFW convolution
of x. A 3x3x3 kernel after 2x in every axis: 8 phases of 2x2x2 taps, 8/27 of the unfused work.
GEMM view per phase: M = N * TM * HM * WM output positions, N = CO, K = KFT * KFH * KFW * C. Each
program computes a BLOCK_M x BLOCK_N tile and writes it straight to its interleaved places.
"""

import triton
import triton.language as tl

from ._common import _round_to_bf16
from .upsample_conv2d import _accumulate, _floordiv


@triton.jit(do_not_specialize=['N', 'C', 'T', 'H', 'W', 'CO', 'TOUT', 'HOUT', 'WOUT', 'TM', 'HM', 'WM',
                               'FRONT_T', 'FRONT_H', 'FRONT_W'])  # one compiled variant, not one per size class
def _upsample_conv3d_fwd_kernel(
    x_ptr,  # (N, C, T, H, W), any strides
    w_ptr,  # (ST * SH * SW, KFT, KFH, KFW, C, CO) contiguous, x's dtype
    b_ptr,  # (CO,) or a dummy when HAS_BIAS is False
    out_ptr,  # (N, CO, TOUT, HOUT, WOUT), any strides
    N, C, T, H, W, CO, TOUT, HOUT, WOUT,
    TM, HM, WM,  # positions per phase: ceil(TOUT / ST), ...
    stride_xn, stride_xc, stride_xt, stride_xh, stride_xw,
    stride_on, stride_oc, stride_ot, stride_oh, stride_ow,
    FRONT_T, FRONT_H, FRONT_W,  # zero padding in front of each upsampled axis
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,  # scale factors
    KFT: tl.constexpr, KFH: tl.constexpr, KFW: tl.constexpr,  # folded taps per axis
    HAS_BIAS: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # multiply tiles as fp32 with exact IEEE products (no TF32)
    EMULATE_BF16: tl.constexpr,  # bf16 under the interpreter: round in fp32 with _round_to_bf16
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    M_FITS_INT32: tl.constexpr,  # every position index (N * TM * HM * WM, plus a block) below 2^31
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    phase = tl.program_id(2)
    rt = phase // (SH * SW)
    rh = (phase // SW) % SH
    rw = phase % SW

    if M_FITS_INT32:  # divided in int32: an int64 division is a called routine (a stack frame)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N * TM * HM * WM
        n = (offs_m // (TM * HM * WM)).to(tl.int64)
    else:
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < N.to(tl.int64) * TM * HM * WM
        n = offs_m // (TM * HM * WM)
    mt = ((offs_m // (HM * WM)) % TM).to(tl.int32)  # below the output sizes
    mh = ((offs_m // WM) % HM).to(tl.int32)
    mw = (offs_m % WM).to(tl.int32)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < CO
    x_base = x_ptr + n * stride_xn
    lo_t = _floordiv(rt - FRONT_T, ST)
    lo_h = _floordiv(rh - FRONT_H, SH)
    lo_w = _floordiv(rw - FRONT_W, SW)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(KFT * KFH * KFW):
        it = mt + lo_t + tap // (KFH * KFW)
        ih = mh + lo_h + (tap // KFW) % KFH
        iw = mw + lo_w + tap % KFW
        valid = mask_m & (it >= 0) & (it < T) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        offs_x = it.to(tl.int64) * stride_xt + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
        w_tap = w_ptr + (phase * KFT * KFH * KFW + tap).to(tl.int64) * C * CO
        for c0 in range(0, C, BLOCK_K):
            offs_k = c0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < C
            a_tile = tl.load(x_base[:, None] + offs_k[None, :].to(tl.int64) * stride_xc + offs_x[:, None],
                             mask=valid[:, None] & mask_k[None, :], other=0.0)
            acc = _accumulate(acc, a_tile, w_tap, offs_k, mask_k, offs_n, mask_n, CO, DOT_IN_FP32)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if EMULATE_BF16:
        acc = _round_to_bf16(acc)
    ot = mt * ST + rt
    oh = mh * SH + rh
    ow = mw * SW + rw
    mask_o = mask_m[:, None] & mask_n[None, :] & ((ot < TOUT) & (oh < HOUT) & (ow < WOUT))[:, None]
    out_offs = (n * stride_on + ot.to(tl.int64) * stride_ot + oh.to(tl.int64) * stride_oh
                + ow.to(tl.int64) * stride_ow)[:, None] + offs_n[None, :].to(tl.int64) * stride_oc
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_o)
