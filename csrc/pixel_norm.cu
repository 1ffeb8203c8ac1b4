// Pixel norm on CUDA: the "cuda" backend of fastgen::pixel_norm.
//
// In PyTorch:
//   y = x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + eps)
// x is (N, C, L): NCHW (unit stride along L): one thread per position, loads coalesced across
// positions; channels_last (unit stride along C): one warp per position, lanes across channels,
// a shuffle reduction. One read and one write of x; sums in fp32 (fp64 for double).
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

template <typename scalar_t>
__global__ void pixel_norm_nchw_kernel(const scalar_t* x, scalar_t* y, int64_t N, int64_t C, int64_t L, double eps,
                                       bool small) {  // small: x.numel() < 2^31 (index.cuh)
  using T = at::opmath_type<scalar_t>;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;  // n * L + l
  if (p >= N * L) return;
  const int64_t n = fastgen::idiv(p, L, small), base = n * C * L + (p - n * L);
  T s = 0;
  for (int64_t c = 0; c < C; ++c) {
    const T v = static_cast<T>(x[base + c * L]);
    s += v * v;
  }
  const T r = T(1) / sqrt(s / static_cast<T>(C) + static_cast<T>(eps));
  for (int64_t c = 0; c < C; ++c) y[base + c * L] = static_cast<scalar_t>(static_cast<T>(x[base + c * L]) * r);
}

template <typename scalar_t>
__global__ void pixel_norm_nhwc_kernel(const scalar_t* x, scalar_t* y, int64_t positions, int64_t C, double eps) {
  using T = at::opmath_type<scalar_t>;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;  // n * L + l
  const int lane = threadIdx.x % 32;
  if (p >= positions) return;  // whole warps leave together
  const scalar_t* row = x + p * C;
  T s = 0;
  for (int64_t c = lane; c < C; c += 32) {
    const T v = static_cast<T>(row[c]);
    s += v * v;
  }
  for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffff, s, off);
  const T r = T(1) / sqrt(s / static_cast<T>(C) + static_cast<T>(eps));
  for (int64_t c = lane; c < C; c += 32) y[p * C + c] = static_cast<scalar_t>(static_cast<T>(row[c]) * r);
}

at::Tensor pixel_norm_cuda(const at::Tensor& x_in, double eps) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() >= 2, "x must be a CUDA (N, C, *) tensor");
  const at::cuda::CUDAGuard guard(x_in.device());
  const bool channels_last = fastgen::is_channels_last(x_in);
  const at::Tensor x = channels_last ? x_in : x_in.contiguous();
  at::Tensor y = at::empty_like(x, fastgen::output_format(x));
  if (x.numel() == 0) return y;
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / (N * C);
  const int64_t blocks = channels_last ? (N * L + kThreads / 32 - 1) / (kThreads / 32) : (N * L + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "pixel_norm: too large");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_norm_cuda", [&] {
    if (channels_last)
      pixel_norm_nhwc_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(),
                                                                       y.mutable_data_ptr<scalar_t>(), N * L, C, eps);
    else
      pixel_norm_nchw_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(),
                                                                       y.mutable_data_ptr<scalar_t>(), N, C, L, eps,
                                                                       fastgen::small_indices(x.numel()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CUDA, m) {
  m.impl("_pixel_norm_fused", &pixel_norm_cuda);
}
