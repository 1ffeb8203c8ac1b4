"""Channel RMS norm + affine + activation: y = act(x * r * weight[c] + bias[c]),
r = 1 / sqrt(mean over channels of x^2 + eps) (clamp: 1 / max(sqrt(mean x^2), eps), F.normalize's form).

Each program takes BLOCK_L positions of one sample and walks their channels in chunks of BLOCK_C
twice: the sums of squares, then the output (the second read hits the cache). x is (N, L, C)
through strides, so NCHW / NCTHW and channels-last load the same tiles. The grid is (position
blocks, samples): no division by the block count (as a 64-bit division it compiled to a called
routine whose stack frame spilled in some variants); a batch stays far below the y dimension's
65535. r is written per position (N, L) in fp32 for the backward.
"""

import triton
import triton.language as tl

from ._common import _round_to_bf16
from .activation import _activate, _activate_grad


@triton.jit(do_not_specialize=['L', 'C'])  # sizes: one compiled variant, not one per size class
def _rms_norm_act_fwd_kernel(
    x_ptr, out_ptr,  # (N, L, C) through strides
    w_ptr, b_ptr,    # (C,) contiguous (x itself when absent: never read)
    r_ptr,           # (N, L) fp32, contiguous
    L, C,
    stride_xn, stride_xl, stride_xc,
    stride_on, stride_ol, stride_oc,
    INV_C, EPS_ADDED, FLOOR, SLOPE,  # 1 / C; eps added to the mean square; its floor (clamp: eps^2)
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,          # activation code (fastgen.activations)
    EMULATE_BF16: tl.constexpr,  # bf16 under the interpreter, whose fp32 -> bf16 cast truncates
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    offs_l = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    mask_l = offs_l < L
    x_rows = x_ptr + n * stride_xn + offs_l[:, None] * stride_xl
    acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)  # c * stride_c reaches C * T * H * W: past int32
        mask = mask_l[:, None] & (offs_c < C)[None, :]
        x = tl.load(x_rows + offs_c[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    # r = 1 / sqrt(ms + eps), or (clamp) 1 / max(rms, eps) = 1 / sqrt(max(ms, eps^2)): one formula,
    # no division (rsqrt is within 2 ulp); a NaN passes the floor (the comparison is false)
    ms = acc * INV_C + EPS_ADDED
    r = tl.math.rsqrt(tl.where(ms < FLOOR, FLOOR, ms))
    tl.store(r_ptr + n * L + offs_l, r, mask=mask_l)
    out_rows = out_ptr + n * stride_on + offs_l[:, None] * stride_ol
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask_c = offs_c < C
        mask = mask_l[:, None] & mask_c[None, :]
        x = tl.load(x_rows + offs_c[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        z = x * r[:, None]
        if HAS_WEIGHT:
            z = z * tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            z = z + tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        y = _activate(z, ACT, SLOPE)
        if EMULATE_BF16:
            y = _round_to_bf16(y)
        tl.store(out_rows + offs_c[None, :] * stride_oc, y.to(out_ptr.dtype.element_ty), mask=mask)


# Backward. With xhat = x r, z = xhat w + b, gz = dy act'(z) and g = gz w:
#   dw = sum over samples and positions of gz xhat, db = sum of gz (each program writes its tile's sums:
#   the host adds them up), dx = r (g - xhat mean_c(g xhat)), where r depends on x; with clamp only where
#   rms > eps (r eps < 1), elsewhere r = 1 / eps is constant and dx = r g.
@triton.jit
def _rms_norm_act_grad_tile(dy_ptr, x_ptr, w_ptr, b_ptr, offs_l, mask_l, offs_c, r, C,
                            stride_dl, stride_dc, stride_xl, stride_xc, SLOPE,
                            HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
    """(xhat, gz, g) of one tile of positions x channels, fp32; zero outside."""
    mask_c = offs_c < C
    mask = mask_l[:, None] & mask_c[None, :]
    x = tl.load(x_ptr + offs_l[:, None] * stride_xl + offs_c[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs_l[:, None] * stride_dl + offs_c[None, :] * stride_dc, mask=mask, other=0.0).to(tl.float32)
    xhat = x * r[:, None]
    z = xhat
    g_scale = tl.full([1, 1], 1.0, tl.float32)
    if HAS_WEIGHT:
        g_scale = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        z = z * g_scale
    if HAS_BIAS:
        z = z + tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    gz = dy * _activate_grad(z, ACT, SLOPE)  # dy is 0 outside: so is gz
    return xhat, gz, gz * g_scale


@triton.jit(do_not_specialize=['L', 'C'])  # sizes: one compiled variant, not one per size class
def _rms_norm_act_bwd_kernel(
    dy_ptr, x_ptr, dx_ptr,  # (N, L, C) through strides; dx written when NEED_X
    w_ptr, b_ptr,           # (C,) contiguous (x itself when absent: never read)
    r_ptr,                  # (N, L) fp32, contiguous: the forward's
    dw_ptr, db_ptr,         # (N, blocks of L, C) fp32, contiguous: this program's sums of gz xhat and gz
    L, C,
    stride_dn, stride_dl, stride_dc,
    stride_xn, stride_xl, stride_xc,
    stride_gn, stride_gl, stride_gc,
    INV_C, EPS, SLOPE,  # 1 / C; clamp's eps
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,          # activation code (fastgen.activations)
    CLAMP: tl.constexpr,        # F.normalize's form: r depends on x only where rms > eps
    NEED_X: tl.constexpr,
    EMULATE_BF16: tl.constexpr,  # bf16 under the interpreter, whose fp32 -> bf16 cast truncates
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    pid_l = tl.program_id(0)
    offs_l = pid_l.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    mask_l = offs_l < L
    r = tl.load(r_ptr + n * L + offs_l, mask=mask_l, other=0.0)
    dy_rows, x_rows = dy_ptr + n * stride_dn, x_ptr + n * stride_xn
    part = (n * tl.num_programs(0) + pid_l) * C
    proj = tl.zeros([BLOCK_L], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)  # c * stride_c reaches C * T * H * W: past int32
        xhat, gz, g = _rms_norm_act_grad_tile(dy_rows, x_rows, w_ptr, b_ptr, offs_l, mask_l, offs_c, r, C,
                                              stride_dl, stride_dc, stride_xl, stride_xc, SLOPE,
                                              HAS_WEIGHT, HAS_BIAS, ACT)
        tl.store(dw_ptr + part + offs_c, tl.sum(gz * xhat, axis=0), mask=offs_c < C)
        tl.store(db_ptr + part + offs_c, tl.sum(gz, axis=0), mask=offs_c < C)
        proj += tl.sum(g * xhat, axis=1)
    if NEED_X:
        proj = proj * INV_C
        if CLAMP:
            proj = tl.where(r * EPS < 1.0, proj, 0.0)
        dx_rows = dx_ptr + n * stride_gn
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            xhat, gz, g = _rms_norm_act_grad_tile(dy_rows, x_rows, w_ptr, b_ptr, offs_l, mask_l, offs_c, r, C,
                                                  stride_dl, stride_dc, stride_xl, stride_xc, SLOPE,
                                                  HAS_WEIGHT, HAS_BIAS, ACT)
            dx = r[:, None] * (g - xhat * proj[:, None])
            if EMULATE_BF16:
                dx = _round_to_bf16(dx)
            tl.store(dx_rows + offs_l[:, None] * stride_gl + offs_c[None, :] * stride_gc,
                     dx.to(dx_ptr.dtype.element_ty), mask=mask_l[:, None] & (offs_c < C)[None, :])
