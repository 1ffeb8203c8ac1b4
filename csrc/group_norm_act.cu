// GroupNorm + activation on CUDA: the "cuda" backend of fastgen::group_norm_act.
//
// In PyTorch:
//   y = act(F.group_norm(x, G, weight, bias, eps))          # weight, bias: (C,) or (N, C)
// x is read as (N, C, L) with unit stride along L (NCHW) or C (channels_last). Each (sample,
// group) is cut into `split` chunks of positions so that the GPU has enough blocks:
//   group_norm_stats_kernel  grid (N*G, split): Welford per thread, merged across the block with
//                            Chan's formula; writes the chunk's (mean, M2).
//   group_norm_act_kernel    grid (N*G, split): merges the group's partials, then writes
//                            act((x - mean) * a_c + b_c) over its chunk, a_c = rstd * w_c (the mean is
//                            not folded into b: that cancels badly where a group is nearly constant).
// Two reads of x and one write; statistics in fp32 (fp64 for double), each group's mean and rstd
// returned for the backward (norm_backward.cuh, with a segment per sample).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "index.cuh"
#include "layout.h"

#include "activation.h"
#include "norm_backward.cuh"

namespace {

constexpr int kThreads = 256;

struct GroupNormParams {
  const void* x;  // (N, C, L), strides sxn, sxc, sxl
  void* out;      // (N, C, L), strides son, soc, sol
  const void* w;  // (C,) or (N, C) contiguous, or nullptr
  const void* b;  // (C,) or (N, C) contiguous, or nullptr
  void* mean;     // (N * G, split) partial means, opmath
  void* m2;       // (N * G, split) partial sums of squared deviations, opmath
  void* mean_out;  // (N * G,) opmath: each group's mean and rstd, for the backward
  void* rstd_out;
  int64_t C, L, CG, chunk, split;
  int64_t sxn, sxc, sxl, son, soc, sol;
  int64_t swn, sbn;  // 0 for a (C,) affine, C for a per-sample one
  double eps, slope;
  int act;
  bool positions_fastest;  // iterate positions innermost (NCHW) or channels innermost (channels_last)
  bool small;  // fewer than 2^31 elements: element indices divided in 32 bits (index.cuh)
};

template <typename T>
struct Welford {
  T n, mean, m2;
};

template <typename T>
__device__ __forceinline__ Welford<T> merge(Welford<T> a, Welford<T> b) {
  const T n = a.n + b.n;
  if (n == T(0)) return a;
  const T d = b.mean - a.mean, f = b.n / n;
  return {n, a.mean + d * f, a.m2 + b.m2 + d * d * a.n * f};
}

template <typename T>
__device__ Welford<T> block_merge(Welford<T> w) {
  __shared__ T sn[kThreads / 32], smean[kThreads / 32], sm2[kThreads / 32];
  for (int off = 16; off > 0; off /= 2) {
    Welford<T> o{__shfl_down_sync(0xffffffff, w.n, off), __shfl_down_sync(0xffffffff, w.mean, off),
                 __shfl_down_sync(0xffffffff, w.m2, off)};
    w = merge(w, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) { sn[warp] = w.n; smean[warp] = w.mean; sm2[warp] = w.m2; }
  __syncthreads();
  if (threadIdx.x == 0)
    for (int i = 1; i < kThreads / 32; ++i) w = merge(w, Welford<T>{sn[i], smean[i], sm2[i]});
  return w;  // valid in thread 0
}

// The chunk's k-th element as (channel within the group, position).
__device__ __forceinline__ void element(const GroupNormParams& p, int64_t k, int64_t len, int64_t& c, int64_t& l) {
  using fastgen::idiv;
  if (p.positions_fastest) { c = idiv(k, len, p.small); l = k - c * len; } else { l = idiv(k, p.CG, p.small); c = k - l * p.CG; }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) group_norm_stats_kernel(const GroupNormParams p) {
  using T = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x, part = blockIdx.y, groups = p.C / p.CG;
  const int64_t n = row / groups, c0 = (row % groups) * p.CG;
  const int64_t l0 = part * p.chunk, len = min(p.chunk, p.L - l0);
  const scalar_t* x = static_cast<const scalar_t*>(p.x) + n * p.sxn;
  Welford<T> w{0, 0, 0};
  for (int64_t k = threadIdx.x; k < p.CG * len; k += kThreads) {
    int64_t c, l;
    element(p, k, len, c, l);
    const T v = static_cast<T>(x[(c0 + c) * p.sxc + (l0 + l) * p.sxl]);
    w.n += T(1);
    const T d = v - w.mean;
    w.mean += d / w.n;
    w.m2 += d * (v - w.mean);
  }
  w = block_merge(w);
  if (threadIdx.x == 0) {
    static_cast<T*>(p.mean)[row * p.split + part] = w.mean;
    static_cast<T*>(p.m2)[row * p.split + part] = w.m2;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) group_norm_act_kernel(const GroupNormParams p) {
  using T = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x, part = blockIdx.y, groups = p.C / p.CG;
  const int64_t n = row / groups, c0 = (row % groups) * p.CG;
  __shared__ T s_mean, s_rstd;
  if (threadIdx.x == 0) {
    Welford<T> w{0, 0, 0};
    for (int64_t i = 0; i < p.split; ++i) {
      const T count = static_cast<T>(p.CG * min(p.chunk, p.L - i * p.chunk));
      w = merge(w, Welford<T>{count, static_cast<const T*>(p.mean)[row * p.split + i],
                              static_cast<const T*>(p.m2)[row * p.split + i]});
    }
    s_mean = w.mean;
    const T var = w.m2 / w.n;  // not max(): fmax would turn a NaN statistic into 0
    s_rstd = T(1) / sqrt((var < T(0) ? T(0) : var) + static_cast<T>(p.eps));
    if (part == 0) {
      static_cast<T*>(p.mean_out)[row] = s_mean;
      static_cast<T*>(p.rstd_out)[row] = s_rstd;
    }
  }
  __syncthreads();
  const T mean = s_mean, rstd = s_rstd, slope = static_cast<T>(p.slope);
  const int64_t l0 = part * p.chunk, len = min(p.chunk, p.L - l0);
  const scalar_t* x = static_cast<const scalar_t*>(p.x) + n * p.sxn;
  scalar_t* out = static_cast<scalar_t*>(p.out) + n * p.son;
  const scalar_t* wp = static_cast<const scalar_t*>(p.w);
  const scalar_t* bp = static_cast<const scalar_t*>(p.b);
  for (int64_t k = threadIdx.x; k < p.CG * len; k += kThreads) {
    int64_t c, l;
    element(p, k, len, c, l);
    const int64_t ch = c0 + c;
    const T a = rstd * (wp ? static_cast<T>(wp[n * p.swn + ch]) : T(1));
    const T b = bp ? static_cast<T>(bp[n * p.sbn + ch]) : T(0);
    const T z = (static_cast<T>(x[ch * p.sxc + (l0 + l) * p.sxl]) - mean) * a + b;
    out[ch * p.soc + (l0 + l) * p.sol] = static_cast<scalar_t>(fastgen::activate<T>(z, p.act, slope));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cuda(
    const at::Tensor& x_in, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, int64_t activation, double negative_slope) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() >= 2 && x_in.size(1) % num_groups == 0,
              "x must be a CUDA (N, C, *) tensor with C divisible by num_groups");
  TORCH_CHECK(activation >= 0 && activation < fastgen::kNumActivations, "unknown activation code ", activation);
  const at::cuda::CUDAGuard guard(x_in.device());
  const bool channels_last = fastgen::is_channels_last(x_in);
  const at::Tensor x = fastgen::dense(x_in);
  at::Tensor out = at::empty_like(x, fastgen::output_format(x));
  const auto opmath = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({x.size(0), num_groups}, x.options().dtype(opmath)), rstd = at::empty_like(mean);
  if (x.numel() == 0) return {out, mean, rstd};
  const at::Tensor w = fastgen::contiguous_or_undefined(weight), b = fastgen::contiguous_or_undefined(bias);

  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / (N * C), CG = C / num_groups;
  // enough blocks for the GPU: about 4 per SM, each chunk at least 2048 elements
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = std::max<int64_t>(1, (4 * sms + N * num_groups - 1) / (N * num_groups));
  const int64_t min_chunk = std::max<int64_t>(1, 2048 / CG);
  const int64_t chunk = std::max(min_chunk, (L + want - 1) / want);
  const int64_t split = (L + chunk - 1) / chunk;
  TORCH_CHECK(split < 65536 && N * num_groups < (int64_t(1) << 31), "group_norm_act: too large");
  at::Tensor means = at::empty({N * num_groups, split}, x.options().dtype(opmath));
  at::Tensor m2s = at::empty_like(means);

  GroupNormParams p;
  p.x = x.data_ptr(); p.out = out.data_ptr();
  p.w = w.defined() ? w.data_ptr() : nullptr; p.b = b.defined() ? b.data_ptr() : nullptr;
  p.mean = means.data_ptr(); p.m2 = m2s.data_ptr();
  p.mean_out = mean.data_ptr(); p.rstd_out = rstd.data_ptr();
  p.C = C; p.L = L; p.CG = CG; p.chunk = chunk; p.split = split;
  p.sxn = x.stride(0); p.sxc = channels_last ? 1 : L; p.sxl = channels_last ? C : 1;
  p.son = out.stride(0); p.soc = p.sxc; p.sol = p.sxl;
  p.swn = w.defined() && w.dim() == 2 ? C : 0;
  p.sbn = b.defined() && b.dim() == 2 ? C : 0;
  p.eps = eps; p.slope = negative_slope; p.act = static_cast<int>(activation);
  p.positions_fastest = !channels_last;
  p.small = fastgen::small_indices(x.numel());

  const dim3 grid(static_cast<unsigned>(N * num_groups), static_cast<unsigned>(split));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_act_cuda", [&] {
    group_norm_stats_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    group_norm_act_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, rstd};
}

// The backward from the saved statistics: a segment per sample, the forward's per-channel
// coefficients m = mean_g, a = rstd_g * w_c, b = bias_c (norm_backward.cuh).
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t activation,
    double negative_slope, bool need_x) {
  TORCH_CHECK(x.is_cuda() && x.dim() >= 2 && mean.dim() == 2 && mean.size(0) == x.size(0) &&
              x.size(1) % mean.size(1) == 0, "x must be a CUDA (N, C, *) tensor and mean (N, G) with G dividing C");
  TORCH_CHECK(grad.sizes() == x.sizes(), "grad must have x's shape");
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), G = mean.size(1), CG = C / G;
  auto per_channel = [&](const at::Tensor& t) { return t.reshape({N, G, 1}).expand({N, G, CG}).reshape({N, C}); };
  const at::Tensor m = per_channel(mean);
  at::Tensor a = per_channel(rstd);
  if (weight.has_value()) a = a * weight->to(a.scalar_type());
  const at::Tensor b = bias.has_value() ? bias->to(a.scalar_type()).expand({N, C}) : at::zeros_like(a);
  return fastgen::norm_backward::norm_act_backward(grad, x, N, CG, m, a.expand({N, C}), b, rstd, true, activation,
                                                    negative_slope, need_x);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CUDA, m) {
  m.impl("_group_norm_act_fused", &group_norm_act_cuda);
  m.impl("_group_norm_act_backward", &group_norm_act_backward_cuda);
}
