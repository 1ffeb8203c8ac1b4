// fastgen::rms_norm_act on CUDA: the "cuda" backend's forward (its backward is the aten math of
// fastgen/ops/rms_norm_act.py, from the r this kernel returns).
//
//   r = 1 / sqrt(mean_c(x^2) + eps)     (clamp: 1 / max(sqrt(mean_c(x^2)), eps), F.normalize's form)
//   y = act(x * r * weight[c] + bias[c])
//
// x is (N, C, L). NCL (unit stride along L): one thread per position, loads coalesced across
// positions, the channel column read twice (the second time from L2). Channels-last (unit stride
// along C): one warp per position, lanes across channels, a shuffle reduction. Sums in fp32 (fp64 for
// double); r is returned (N, L) in that type.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "activation.h"
#include "index.cuh"
#include "layout.h"

namespace {

constexpr int kThreads = 256;

template <typename T>
struct RmsArgs {
  const T* weight;  // nullptr: 1
  const T* bias;    // nullptr: 0
  T eps, slope;
  bool clamp;
  int act;
};

template <typename T>
__device__ __forceinline__ T inverse_rms(T sum_of_squares, int64_t C, const RmsArgs<T>& a) {
  const T mean_square = sum_of_squares / static_cast<T>(C);
  return a.clamp ? T(1) / max(sqrt(mean_square), a.eps) : T(1) / sqrt(mean_square + a.eps);
}

template <typename scalar_t, typename T>
__device__ __forceinline__ scalar_t output(scalar_t x, T r, int64_t c, const RmsArgs<T>& a) {
  T z = static_cast<T>(x) * r;
  if (a.weight) z *= a.weight[c];
  if (a.bias) z += a.bias[c];
  return static_cast<scalar_t>(fastgen::activate<T>(z, a.act, a.slope));
}

template <typename scalar_t, typename T>
__global__ void rms_norm_act_ncl_kernel(const scalar_t* x, scalar_t* y, T* rstd, int64_t N, int64_t C, int64_t L,
                                        RmsArgs<T> a, bool small) {  // small: x.numel() < 2^31 (index.cuh)
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;  // n * L + l
  if (p >= N * L) return;
  const int64_t n = fastgen::idiv(p, L, small), base = n * C * L + (p - n * L);
  T s = 0;
  for (int64_t c = 0; c < C; ++c) {
    const T v = static_cast<T>(x[base + c * L]);
    s += v * v;
  }
  const T r = inverse_rms(s, C, a);
  rstd[p] = r;
  for (int64_t c = 0; c < C; ++c) y[base + c * L] = output(x[base + c * L], r, c, a);
}

template <typename scalar_t, typename T>
__global__ void rms_norm_act_nlc_kernel(const scalar_t* x, scalar_t* y, T* rstd, int64_t positions, int64_t C,
                                        RmsArgs<T> a) {
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
  const T r = inverse_rms(s, C, a);
  if (lane == 0) rstd[p] = r;
  for (int64_t c = lane; c < C; c += 32) y[p * C + c] = output(row[c], r, c, a);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_act_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                                                     const std::optional<at::Tensor>& bias, double eps, bool clamp,
                                                     int64_t activation, double slope) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() >= 2 && x_in.size(1) > 0, "x must be a CUDA (N, C, *) tensor with C > 0");
  TORCH_CHECK(activation >= 0 && activation < fastgen::kNumActivations, "unknown activation code ", activation);
  const at::cuda::CUDAGuard guard(x_in.device());
  const bool channels_last = fastgen::is_channels_last(x_in);
  const at::Tensor x = channels_last ? x_in : x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), L = N ? x.numel() / (N * C) : 0;
  at::Tensor y = at::empty_like(x, fastgen::output_format(x));
  const auto opmath = at::toOpMathType(x.scalar_type());
  at::Tensor rstd = at::empty({N, L}, x.options().dtype(opmath));
  if (x.numel() == 0) return {y, rstd};
  // the affine in opmath, contiguous, read by every position
  const at::Tensor w = weight ? weight->to(opmath).contiguous() : at::Tensor();
  const at::Tensor b = bias ? bias->to(opmath).contiguous() : at::Tensor();
  const int64_t blocks = channels_last ? (N * L + kThreads / 32 - 1) / (kThreads / 32) : (N * L + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "rms_norm_act: too large");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_act_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const RmsArgs<T> a{w.defined() ? w.const_data_ptr<T>() : nullptr, b.defined() ? b.const_data_ptr<T>() : nullptr,
                       static_cast<T>(eps), static_cast<T>(slope), clamp, static_cast<int>(activation)};
    if (channels_last)
      rms_norm_act_nlc_kernel<scalar_t, T><<<blocks, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<T>(), N * L, C, a);
    else
      rms_norm_act_ncl_kernel<scalar_t, T><<<blocks, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<T>(), N, C, L, a,
          fastgen::small_indices(x.numel()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CUDA, m) {
  m.impl("_rms_norm_act_fused", &rms_norm_act_cuda);
}
