// upfirdn2d on CUDA: the "cuda" backend of fastgen::upfirdn2d.
//
// In PyTorch (fastgen/ops/upfirdn2d.py upfirdn2d_ref):
//   u = pad(zero_insert(x, up), pad)                     # never materialized here
//   out[n, c, oy, ox] = sum_{ky, kx} taps[ky, kx] * u[n, c, oy*down_y + ky, ox*down_x + kx]
// taps: the (fh, fw) correlation taps in opmath (gain folded in, flipped for a convolution). A tap
// lands on input pixel (uy - pad_y0) / up_y only when that is an integer inside the image. One
// thread per output element, walked in the output's memory order (NCHW, or channels_last with
// neighbouring threads on neighbouring channels) so loads and stores coalesce; int64 indices.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "index.cuh"
#include "layout.h"

namespace {

constexpr int kThreads = 256;

struct Upfirdn2dParams {
  int64_t N, C, H, W;                 // x: (N, C, H, W)
  int64_t OH, OW;                     // out: (N, C, OH, OW)
  int64_t sxn, sxc, sxh, sxw;         // x's strides, elements
  int64_t son, soc, soh, sow;         // out's strides, elements
  int64_t upx, upy, downx, downy;     // >= 1
  int64_t padx0, pady0;               // may be negative (a crop)
  int64_t fh, fw;                     // taps: (fh, fw) contiguous
  bool channels_last;                 // the order threads walk the output in
  bool small;                         // x and out below 2^31 elements: 32-bit divisions (index.cuh)
};

template <typename scalar_t>
__global__ void upfirdn2d_kernel(const scalar_t* __restrict__ x, const at::opmath_type<scalar_t>* __restrict__ taps,
                                 scalar_t* __restrict__ out, Upfirdn2dParams p) {
  using T = at::opmath_type<scalar_t>;
  const int64_t total = p.N * p.C * p.OH * p.OW;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    int64_t n, c, oy, ox;
    using fastgen::idiv;
    int64_t j = i, q;  // peeled one axis at a time: a quotient and a product instead of a remainder
    if (p.channels_last) {
      q = idiv(j, p.C, p.small), c = j - q * p.C;
      j = q, q = idiv(j, p.OW, p.small), ox = j - q * p.OW;
      j = q, q = idiv(j, p.OH, p.small), oy = j - q * p.OH, n = q;
    } else {
      q = idiv(j, p.OW, p.small), ox = j - q * p.OW;
      j = q, q = idiv(j, p.OH, p.small), oy = j - q * p.OH;
      j = q, q = idiv(j, p.C, p.small), c = j - q * p.C, n = q;
    }
    const scalar_t* xb = x + n * p.sxn + c * p.sxc;
    T acc = 0;
    for (int64_t ky = 0; ky < p.fh; ++ky) {
      const int64_t uy = oy * p.downy + ky - p.pady0;
      if (uy < 0) continue;
      const int64_t iy = fastgen::idiv(uy, p.upy, p.small);  // a row of x when the remainder is 0
      if (uy != iy * p.upy || iy >= p.H) continue;
      for (int64_t kx = 0; kx < p.fw; ++kx) {
        const int64_t ux = ox * p.downx + kx - p.padx0;
        if (ux < 0) continue;
        const int64_t ix = fastgen::idiv(ux, p.upx, p.small);
        if (ux != ix * p.upx || ix >= p.W) continue;
        acc += static_cast<T>(xb[iy * p.sxh + ix * p.sxw]) * taps[ky * p.fw + kx];
      }
    }
    out[n * p.son + c * p.soc + oy * p.soh + ox * p.sow] = static_cast<scalar_t>(acc);
  }
}

at::Tensor upfirdn2d_cuda(const at::Tensor& x, const at::Tensor& taps, at::IntArrayRef up, at::IntArrayRef down,
                          at::IntArrayRef pad) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "upfirdn2d: x must be a CUDA (N, C, H, W) tensor");
  TORCH_CHECK(taps.dim() == 2 && taps.is_contiguous() && taps.device() == x.device(), "upfirdn2d: taps must be (fh, fw)");
  TORCH_CHECK(taps.scalar_type() == at::toOpMathType(x.scalar_type()), "upfirdn2d: taps must be in x's opmath dtype");
  TORCH_CHECK(up.size() == 2 && down.size() == 2 && pad.size() == 4, "upfirdn2d: up, down [x, y]; pad [x0, x1, y0, y1]");
  TORCH_CHECK(up[0] >= 1 && up[1] >= 1 && down[0] >= 1 && down[1] >= 1, "upfirdn2d: up and down must be >= 1");
  const at::cuda::CUDAGuard guard(x.device());
  Upfirdn2dParams p;
  p.N = x.size(0); p.C = x.size(1); p.H = x.size(2); p.W = x.size(3);
  p.upx = up[0]; p.upy = up[1]; p.downx = down[0]; p.downy = down[1];
  p.padx0 = pad[0]; p.pady0 = pad[2];
  p.fh = taps.size(0); p.fw = taps.size(1);
  p.OH = (p.H * p.upy + pad[2] + pad[3] - p.fh) / p.downy + 1;
  p.OW = (p.W * p.upx + pad[0] + pad[1] - p.fw) / p.downx + 1;
  TORCH_CHECK(p.OH > 0 && p.OW > 0, "upfirdn2d: the output would be empty");
  p.channels_last = fastgen::is_channels_last(x);
  p.small = fastgen::small_indices(x.numel(), p.N * p.C * p.OH * p.OW);
  at::Tensor out = at::empty({p.N, p.C, p.OH, p.OW}, x.options().memory_format(fastgen::output_format(x)));
  if (out.numel() == 0) return out;
  p.sxn = x.stride(0); p.sxc = x.stride(1); p.sxh = x.stride(2); p.sxw = x.stride(3);
  p.son = out.stride(0); p.soc = out.stride(1); p.soh = out.stride(2); p.sow = out.stride(3);
  const int64_t blocks = std::min<int64_t>((out.numel() + kThreads - 1) / kThreads, 65535 * 16);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upfirdn2d_cuda", [&] {
    upfirdn2d_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), taps.const_data_ptr<at::opmath_type<scalar_t>>(), out.mutable_data_ptr<scalar_t>(), p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CUDA, m) {
  m.impl("_upfirdn2d_fused", &upfirdn2d_cuda);
}
