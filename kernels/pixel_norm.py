"""Pixel norm: y = x * rsqrt(mean over channels of x^2 + eps), one read and one write.

Each program takes BLOCK_L positions of one sample with all their channels (a BLOCK_L x BLOCK_C
tile, C <= BLOCK_C), through strides, so NCHW and channels_last both load whole tiles. The grid is
one-dimensional (sample-major): a CUDA grid's y and z dimensions stop at 65535, which a 1024x1024
map with 512 channels (65536 blocks of 16 positions per sample) would pass.
"""

import triton
import triton.language as tl

from ._common import _round_to_bf16


@triton.jit(do_not_specialize=['L', 'C'])  # sizes: one compiled variant, not one per size class
def _pixel_norm_fwd_kernel(
    x_ptr, out_ptr,  # (N, L, C) through strides
    L, C,
    stride_xn, stride_xl, stride_xc,
    stride_on, stride_ol, stride_oc,
    EPS,
    EMULATE_BF16: tl.constexpr,  # bf16 under the interpreter, whose fp32 -> bf16 cast truncates
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    blocks = tl.cdiv(L, BLOCK_L)
    n = pid // blocks
    offs_l = (pid % blocks) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C).to(tl.int64)  # c * stride_c reaches C * H * W in NCHW: past int32
    mask = (offs_l < L)[:, None] & (offs_c < C)[None, :]
    x = tl.load(x_ptr + n * stride_xn + offs_l[:, None] * stride_xl + offs_c[None, :] * stride_xc,
                mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + EPS)
    y = x * r[:, None]
    if EMULATE_BF16:
        y = _round_to_bf16(y)
    tl.store(out_ptr + n * stride_on + offs_l[:, None] * stride_ol + offs_c[None, :] * stride_oc,
             y.to(out_ptr.dtype.element_ty), mask=mask)
