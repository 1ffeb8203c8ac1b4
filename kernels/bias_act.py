"""bias_act: y = clamp(act(x + b) * gain, -clamp, clamp), one read and one write.

x is dense and walked in memory order as (outer, C, inner), b running along C: element i takes
b[(i // inner) % C]. One program per BLOCK elements; math in fp32.
"""

import triton
import triton.language as tl

from ._common import _round_to_bf16


@triton.jit
def _bias_act(z, ACT: tl.constexpr, ALPHA):
    # codes: fastgen/ops/bias_act.py BIAS_ACTS, in order
    if ACT == 1:  # relu
        z = tl.maximum(z, 0.0)
    elif ACT == 2:  # lrelu
        z = tl.where(z > 0, z, z * ALPHA)
    elif ACT == 3:  # tanh = 2 sigmoid(2z) - 1, saturating cleanly at both ends
        z = 2.0 * tl.sigmoid(2.0 * z) - 1.0
    elif ACT == 4:  # sigmoid
        z = tl.sigmoid(z)
    elif ACT == 5:  # elu
        z = tl.where(z > 0, z, tl.exp(tl.minimum(z, 0.0)) - 1.0)
    elif ACT == 6:  # selu
        z = 1.0507009873554805 * tl.where(z > 0, z, 1.6732632423543772 * (tl.exp(tl.minimum(z, 0.0)) - 1.0))
    elif ACT == 7:  # softplus, linear above F.softplus's threshold 20
        z = tl.where(z > 20.0, z, tl.log(1.0 + tl.exp(tl.minimum(z, 20.0))))
    elif ACT == 8:  # swish
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _bias_act_fwd_kernel(
    x_ptr,  # dense, walked in memory order
    b_ptr,  # (C,); a dummy when HAS_BIAS is false
    out_ptr,  # x's strides
    numel, C, inner,  # x in memory order is (numel // (C * inner), C, inner)
    ALPHA, GAIN, CLAMP,  # CLAMP < 0: no clamping
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    EMULATE_BF16: tl.constexpr,  # bf16 under the interpreter, whose fp32 -> bf16 cast truncates
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + (offs // inner) % C, mask=mask, other=0.0).to(tl.float32)
    y = _bias_act(z, ACT, ALPHA) * GAIN
    if CLAMP >= 0:
        y = tl.minimum(tl.maximum(y, -CLAMP), CLAMP)
    if EMULATE_BF16:
        y = _round_to_bf16(y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
