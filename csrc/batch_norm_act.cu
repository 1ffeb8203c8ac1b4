// BatchNorm + activation on CUDA: the "cuda" backend of fastgen::batch_norm_act.
//
// In PyTorch:
//   y = act(F.batch_norm(x, mean, var, weight, bias, training, eps=eps))
// x is read as rows (n, l) x channels. A block covers TC channels x TR rows at a time, lanes along
// the unit-stride axis (rows for NCHW, channels for channels_last) so that loads coalesce.
//   batch_norm_stats_kernel  grid (split, channel blocks): Welford per thread over its rows of its
//                            chunk, merged per channel across the block (Chan); partial (mean, M2).
//   batch_norm_act_kernel    grid (split, channel blocks): merges the partials (training) or reads
//                            the given mean and var, then writes act((x - mean_c) * a_c + b_c) over its chunk;
//                            blocks of chunk 0 store the statistics for the running update.
// Two reads of x and one write in training, one read and one write in eval.
// Backward: norm_backward.cuh with one segment of all N * L rows and a group per channel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "activation.h"
#include "index.cuh"
#include "layout.h"
#include "norm_backward.cuh"

namespace {

constexpr int kThreads = 256;

struct BatchNormParams {
  const void* x;  // (N, C, L), strides sxn, sxc, sxl
  void* out;      // same layout as x
  const void* w;  // (C,) or nullptr
  const void* b;  // (C,) or nullptr
  const void* mean_in;  // training: (split, C) partial means; else (C,) given mean (opmath)
  const void* var_in;   // training: (split, C) partial M2; else (C,) given variance (opmath)
  void* partial_mean;   // (split, C), training only
  void* partial_m2;     // (split, C), training only
  void* mean_out;       // (C,) opmath: the statistics used
  void* var_out;        // (C,) opmath, biased variance
  int64_t N, C, L, chunk, split;
  int64_t sxn, sxc, sxl;
  double eps, slope;
  int act;
  bool channels_fast;  // lanes along channels (channels_last) or along rows (NCHW)
  bool small;  // fewer than 2^31 elements: row indices divided in 32 bits (index.cuh)
};

struct Tile {
  int tc, tr, c, r;  // channels x rows per block, and this thread's channel and row offsets
};

__device__ __forceinline__ Tile tile(const BatchNormParams& p) {
  const int tid = threadIdx.x;
  return p.channels_fast ? Tile{32, kThreads / 32, tid % 32, tid / 32} : Tile{kThreads / 32, 32, tid / 32, tid % 32};
}

__device__ __forceinline__ int64_t offset(const BatchNormParams& p, int64_t row, int64_t c) {
  const int64_t n = fastgen::idiv(row, p.L, p.small);
  return n * p.sxn + (row - n * p.L) * p.sxl + c * p.sxc;
}

template <typename T>
__device__ __forceinline__ void merge(T& n, T& mean, T& m2, T nb, T meanb, T m2b) {
  const T total = n + nb;
  if (total == T(0)) return;
  const T d = meanb - mean, f = nb / total;
  mean += d * f;
  m2 += m2b + d * d * n * f;
  n = total;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) batch_norm_stats_kernel(const BatchNormParams p) {
  using T = at::opmath_type<scalar_t>;
  __shared__ T sn[kThreads], smean[kThreads], sm2[kThreads];
  const Tile t = tile(p);
  const int64_t c = static_cast<int64_t>(blockIdx.y) * t.tc + t.c;
  const int64_t r0 = blockIdx.x * p.chunk, r1 = min(r0 + p.chunk, p.N * p.L);
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  T n = 0, mean = 0, m2 = 0;
  if (c < p.C)
    for (int64_t r = r0 + t.r; r < r1; r += t.tr) {
      const T v = static_cast<T>(x[offset(p, r, c)]);
      n += T(1);
      const T d = v - mean;
      mean += d / n;
      m2 += d * (v - mean);
    }
  sn[threadIdx.x] = n; smean[threadIdx.x] = mean; sm2[threadIdx.x] = m2;
  __syncthreads();
  if (t.r == 0 && c < p.C) {
    for (int i = 1; i < t.tr; ++i) {
      const int j = p.channels_fast ? i * 32 + t.c : t.c * 32 + i;
      merge(n, mean, m2, sn[j], smean[j], sm2[j]);
    }
    static_cast<T*>(p.partial_mean)[blockIdx.x * p.C + c] = mean;
    static_cast<T*>(p.partial_m2)[blockIdx.x * p.C + c] = m2;
  }
}

template <typename scalar_t, bool kTraining>
__global__ void __launch_bounds__(kThreads) batch_norm_act_kernel(const BatchNormParams p) {
  using T = at::opmath_type<scalar_t>;
  __shared__ T sm[32], sa[32], sb[32];
  const Tile t = tile(p);
  const int64_t c = static_cast<int64_t>(blockIdx.y) * t.tc + t.c;
  if (t.r == 0 && c < p.C) {
    T mean, var;
    if constexpr (kTraining) {
      T n = 0, m2 = 0;
      mean = 0;
      for (int64_t i = 0; i < p.split; ++i)
        merge(n, mean, m2, static_cast<T>(min(p.chunk, p.N * p.L - i * p.chunk)),
              static_cast<const T*>(p.mean_in)[i * p.C + c], static_cast<const T*>(p.var_in)[i * p.C + c]);
      var = m2 < T(0) ? T(0) : m2 / n;  // rounding can leave m2 a hair below 0 (a constant channel); NaN passes
    } else {
      mean = static_cast<const T*>(p.mean_in)[c];
      var = static_cast<const T*>(p.var_in)[c];
    }
    if (blockIdx.x == 0) {
      static_cast<T*>(p.mean_out)[c] = mean;
      static_cast<T*>(p.var_out)[c] = var;
    }
    const T a = (p.w ? static_cast<T>(static_cast<const scalar_t*>(p.w)[c]) : T(1)) / sqrt(var + static_cast<T>(p.eps));
    sm[t.c] = mean;
    sa[t.c] = a;
    sb[t.c] = p.b ? static_cast<T>(static_cast<const scalar_t*>(p.b)[c]) : T(0);
  }
  __syncthreads();
  if (c >= p.C) return;
  const T m = sm[t.c], a = sa[t.c], b = sb[t.c], slope = static_cast<T>(p.slope);
  const int64_t r0 = blockIdx.x * p.chunk, r1 = min(r0 + p.chunk, p.N * p.L);
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  scalar_t* y = static_cast<scalar_t*>(p.out);
  for (int64_t r = r0 + t.r; r < r1; r += t.tr) {
    const int64_t o = offset(p, r, c);
    y[o] = static_cast<scalar_t>(fastgen::activate<T>((static_cast<T>(x[o]) - m) * a + b, p.act, slope));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var, bool training, double eps,
    int64_t activation, double negative_slope) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() >= 2, "x must be a CUDA (N, C, *) tensor");
  TORCH_CHECK(training || (mean.has_value() && var.has_value()), "mean and var are needed when not training");
  TORCH_CHECK(activation >= 0 && activation < fastgen::kNumActivations, "unknown activation code ", activation);
  const at::cuda::CUDAGuard guard(x_in.device());
  const bool channels_last = fastgen::is_channels_last(x_in);
  const at::Tensor x = fastgen::dense(x_in);
  at::Tensor out = at::empty_like(x, fastgen::output_format(x));
  const auto opmath = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / std::max<int64_t>(1, N * C);
  at::Tensor mean_out = at::empty({C}, x.options().dtype(opmath));
  at::Tensor var_out = at::empty_like(mean_out);
  if (x.numel() == 0) return {out, mean_out.fill_(NAN), var_out.fill_(NAN)};
  const at::Tensor w = fastgen::contiguous_or_undefined(weight), b = fastgen::contiguous_or_undefined(bias);

  const int tc = channels_last ? 32 : kThreads / 32;
  const int64_t channel_blocks = (C + tc - 1) / tc, rows = N * L;
  // about 4 blocks per SM, each chunk at least 1024 rows
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = std::max<int64_t>(1, (4 * sms + channel_blocks - 1) / channel_blocks);
  const int64_t chunk = std::max<int64_t>(1024, (rows + want - 1) / want);
  const int64_t split = (rows + chunk - 1) / chunk;
  TORCH_CHECK(split < (int64_t(1) << 31) && channel_blocks < 65536, "batch_norm_act: too large");
  at::Tensor partial_mean, partial_m2, mean_in, var_in;
  if (training) {
    partial_mean = at::empty({split, C}, x.options().dtype(opmath));
    partial_m2 = at::empty_like(partial_mean);
  } else {
    mean_in = mean->to(opmath).contiguous();
    var_in = var->to(opmath).contiguous();
  }

  BatchNormParams p;
  p.x = x.data_ptr(); p.out = out.data_ptr();
  p.w = w.defined() ? w.data_ptr() : nullptr; p.b = b.defined() ? b.data_ptr() : nullptr;
  p.partial_mean = training ? partial_mean.data_ptr() : nullptr;
  p.partial_m2 = training ? partial_m2.data_ptr() : nullptr;
  p.mean_in = training ? partial_mean.data_ptr() : mean_in.data_ptr();
  p.var_in = training ? partial_m2.data_ptr() : var_in.data_ptr();
  p.mean_out = mean_out.data_ptr(); p.var_out = var_out.data_ptr();
  p.N = N; p.C = C; p.L = L; p.chunk = chunk; p.split = split;
  p.sxn = x.stride(0); p.sxc = channels_last ? 1 : L; p.sxl = channels_last ? C : 1;
  p.eps = eps; p.slope = negative_slope; p.act = static_cast<int>(activation);
  p.channels_fast = channels_last;
  p.small = fastgen::small_indices(x.numel());

  const dim3 grid(static_cast<unsigned>(split), static_cast<unsigned>(channel_blocks));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_cuda", [&] {
    if (training) {
      batch_norm_stats_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      batch_norm_act_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(p);
    } else {
      batch_norm_act_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean_out, var_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, bool training, double eps,
    int64_t activation, double negative_slope, bool need_x) {
  TORCH_CHECK(x.is_cuda() && x.dim() >= 2 && mean.numel() == x.size(1) && var.numel() == x.size(1),
              "x must be a CUDA (N, C, *) tensor with mean and var (C,)");
  TORCH_CHECK(grad.sizes() == x.sizes(), "grad must have x's shape");
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t C = x.size(1);
  const auto opmath = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor rstd = (var.to(opmath) + eps).rsqrt().reshape({1, C});
  const at::Tensor a = weight.has_value() ? rstd * weight->to(opmath).reshape({1, C}) : rstd;
  const at::Tensor b = bias.has_value() ? bias->to(opmath).reshape({1, C}) : at::zeros_like(rstd);
  auto [dx, dgamma, dbeta] = fastgen::norm_backward::norm_act_backward(
      grad, x, 1, 1, mean.to(opmath).reshape({1, C}), a, b, rstd, training, activation, negative_slope, need_x);
  return {dx, dgamma.reshape({C}), dbeta.reshape({C})};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CUDA, m) {
  m.impl("_batch_norm_act_fused", &batch_norm_act_cuda);
  m.impl("_batch_norm_act_backward", &batch_norm_act_backward_cuda);
}
