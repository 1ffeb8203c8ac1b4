"""@triton.jit helpers shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def _round_to_bf16(v):
    # fp32 -> nearest-even bf16 value, still in fp32. Used under TRITON_INTERPRET, whose
    # fp32 -> bf16 cast truncates; on a GPU the cast itself rounds.
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
