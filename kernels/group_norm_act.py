"""GroupNorm + activation: two passes over x, one write.

Each (sample, group) owns C/G channels x L positions; its positions are cut into `split` chunks so
that a GPU has enough programs. Pass 1 (_group_norm_stats_kernel): each program folds its chunk
into (mean, M2) tile by tile with Chan's parallel formula,
    n = n_a + n_b,  d = mean_b - mean_a,  mean = mean_a + d * n_b / n,  M2 = M2_a + M2_b + d^2 n_a n_b / n,
which never forms E[x^2] - E[x]^2, over x - K with K the group's first value (so that a constant
group's mean is exact: its rstd ~ 1/sqrt(eps) magnifies any error there). Pass 2 (_group_norm_act_fwd_kernel): each program merges its
group's partials the same way, var = M2 / n, and writes y = act((x - K - mean) * a_c + bias_c) over its
chunk with a_c = rstd * weight_c (the mean is not folded into the bias: where a group is nearly
constant, a_c is huge and x * a_c + (bias_c - mean * a_c) cancels two large numbers).
x is read through strides as (N, C, L): unit stride along L (NCHW) or along C (channels_last), in
tiles of BLOCK_C channels x BLOCK_L positions; a group with more channels than BLOCK_C (up to 64) is
walked chunk by chunk (a whole group of 512 channels in one tile spilled registers: tools/triton_aot.py).
The chunk loop is compiled only where a group needs it (CHUNKED): around a single chunk the loop alone
made ptxas spill 4-8 B in the backward kernels.

Backward, from the forward's saved mean and rstd per (sample, group), on the same grid: with
z = (x - mean) * a_c + bias_c and gz = dy * act'(z), _group_norm_bwd_sums_kernel writes each chunk's
per-channel sums of gz and gz * (x - mean); the launcher adds the chunks up (dbeta, and dgamma / rstd);
_group_norm_bwd_dx_kernel forms the group's s1 = sum_c a_c sum(gz), s2 = sum_c a_c sum(gz (x - mean))
and writes dx = gz * a_c + (x - mean) * p + q, p = -rstd^2 s2 / n, q = -s1 / n, gz recomputed
(on a GPU a recompute is cheaper than writing gz and reading it back).
"""

import triton
import triton.language as tl

from ._common import _round_to_bf16
from .activation import _activate, _activate_grad


@triton.jit
def _program_group(C, CG):
    """This program's (sample, group): row = n * G + g and n (int64), the group's first channel (int32).
    Divided in int32: an int64 division is a called routine that spills (tools/triton_aot.py)."""
    pid = tl.program_id(0)
    groups = C // CG
    return pid.to(tl.int64), (pid // groups).to(tl.int64), (pid % groups) * CG


@triton.jit
def _program_group64(C, CG):
    """_program_group divided in int64, for the statistics and forward kernels: on sm_80 the int32
    form made ptxas spill 4 B in some of their variants (tools/triton_aot.py), this one none."""
    row = tl.program_id(0).to(tl.int64)
    groups = C // CG
    return row, row // groups, (row % groups) * CG


@triton.jit
def _channels(c0, first, CG, BLOCK_C: tl.constexpr):
    """The chunk of a group's channels from c0: offsets in the group, mask, channel indices (int64)."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    return offs_c, offs_c < CG, (first + offs_c).to(tl.int64)


@triton.jit
def _stats_chunk(x_ptr, n, first, c0, start, count, mean, m2, CG, L, CHUNK, k, stride_xn, stride_xc, stride_xl,
                 BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """(count, mean, M2) of x - k with one chunk of channels x this program's positions folded in."""
    offs_c, mask_c, ch = _channels(c0, first, CG, BLOCK_C)
    base = x_ptr + n * stride_xn + ch[:, None] * stride_xc
    for l0 in range(0, CHUNK, BLOCK_L):
        offs_l = start + l0 + tl.arange(0, BLOCK_L)
        mask = mask_c[:, None] & (offs_l < L)[None, :] & (offs_l < start + CHUNK)[None, :]
        v = tl.load(base + offs_l[None, :] * stride_xl, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(mask, v - k, 0.0)
        n_b = tl.sum(mask.to(tl.float32), axis=None)
        if n_b > 0:
            mean_b = tl.sum(v, axis=None) / n_b
            d_b = tl.where(mask, v - mean_b, 0.0)
            m2_b = tl.sum(d_b * d_b, axis=None)
            total = count + n_b
            d = mean_b - mean
            mean += d * n_b / total
            m2 += m2_b + d * d * count * n_b / total
            count = total
    return count, mean, m2


@triton.jit(do_not_specialize=['C', 'L', 'CG', 'CHUNK'])  # sizes: one compiled variant, not one per size class
def _group_norm_stats_kernel(
    x_ptr,  # (N, C, L), strides stride_xn, stride_xc, stride_xl
    mean_ptr, m2_ptr,  # (N * G, SPLIT) fp32 partial statistics of x - K, K the group's first value
    C, L, CG,  # channels, positions, channels per group
    CHUNK,  # positions per program
    stride_xn, stride_xc, stride_xl,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, CHUNKED: tl.constexpr,
):
    row, n, first = _program_group64(C, CG)
    part = tl.program_id(1)
    split = tl.num_programs(1)
    start = part.to(tl.int64) * CHUNK
    k = tl.load(x_ptr + n * stride_xn + first.to(tl.int64) * stride_xc).to(tl.float32)  # the shift
    count = tl.zeros((), dtype=tl.float32)
    mean = tl.zeros((), dtype=tl.float32)
    m2 = tl.zeros((), dtype=tl.float32)
    if CHUNKED:
        for c0 in range(0, CG, BLOCK_C):
            count, mean, m2 = _stats_chunk(x_ptr, n, first, c0, start, count, mean, m2, CG, L, CHUNK, k, stride_xn,
                                           stride_xc, stride_xl, BLOCK_C, BLOCK_L)
    else:
        count, mean, m2 = _stats_chunk(x_ptr, n, first, 0, start, count, mean, m2, CG, L, CHUNK, k, stride_xn,
                                       stride_xc, stride_xl, BLOCK_C, BLOCK_L)
    tl.store(mean_ptr + row * split + part, mean)
    tl.store(m2_ptr + row * split + part, m2)


@triton.jit
def _group_coefficients(w_ptr, b_ptr, rstd, n, ch, mask_c, stride_wn, stride_bn,
                        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
    """The forward's a_c = rstd * weight_c and bias_c for the channels ch of sample n."""
    a = tl.zeros((BLOCK_C,), dtype=tl.float32) + rstd
    if HAS_WEIGHT:
        a = a * tl.load(w_ptr + n * stride_wn + ch, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_BIAS:
        b += tl.load(b_ptr + n * stride_bn + ch, mask=mask_c, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _forward_chunk(x_ptr, out_ptr, w_ptr, b_ptr, n, first, c0, start, k, mean, rstd, CG, L, CHUNK,
                   stride_xn, stride_xc, stride_xl, stride_on, stride_oc, stride_ol, stride_wn, stride_bn, SLOPE,
                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, EMULATE_BF16: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """y = act((x - k - mean) * a_c + bias_c) for one chunk of channels x this program's positions."""
    offs_c, mask_c, ch = _channels(c0, first, CG, BLOCK_C)
    a, b = _group_coefficients(w_ptr, b_ptr, rstd, n, ch, mask_c, stride_wn, stride_bn, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
    x_base = x_ptr + n * stride_xn + ch[:, None] * stride_xc
    o_base = out_ptr + n * stride_on + ch[:, None] * stride_oc
    for l0 in range(0, CHUNK, BLOCK_L):
        offs_l = start + l0 + tl.arange(0, BLOCK_L)
        mask = mask_c[:, None] & (offs_l < L)[None, :] & (offs_l < start + CHUNK)[None, :]
        v = tl.load(x_base + offs_l[None, :] * stride_xl, mask=mask, other=0.0).to(tl.float32)
        y = _activate(((v - k) - mean) * a[:, None] + b[:, None], ACT, SLOPE)
        if EMULATE_BF16:
            y = _round_to_bf16(y)
        tl.store(o_base + offs_l[None, :] * stride_ol, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=['C', 'L', 'CG', 'CHUNK', 'SPLIT'])  # sizes: one compiled variant, not one per size class
def _group_norm_act_fwd_kernel(
    x_ptr, out_ptr,  # (N, C, L) through strides
    w_ptr, b_ptr,  # (C,) or (N, C) contiguous; dummies when absent
    mean_ptr, m2_ptr,  # (N * G, SPLIT) from _group_norm_stats_kernel
    mean_out_ptr, rstd_out_ptr,  # (N * G,) fp32: the group's mean and rstd, for the backward
    C, L, CG, CHUNK, SPLIT,
    stride_xn, stride_xc, stride_xl,
    stride_on, stride_oc, stride_ol,
    stride_wn, stride_bn,  # 0 for a (C,) affine, C for a per-sample (N, C) one
    EPS, SLOPE,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    EMULATE_BF16: tl.constexpr,  # bf16 under the interpreter, whose fp32 -> bf16 cast truncates
    SPLIT_P2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, CHUNKED: tl.constexpr,
):
    row, n, first = _program_group64(C, CG)
    part = tl.program_id(1)

    # merge the group's partial statistics (Chan)
    parts = tl.arange(0, SPLIT_P2)
    mask_p = parts < SPLIT
    counts = tl.minimum(tl.maximum(L - parts.to(tl.int64) * CHUNK, 0), CHUNK).to(tl.float32) * CG
    counts = tl.where(mask_p, counts, 0.0)
    means = tl.load(mean_ptr + row * SPLIT + parts, mask=mask_p, other=0.0)
    m2s = tl.load(m2_ptr + row * SPLIT + parts, mask=mask_p, other=0.0)
    total = tl.sum(counts, axis=0)
    mean = tl.sum(counts * means, axis=0) / total
    d = tl.where(mask_p, means - mean, 0.0)
    var = (tl.sum(m2s, axis=0) + tl.sum(counts * d * d, axis=0)) / total
    rstd = 1.0 / tl.sqrt(var + EPS)

    k = tl.load(x_ptr + n * stride_xn + first.to(tl.int64) * stride_xc).to(tl.float32)
    if part == 0:
        tl.store(mean_out_ptr + row, k + mean)
        tl.store(rstd_out_ptr + row, rstd)
    start = part.to(tl.int64) * CHUNK
    if CHUNKED:
        for c0 in range(0, CG, BLOCK_C):
            _forward_chunk(x_ptr, out_ptr, w_ptr, b_ptr, n, first, c0, start, k, mean, rstd, CG, L, CHUNK,
                           stride_xn, stride_xc, stride_xl, stride_on, stride_oc, stride_ol, stride_wn, stride_bn,
                           SLOPE, HAS_WEIGHT, HAS_BIAS, ACT, EMULATE_BF16, BLOCK_C, BLOCK_L)
    else:
        _forward_chunk(x_ptr, out_ptr, w_ptr, b_ptr, n, first, 0, start, k, mean, rstd, CG, L, CHUNK,
                       stride_xn, stride_xc, stride_xl, stride_on, stride_oc, stride_ol, stride_wn, stride_bn,
                       SLOPE, HAS_WEIGHT, HAS_BIAS, ACT, EMULATE_BF16, BLOCK_C, BLOCK_L)


@triton.jit
def _tile_gradient(dy_ptr, x_base, d_off, offs_l, start, mask_c, mean, a, b, L, CHUNK, stride_xl, stride_dl, SLOPE,
                   ACT: tl.constexpr):
    """One tile of channels x positions of the backward: its mask, x - mean, dy's offsets and
    gz = dy * act'(z) with z = (x - mean) * a + b (0 where masked)."""
    mask = mask_c[:, None] & (offs_l < L)[None, :] & (offs_l < start + CHUNK)[None, :]
    d = tl.load(x_base + offs_l[None, :] * stride_xl, mask=mask, other=0.0).to(tl.float32) - mean
    offs = d_off + offs_l[None, :] * stride_dl
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return mask, d, offs, tl.where(mask, dy * _activate_grad(d * a[:, None] + b[:, None], ACT, SLOPE), 0.0)


@triton.jit
def _sums_chunk(dy_ptr, x_ptr, w_ptr, b_ptr, sum_ptr, sumd_ptr, n, first, c0, start, part, split, mean, rstd,
                C, L, CG, CHUNK, stride_xn, stride_xc, stride_xl, stride_dn, stride_dc, stride_dl,
                stride_wn, stride_bn, SLOPE, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """This program's per-channel sums of gz and gz * (x - mean), for one chunk of channels."""
    offs_c, mask_c, ch = _channels(c0, first, CG, BLOCK_C)
    a, b = _group_coefficients(w_ptr, b_ptr, rstd, n, ch, mask_c, stride_wn, stride_bn, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
    x_base = x_ptr + n * stride_xn + ch[:, None] * stride_xc
    d_off = n * stride_dn + ch[:, None] * stride_dc
    # tiles of sums, reduced once after the loop
    acc1 = tl.zeros((BLOCK_C, BLOCK_L), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_C, BLOCK_L), dtype=tl.float32)
    for l0 in range(0, CHUNK, BLOCK_L):
        offs_l = start + l0 + tl.arange(0, BLOCK_L)
        _, d, _, gz = _tile_gradient(dy_ptr, x_base, d_off, offs_l, start, mask_c, mean, a, b, L, CHUNK, stride_xl,
                                     stride_dl, SLOPE, ACT)
        acc1 += gz
        acc2 += gz * d
    out = (n * C + ch) * split + part
    tl.store(sum_ptr + out, tl.sum(acc1, axis=1), mask=mask_c)
    tl.store(sumd_ptr + out, tl.sum(acc2, axis=1), mask=mask_c)


@triton.jit(do_not_specialize=['C', 'L', 'CG', 'CHUNK'])
def _group_norm_bwd_sums_kernel(
    dy_ptr, x_ptr,  # (N, C, L) through strides (dy in x's layout)
    w_ptr, b_ptr,  # (C,) or (N, C) contiguous; dummies when absent
    mean_ptr, rstd_ptr,  # (N * G,) fp32 from the forward
    sum_ptr, sumd_ptr,  # (N, C, SPLIT) fp32: per chunk sum(gz) and sum(gz * (x - mean))
    C, L, CG, CHUNK,
    stride_xn, stride_xc, stride_xl,
    stride_dn, stride_dc, stride_dl,
    stride_wn, stride_bn, SLOPE,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, CHUNKED: tl.constexpr,
):
    row, n, first = _program_group64(C, CG) if CHUNKED else _program_group(C, CG)
    part = tl.program_id(1)
    split = tl.num_programs(1)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    start = part.to(tl.int64) * CHUNK
    if CHUNKED:
        for c0 in range(0, CG, BLOCK_C):
            _sums_chunk(dy_ptr, x_ptr, w_ptr, b_ptr, sum_ptr, sumd_ptr, n, first, c0, start, part, split, mean, rstd,
                        C, L, CG, CHUNK, stride_xn, stride_xc, stride_xl, stride_dn, stride_dc, stride_dl,
                        stride_wn, stride_bn, SLOPE, HAS_WEIGHT, HAS_BIAS, ACT, BLOCK_C, BLOCK_L)
    else:
        _sums_chunk(dy_ptr, x_ptr, w_ptr, b_ptr, sum_ptr, sumd_ptr, n, first, 0, start, part, split, mean, rstd,
                    C, L, CG, CHUNK, stride_xn, stride_xc, stride_xl, stride_dn, stride_dc, stride_dl,
                    stride_wn, stride_bn, SLOPE, HAS_WEIGHT, HAS_BIAS, ACT, BLOCK_C, BLOCK_L)


@triton.jit
def _group_sums(w_ptr, b_ptr, sum_ptr, sumd_ptr, n, first, c0, rstd, s1, s2, C, CG, stride_wn, stride_bn,
                HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
    """s1 += sum_c a_c sum(gz), s2 += sum_c a_c sum(gz (x - mean)) over one chunk of channels."""
    offs_c, mask_c, ch = _channels(c0, first, CG, BLOCK_C)
    a, b = _group_coefficients(w_ptr, b_ptr, rstd, n, ch, mask_c, stride_wn, stride_bn, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
    s1 += tl.sum(a * tl.load(sum_ptr + n * C + ch, mask=mask_c, other=0.0), axis=0)
    s2 += tl.sum(a * tl.load(sumd_ptr + n * C + ch, mask=mask_c, other=0.0), axis=0)
    return s1, s2


@triton.jit
def _dx_chunk(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, n, first, c0, start, mean, rstd, p, q, L, CG, CHUNK,
              stride_xn, stride_xc, stride_xl, stride_dn, stride_dc, stride_dl, stride_wn, stride_bn, SLOPE,
              HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, EMULATE_BF16: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """dx = gz * a_c + (x - mean) * p + q for one chunk of channels x this program's positions."""
    offs_c, mask_c, ch = _channels(c0, first, CG, BLOCK_C)
    a, b = _group_coefficients(w_ptr, b_ptr, rstd, n, ch, mask_c, stride_wn, stride_bn, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
    x_base = x_ptr + n * stride_xn + ch[:, None] * stride_xc
    d_off = n * stride_dn + ch[:, None] * stride_dc
    for l0 in range(0, CHUNK, BLOCK_L):
        offs_l = start + l0 + tl.arange(0, BLOCK_L)
        mask, d, offs, gz = _tile_gradient(dy_ptr, x_base, d_off, offs_l, start, mask_c, mean, a, b, L, CHUNK,
                                           stride_xl, stride_dl, SLOPE, ACT)
        dx = gz * a[:, None] + (d * p + q)
        if EMULATE_BF16:
            dx = _round_to_bf16(dx)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=['C', 'L', 'CG', 'CHUNK'])
def _group_norm_bwd_dx_kernel(
    dy_ptr, x_ptr, dx_ptr,  # (N, C, L) through strides; dx in dy's strides
    w_ptr, b_ptr, mean_ptr, rstd_ptr,
    sum_ptr, sumd_ptr,  # (N, C) fp32: sum(gz) and sum(gz * (x - mean)) over the whole group
    C, L, CG, CHUNK,
    stride_xn, stride_xc, stride_xl,
    stride_dn, stride_dc, stride_dl,
    stride_wn, stride_bn, SLOPE,
    INV_COUNT,  # 1 / (CG * L), from the host: an IEEE division here is a called routine (a stack frame)
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    EMULATE_BF16: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, CHUNKED: tl.constexpr,
):
    row, n, first = _program_group(C, CG)
    part = tl.program_id(1)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    s1 = tl.zeros((), dtype=tl.float32)
    s2 = tl.zeros((), dtype=tl.float32)
    start = part.to(tl.int64) * CHUNK
    if CHUNKED:
        for c0 in range(0, CG, BLOCK_C):
            s1, s2 = _group_sums(w_ptr, b_ptr, sum_ptr, sumd_ptr, n, first, c0, rstd, s1, s2, C, CG, stride_wn,
                                 stride_bn, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
        p = -rstd * rstd * s2 * INV_COUNT
        q = -s1 * INV_COUNT
        for c0 in range(0, CG, BLOCK_C):
            _dx_chunk(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, n, first, c0, start, mean, rstd, p, q, L, CG, CHUNK,
                      stride_xn, stride_xc, stride_xl, stride_dn, stride_dc, stride_dl, stride_wn, stride_bn, SLOPE,
                      HAS_WEIGHT, HAS_BIAS, ACT, EMULATE_BF16, BLOCK_C, BLOCK_L)
    else:
        s1, s2 = _group_sums(w_ptr, b_ptr, sum_ptr, sumd_ptr, n, first, 0, rstd, s1, s2, C, CG, stride_wn,
                             stride_bn, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
        p = -rstd * rstd * s2 * INV_COUNT
        q = -s1 * INV_COUNT
        _dx_chunk(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, n, first, 0, start, mean, rstd, p, q, L, CG, CHUNK,
                  stride_xn, stride_xc, stride_xl, stride_dn, stride_dc, stride_dl, stride_wn, stride_bn, SLOPE,
                  HAS_WEIGHT, HAS_BIAS, ACT, EMULATE_BF16, BLOCK_C, BLOCK_L)
