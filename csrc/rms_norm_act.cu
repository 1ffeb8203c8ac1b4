// fastgen::rms_norm_act on CUDA: the "cuda" backend's forward and first-order backward.
//
//   r = 1 / sqrt(mean_c(x^2) + eps)     (clamp: 1 / max(sqrt(mean_c(x^2)), eps), F.normalize's form)
//   y = act(x * r * weight[c] + bias[c])
//
// x is (N, C, L). NCL (unit stride along L): one thread per position, loads coalesced across
// positions, the channel column read twice (the second time from L2). Channels-last (unit stride
// along C): one warp per position, lanes across channels, a shuffle reduction. Sums in fp32 (fp64 for
// double); r is returned (N, L) in that type.
//
// Backward, from that r: with xhat = x r, z = xhat w + b, gz = dy act'(z), g = gz w,
//   dx = r (g - xhat mean_c(g xhat))   (clamp: where rms <= eps, r is constant: dx = r g)
// positions as in the forward, two passes over the channels; and
//   dweight = sum over positions of gz xhat, dbias = sum of gz
// per channel: each block sums a chunk of positions for a few channels (no atomics: the same sums every
// run), the host adds the chunks.
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
  // not max(): CUDA's max is fmax, which returns eps for a NaN; a NaN must reach the output, as on
  // the CPU and in Triton (the comparison with a NaN is false)
  const T rms = sqrt(mean_square);
  return a.clamp ? T(1) / (rms < a.eps ? a.eps : rms) : T(1) / sqrt(mean_square + a.eps);
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

// (xhat, gz) at one element
template <typename scalar_t, typename T>
__device__ __forceinline__ void gradient_at(scalar_t x, scalar_t dy, T r, int64_t c, const RmsArgs<T>& a, T& xhat,
                                            T& gz) {
  xhat = static_cast<T>(x) * r;
  T z = xhat;
  if (a.weight) z *= a.weight[c];
  if (a.bias) z += a.bias[c];
  gz = static_cast<T>(dy) * fastgen::activate_grad<T>(z, a.act, a.slope);
}

template <typename T>
__device__ __forceinline__ T weighted(T gz, int64_t c, const RmsArgs<T>& a) {
  return a.weight ? gz * a.weight[c] : gz;
}

// mean_c(g xhat) where r depends on x, else 0
template <typename T>
__device__ __forceinline__ T projection(T sum, T r, int64_t C, const RmsArgs<T>& a) {
  return a.clamp && !(r * a.eps < T(1)) ? T(0) : sum / static_cast<T>(C);
}

template <typename scalar_t, typename T>
__global__ void rms_norm_act_dx_ncl_kernel(const scalar_t* dy, const scalar_t* x, const T* rstd, scalar_t* dx,
                                           int64_t N, int64_t C, int64_t L, RmsArgs<T> a, bool small) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;  // n * L + l
  if (p >= N * L) return;
  const int64_t n = fastgen::idiv(p, L, small), base = n * C * L + (p - n * L);
  const T r = rstd[p];
  T s = 0, xhat, gz;
  for (int64_t c = 0; c < C; ++c) {
    gradient_at(x[base + c * L], dy[base + c * L], r, c, a, xhat, gz);
    s += weighted(gz, c, a) * xhat;
  }
  const T proj = projection(s, r, C, a);
  for (int64_t c = 0; c < C; ++c) {
    gradient_at(x[base + c * L], dy[base + c * L], r, c, a, xhat, gz);
    dx[base + c * L] = static_cast<scalar_t>(r * (weighted(gz, c, a) - xhat * proj));
  }
}

template <typename scalar_t, typename T>
__global__ void rms_norm_act_dx_nlc_kernel(const scalar_t* dy, const scalar_t* x, const T* rstd, scalar_t* dx,
                                           int64_t positions, int64_t C, RmsArgs<T> a) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;  // n * L + l
  const int lane = threadIdx.x % 32;
  if (p >= positions) return;  // whole warps leave together
  const T r = rstd[p];
  T s = 0, xhat, gz;
  for (int64_t c = lane; c < C; c += 32) {
    gradient_at(x[p * C + c], dy[p * C + c], r, c, a, xhat, gz);
    s += weighted(gz, c, a) * xhat;
  }
  for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffff, s, off);
  const T proj = projection(s, r, C, a);
  for (int64_t c = lane; c < C; c += 32) {
    gradient_at(x[p * C + c], dy[p * C + c], r, c, a, xhat, gz);
    dx[p * C + c] = static_cast<scalar_t>(r * (weighted(gz, c, a) - xhat * proj));
  }
}

// Per chunk of positions and channel: sums of gz xhat and gz into partial (2, chunks, C). Blocks of 32 x 8
// threads. NCL: each warp (threadIdx.y) one channel, its lanes 32 consecutive positions (coalesced),
// a shuffle reduction. Channels-last: lanes 32 consecutive channels, threadIdx.y 8 rows of positions,
// reduced through shared memory.
template <typename scalar_t, typename T, bool kChannelsLast>
__global__ void rms_norm_act_weight_grad_kernel(const scalar_t* dy, const scalar_t* x, const T* rstd, T* partial,
                                                int64_t N, int64_t C, int64_t L, int64_t chunk, RmsArgs<T> a,
                                                bool small) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t chunks = gridDim.y, first = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t last = min(first + chunk, N * L);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (kChannelsLast ? 32 : 8) + (kChannelsLast ? tx : ty);
  T sw = 0, sb = 0, xhat, gz;
  if (c < C) {
    for (int64_t p = first + (kChannelsLast ? ty : tx); p < last; p += kChannelsLast ? 8 : 32) {
      int64_t i;
      if constexpr (kChannelsLast) {
        i = p * C + c;
      } else {
        const int64_t n = fastgen::idiv(p, L, small);
        i = n * C * L + c * L + (p - n * L);
      }
      gradient_at(x[i], dy[i], rstd[p], c, a, xhat, gz);
      sw += gz * xhat;
      sb += gz;
    }
  }
  if constexpr (kChannelsLast) {
    __shared__ T sums[2][8][33];
    sums[0][ty][tx] = sw;
    sums[1][ty][tx] = sb;
    __syncthreads();
    if (ty < 2 && c < C) {
      T t = 0;
      for (int k = 0; k < 8; ++k) t += sums[ty][k][tx];
      partial[(ty * chunks + blockIdx.y) * C + c] = t;
    }
  } else {
    for (int off = 16; off > 0; off /= 2) {
      sw += __shfl_xor_sync(0xffffffff, sw, off);
      sb += __shfl_xor_sync(0xffffffff, sb, off);
    }
    if (tx == 0 && c < C) {
      partial[blockIdx.y * C + c] = sw;
      partial[(chunks + blockIdx.y) * C + c] = sb;
    }
  }
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_act_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool clamp, int64_t activation, double slope, bool need_x) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() >= 2 && grad.sizes() == x_in.sizes(),
              "grad and x must be CUDA (N, C, *) tensors of one shape");
  TORCH_CHECK(activation >= 0 && activation < fastgen::kNumActivations, "unknown activation code ", activation);
  const at::cuda::CUDAGuard guard(x_in.device());
  const bool channels_last = fastgen::is_channels_last(x_in);
  const at::Tensor x = fastgen::dense(x_in);
  const at::Tensor dy = grad.contiguous(fastgen::output_format(x));
  const auto opmath = at::toOpMathType(x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), L = N * C ? x.numel() / (N * C) : 0;
  TORCH_CHECK(rstd.scalar_type() == opmath && rstd.numel() == N * L, "rstd must be (N, L) in opmath");
  at::Tensor dx = need_x ? at::empty_like(x, fastgen::output_format(x)) : x.new_empty({0});
  if (x.numel() == 0) {
    const at::Tensor zero = at::zeros({C}, x.options().dtype(opmath));
    return {dx, zero, zero.clone()};
  }
  const at::Tensor r = rstd.contiguous();
  const at::Tensor w = weight ? weight->to(opmath).contiguous() : at::Tensor();
  const at::Tensor b = bias ? bias->to(opmath).contiguous() : at::Tensor();
  const int64_t positions = N * L;
  // chunks of at least 256 positions, at most 1024 of them: the host's sum stays small
  const int64_t chunks = std::min<int64_t>(1024, (positions + 255) / 256);
  const int64_t chunk = (positions + chunks - 1) / chunks;
  at::Tensor partial = at::empty({2, chunks, C}, x.options().dtype(opmath));
  const int64_t dx_blocks = channels_last ? (positions + kThreads / 32 - 1) / (kThreads / 32) : (positions + kThreads - 1) / kThreads;
  const int64_t channel_blocks = (C + (channels_last ? 31 : 7)) / (channels_last ? 32 : 8);
  TORCH_CHECK(dx_blocks < (int64_t(1) << 31) && channel_blocks < (int64_t(1) << 31), "rms_norm_act: too large");
  const bool small = fastgen::small_indices(x.numel());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_act_backward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const RmsArgs<T> a{w.defined() ? w.const_data_ptr<T>() : nullptr, b.defined() ? b.const_data_ptr<T>() : nullptr,
                       static_cast<T>(eps), static_cast<T>(slope), clamp, static_cast<int>(activation)};
    const scalar_t *dyp = dy.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
    const T* rp = r.const_data_ptr<T>();
    const dim3 grid(static_cast<unsigned>(channel_blocks), static_cast<unsigned>(chunks)), block(32, 8);
    if (channels_last) {
      rms_norm_act_weight_grad_kernel<scalar_t, T, true><<<grid, block, 0, stream>>>(
          dyp, xp, rp, partial.mutable_data_ptr<T>(), N, C, L, chunk, a, small);
      if (need_x)
        rms_norm_act_dx_nlc_kernel<scalar_t, T><<<dx_blocks, kThreads, 0, stream>>>(
            dyp, xp, rp, dx.mutable_data_ptr<scalar_t>(), positions, C, a);
    } else {
      rms_norm_act_weight_grad_kernel<scalar_t, T, false><<<grid, block, 0, stream>>>(
          dyp, xp, rp, partial.mutable_data_ptr<T>(), N, C, L, chunk, a, small);
      if (need_x)
        rms_norm_act_dx_ncl_kernel<scalar_t, T><<<dx_blocks, kThreads, 0, stream>>>(
            dyp, xp, rp, dx.mutable_data_ptr<scalar_t>(), N, C, L, a, small);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor sums = partial.sum(1);  // (2, C)
  return {dx, sums[0].clone(), sums[1].clone()};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CUDA, m) {
  m.impl("_rms_norm_act_fused", &rms_norm_act_cuda);
  m.impl("_rms_norm_act_backward", &rms_norm_act_backward_cuda);
}
