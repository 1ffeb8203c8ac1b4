"""BatchNorm + activation: per-channel statistics over (N, *), then one normalize + activate pass.

x is read as rows (n, l) x channels through strides, in BLOCK_R x BLOCK_C tiles, so that NCHW
(unit stride along l) and channels_last (unit stride along C) both load whole lines.
_batch_norm_stats_kernel: grid (row chunks, channel blocks); each program folds its rows into
per-channel (mean, M2) of x - K tile by tile with Chan's formula, K the channel's first value (see
kernels/group_norm_act.py).
_batch_norm_act_fwd_kernel: grid (row chunks, channel blocks); merges the SPLIT partials of its
channels (training) or reads the given mean and var, and writes act((x - mean_c) * a_c + bias_c); the programs
of row chunk 0 also store the statistics for the running-statistics update.

Backward, from the statistics the forward used, on the same grid: _batch_norm_bwd_sums_kernel writes
each row chunk's per-channel sums of gz = dy * act'(z) and gz * (x - mean); the launcher adds the
chunks up (dbeta, and dgamma / rstd); _batch_norm_bwd_dx_kernel writes dx = gz * a_c + (x - mean_c) * p_c
+ q_c with gz recomputed, p_c = -rstd_c^2 a_c sum(gz (x - mean)) / n and q_c = -a_c sum(gz) / n in
training (zero when the statistics were given).
"""

import triton
import triton.language as tl

from ._common import _round_to_bf16
from .activation import _activate, _activate_grad


@triton.jit(do_not_specialize=['N', 'C', 'L', 'CHUNK'])  # sizes: one compiled variant, not one per size class
def _batch_norm_stats_kernel(
    x_ptr,  # (N, C, L) through strides
    mean_ptr, m2_ptr,  # (SPLIT, C) fp32 partial statistics of x - K
    N, C, L, CHUNK,  # rows (n, l) per program
    stride_xn, stride_xc, stride_xl,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_FIT_INT32: tl.constexpr,
):
    part = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    k = tl.load(x_ptr + offs_c.to(tl.int64) * stride_xc, mask=mask_c, other=0.0).to(tl.float32)  # the shift
    count = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    start = part.to(tl.int64) * CHUNK
    for r0 in range(0, CHUNK, BLOCK_R):
        rows = start + r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mask_r = (rows < N.to(tl.int64) * L) & (rows < start + CHUNK)
        mask = mask_r[:, None] & mask_c[None, :]
        n, l = _sample_and_position(rows, L, ROWS_FIT_INT32)
        ptrs = x_ptr + (n * stride_xn + l * stride_xl)[:, None] \
            + offs_c.to(tl.int64)[None, :] * stride_xc
        v = tl.where(mask, tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) - k[None, :], 0.0)
        n_b = tl.sum(mask_r.to(tl.float32), axis=0)
        if n_b > 0:
            mean_b = tl.sum(v, axis=0) / n_b
            d_b = tl.where(mask, v - mean_b[None, :], 0.0)
            m2_b = tl.sum(d_b * d_b, axis=0)
            total = count + n_b
            d = mean_b - mean
            mean += d * n_b / total
            m2 += m2_b + d * d * count * n_b / total
            count = total
    tl.store(mean_ptr + part * C + offs_c, mean, mask=mask_c)
    tl.store(m2_ptr + part * C + offs_c, m2, mask=mask_c)


@triton.jit
def _sample_and_position(rows, L, ROWS_FIT_INT32: tl.constexpr):
    """(n, l) = divmod(rows, L), int64; divided in int32 when every row index fits (N * L rows, the
    masked ones past the end included): an int64 division is a called routine whose stack frame
    tools/triton_aot.py reports (the large shapes there take the int64 branch)."""
    if ROWS_FIT_INT32:
        r = rows.to(tl.int32)
        n = (r // L).to(tl.int64)
        l = (r % L).to(tl.int64)
    else:  # 2^31 rows or more: the int64 division, per element
        n = rows // L
        l = rows - n * L
    return n, l


@triton.jit
def _chunk_counts(parts, SPLIT, ROWS, CHUNK):
    """Rows in each of the row chunks `parts` (0 past the last)."""
    counts = tl.minimum(tl.maximum(ROWS - parts.to(tl.int64) * CHUNK, 0), CHUNK).to(tl.float32)
    return tl.where(parts < SPLIT, counts, 0.0)


@triton.jit(do_not_specialize=['N', 'C', 'L', 'CHUNK', 'SPLIT'])  # sizes: one compiled variant, not one per size class
def _batch_norm_act_fwd_kernel(
    x_ptr, out_ptr,  # (N, C, L) through strides
    w_ptr, b_ptr,  # (C,) or dummies
    mean_ptr, var_ptr,  # training: (SPLIT, C) partial means and M2; else (C,) given mean and var
    mean_out_ptr, var_out_ptr,  # (C,) fp32: the statistics used (biased variance)
    N, C, L, CHUNK, SPLIT,
    stride_xn, stride_xc, stride_xl,
    stride_on, stride_oc, stride_ol,
    EPS, SLOPE,
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    EMULATE_BF16: tl.constexpr,  # bf16 under the interpreter, whose fp32 -> bf16 cast truncates
    SPLIT_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_FIT_INT32: tl.constexpr,
):
    part = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    if TRAINING:  # merge the row chunks' partials (Chan), SPLIT_BLOCK chunks at a time (a whole
        # SPLIT x BLOCK_C tile would spill registers): the mean first, then the M2 around it
        total = 0.0
        weighted = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for p0 in range(0, SPLIT, SPLIT_BLOCK):
            parts = p0 + tl.arange(0, SPLIT_BLOCK)
            counts = _chunk_counts(parts, SPLIT, N.to(tl.int64) * L, CHUNK)
            means = tl.load(mean_ptr + parts[:, None] * C + offs_c[None, :],
                            mask=(parts < SPLIT)[:, None] & mask_c[None, :], other=0.0)
            total += tl.sum(counts, axis=0)
            weighted += tl.sum(counts[:, None] * means, axis=0)
        mean = weighted / total
        m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for p0 in range(0, SPLIT, SPLIT_BLOCK):
            parts = p0 + tl.arange(0, SPLIT_BLOCK)
            counts = _chunk_counts(parts, SPLIT, N.to(tl.int64) * L, CHUNK)
            mask_pc = (parts < SPLIT)[:, None] & mask_c[None, :]
            means = tl.load(mean_ptr + parts[:, None] * C + offs_c[None, :], mask=mask_pc, other=0.0)
            m2s = tl.load(var_ptr + parts[:, None] * C + offs_c[None, :], mask=mask_pc, other=0.0)
            d = tl.where(mask_pc, means - mean[None, :], 0.0)
            m2 += tl.sum(m2s, axis=0) + tl.sum(counts[:, None] * d * d, axis=0)
        var = tl.where(m2 < 0, 0.0, m2) / total  # not tl.maximum: it would turn a NaN into 0
        k = tl.load(x_ptr + offs_c.to(tl.int64) * stride_xc, mask=mask_c, other=0.0).to(tl.float32)
    else:
        mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        var = tl.load(var_ptr + offs_c, mask=mask_c, other=1.0).to(tl.float32)
        k = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if part == 0:
        tl.store(mean_out_ptr + offs_c, k + mean, mask=mask_c)
        tl.store(var_out_ptr + offs_c, var, mask=mask_c)
    a = 1.0 / tl.sqrt(var + EPS)
    if HAS_WEIGHT:
        a = a * tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_BIAS:
        b += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)

    start = part.to(tl.int64) * CHUNK
    for r0 in range(0, CHUNK, BLOCK_R):
        rows = start + r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mask = ((rows < N.to(tl.int64) * L) & (rows < start + CHUNK))[:, None] & mask_c[None, :]
        n, l = _sample_and_position(rows, L, ROWS_FIT_INT32)
        ch = offs_c.to(tl.int64)[None, :]
        v = tl.load(x_ptr + (n * stride_xn + l * stride_xl)[:, None] + ch * stride_xc, mask=mask, other=0.0)
        y = _activate(((v.to(tl.float32) - k[None, :]) - mean[None, :]) * a[None, :] + b[None, :], ACT, SLOPE)
        if EMULATE_BF16:
            y = _round_to_bf16(y)
        tl.store(out_ptr + (n * stride_on + l * stride_ol)[:, None] + ch * stride_oc,
                 y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel_coefficients(w_ptr, b_ptr, mean_ptr, var_ptr, offs_c, mask_c, EPS,
                          HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
    """The forward's mean_c, rstd_c, a_c = rstd_c * weight_c and bias_c."""
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    # rsqrt, not 1 / sqrt: an IEEE division is a called routine (a stack frame: tools/triton_aot.py)
    rstd = tl.math.rsqrt(tl.load(var_ptr + offs_c, mask=mask_c, other=1.0) + EPS)
    a = rstd
    if HAS_WEIGHT:
        a = a * tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_BIAS:
        b += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    return mean, rstd, a, b


@triton.jit(do_not_specialize=['N', 'C', 'L', 'CHUNK'])
def _batch_norm_bwd_sums_kernel(
    dy_ptr, x_ptr,  # (N, C, L) through strides (dy in x's layout)
    w_ptr, b_ptr, mean_ptr, var_ptr,  # (C,); mean and var fp32, the forward's
    sum_ptr, sumd_ptr,  # (SPLIT, C) fp32: per row chunk sum(gz) and sum(gz * (x - mean))
    N, C, L, CHUNK,
    stride_xn, stride_xc, stride_xl,
    stride_dn, stride_dc, stride_dl,
    EPS, SLOPE,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_FIT_INT32: tl.constexpr,
):
    part = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean, rstd, a, b = _channel_coefficients(w_ptr, b_ptr, mean_ptr, var_ptr, offs_c, mask_c, EPS, HAS_WEIGHT,
                                             HAS_BIAS, BLOCK_C)
    ch = offs_c.to(tl.int64)[None, :]
    # tiles of sums, reduced once after the loop
    acc1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    start = part.to(tl.int64) * CHUNK
    for r0 in range(0, CHUNK, BLOCK_R):
        rows = start + r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mask = ((rows < N.to(tl.int64) * L) & (rows < start + CHUNK))[:, None] & mask_c[None, :]
        n, l = _sample_and_position(rows, L, ROWS_FIT_INT32)
        d = tl.load(x_ptr + (n * stride_xn + l * stride_xl)[:, None] + ch * stride_xc, mask=mask,
                    other=0.0).to(tl.float32) - mean[None, :]
        dy = tl.load(dy_ptr + (n * stride_dn + l * stride_dl)[:, None] + ch * stride_dc, mask=mask,
                     other=0.0).to(tl.float32)
        gz = tl.where(mask, dy * _activate_grad(d * a[None, :] + b[None, :], ACT, SLOPE), 0.0)
        acc1 += gz
        acc2 += gz * d
    s1 = tl.sum(acc1, axis=0)
    s2 = tl.sum(acc2, axis=0)
    tl.store(sum_ptr + part * C + offs_c, s1, mask=mask_c)
    tl.store(sumd_ptr + part * C + offs_c, s2, mask=mask_c)


@triton.jit(do_not_specialize=['N', 'C', 'L', 'CHUNK'])
def _batch_norm_bwd_dx_kernel(
    dy_ptr, x_ptr, dx_ptr,  # (N, C, L) through strides; dx in dy's strides
    w_ptr, b_ptr, mean_ptr, var_ptr,
    sum_ptr, sumd_ptr,  # (C,) fp32: sum(gz) and sum(gz * (x - mean)) over every row
    N, C, L, CHUNK,
    stride_xn, stride_xc, stride_xl,
    stride_dn, stride_dc, stride_dl,
    EPS, SLOPE,
    INV_COUNT,  # 1 / (N * L), from the host: an IEEE division here is a called routine (a stack frame)
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, TRAINING: tl.constexpr,
    EMULATE_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_FIT_INT32: tl.constexpr,
):
    part = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean, rstd, a, b = _channel_coefficients(w_ptr, b_ptr, mean_ptr, var_ptr, offs_c, mask_c, EPS, HAS_WEIGHT,
                                             HAS_BIAS, BLOCK_C)
    p = tl.zeros((BLOCK_C,), dtype=tl.float32)
    q = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if TRAINING:
        p -= rstd * rstd * a * tl.load(sumd_ptr + offs_c, mask=mask_c, other=0.0) * INV_COUNT
        q -= a * tl.load(sum_ptr + offs_c, mask=mask_c, other=0.0) * INV_COUNT
    ch = offs_c.to(tl.int64)[None, :]
    start = part.to(tl.int64) * CHUNK
    for r0 in range(0, CHUNK, BLOCK_R):
        rows = start + r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mask = ((rows < N.to(tl.int64) * L) & (rows < start + CHUNK))[:, None] & mask_c[None, :]
        n, l = _sample_and_position(rows, L, ROWS_FIT_INT32)
        d = tl.load(x_ptr + (n * stride_xn + l * stride_xl)[:, None] + ch * stride_xc, mask=mask,
                    other=0.0).to(tl.float32) - mean[None, :]
        d_off = (n * stride_dn + l * stride_dl)[:, None] + ch * stride_dc
        dy = tl.load(dy_ptr + d_off, mask=mask, other=0.0).to(tl.float32)
        gz = dy * _activate_grad(d * a[None, :] + b[None, :], ACT, SLOPE)
        dx = gz * a[None, :] + (d * p[None, :] + q[None, :])
        if EMULATE_BF16:
            dx = _round_to_bf16(dx)
        tl.store(dx_ptr + d_off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
