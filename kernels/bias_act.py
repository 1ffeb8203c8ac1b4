"""bias_act: y = clamp(act(x + b) * gain, -clamp, clamp), one read and one write.

x is dense and walked in memory order as (outer, C, inner), b running along C: element i takes
b[(i // inner) % C]. One program per BLOCK elements; math in fp32.
"""

import triton
import triton.language as tl

from ._common import _round_to_bf16
from .activation import _activate


@triton.jit(do_not_specialize=['numel', 'C', 'inner'])  # sizes: one compiled variant, not one per size class
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
    y = _activate(z, ACT, ALPHA) * GAIN
    if CLAMP >= 0:
        y = tl.where(y < -CLAMP, -CLAMP, tl.where(y > CLAMP, CLAMP, y))  # a NaN passes, as in torch.clamp
    if EMULATE_BF16:
        y = _round_to_bf16(y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
