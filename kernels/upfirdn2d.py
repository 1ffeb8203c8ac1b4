"""upfirdn2d: each output pixel straight from the input pixels its filter taps land on.

With u the zero-inserted, padded image, out[oy, ox] = sum_{ky,kx} g[ky, kx] u[oy*DOWNY + ky - PADY0,
ox*DOWNX + kx - PADX0] (g: the correlation taps, gain folded in). A tap lands on an input pixel
only where its upsampled coordinate is a multiple of UP and inside the image; the zeros and the
thrown-away pixels cost nothing. One program per (n, c) and BLOCK output pixels, NCHW or
channels_last through strides; fp32 accumulation. The grid is one-dimensional, plane-major (a CUDA
grid's y dimension stops at 65535 blocks: 4096x4096 outputs of 256 pixels per block would pass it).
"""

import triton
import triton.language as tl

from ._common import _round_to_bf16


@triton.jit(do_not_specialize=['C', 'H', 'W', 'OH', 'OW'])  # sizes: one compiled variant, not one per size class
def _upfirdn2d_fwd_kernel(
    x_ptr,  # (N, C, H, W) through strides
    taps_ptr,  # (FH, FW) fp32 correlation taps, contiguous
    out_ptr,  # (N, C, OH, OW) through strides
    C, H, W, OH, OW,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_on, stride_oc, stride_oh, stride_ow,
    UPX, UPY, DOWNX, DOWNY, PADX0, PADY0,
    FH: tl.constexpr, FW: tl.constexpr,
    EMULATE_BF16: tl.constexpr,  # bf16 under the interpreter, whose fp32 -> bf16 cast truncates
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    blocks = tl.cdiv(OH * OW, BLOCK)
    nc = pid // blocks
    n, c = nc // C, nc % C
    offs = (pid % blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < OH * OW
    oy, ox = offs // OW, offs % OW
    x_base = x_ptr + n * stride_xn + c * stride_xc
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for ky in tl.static_range(FH):
        uy = oy * DOWNY + ky - PADY0
        uyc = tl.maximum(uy, 0)  # non-negative before // and %: the interpreter floors, the GPU truncates
        iy = uyc // UPY
        ok_y = (uy >= 0) & (uyc % UPY == 0) & (iy < H)
        for kx in tl.static_range(FW):
            ux = ox * DOWNX + kx - PADX0
            uxc = tl.maximum(ux, 0)
            ix = uxc // UPX
            ok = mask & ok_y & (ux >= 0) & (uxc % UPX == 0) & (ix < W)
            v = tl.load(x_base + iy * stride_xh + ix * stride_xw, mask=ok, other=0.0).to(tl.float32)
            acc += v * tl.load(taps_ptr + ky * FW + kx)
    if EMULATE_BF16:
        acc = _round_to_bf16(acc)
    tl.store(out_ptr + n * stride_on + c * stride_oc + oy * stride_oh + ox * stride_ow,
             acc.to(out_ptr.dtype.element_ty), mask=mask)
