// The first-order backward of the fused normalizations on CUDA, shared by group_norm_act.cu and
// batch_norm_act.cu: y = act((x - m) * a + b) with per (segment, channel) coefficients.
//
// x is read as S segments of R rows (n, l) x C channels through strides (row r of segment s is the
// global row s * R + r = n * L + l). GroupNorm: a segment per sample (R = L), statistics per
// (sample, group of CG channels); BatchNorm: one segment of all N * L rows, CG = 1. In PyTorch,
// with gz = dy * act'(z):
//   norm_bwd_sums_kernel  grid (split, channel blocks, S): each block's per-channel sums of gz and
//                         gz * (x - m) over its chunk of rows -> (S, split, C)
//   (ATen)                the chunks added up: dbeta = sum(gz), dgamma = rstd * sum(gz (x - m)); per
//                         group p = -rstd^2 sum_c a_c sum(gz (x - m)) / n, q = -sum_c a_c sum(gz) / n
//   norm_bwd_dx_kernel    same grid: dx = gz * a + (x - m) * p + q, gz recomputed (cheaper on a GPU
//                         than writing it and reading it back)
// Lanes run along the unit-stride axis (rows for NCHW, channels for channels_last), as the forward's.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>

#include "activation.h"
#include "index.cuh"
#include "layout.h"

namespace fastgen::norm_backward {

constexpr int kThreads = 256;

struct Params {
  const void* dy;  // (N, C, L), strides sdn, sdc, sdl
  const void* x;   // (N, C, L), strides sxn, sxc, sxl
  void* dx;        // dy's strides
  const void *m, *a, *b, *p, *q;  // (S, C) opmath
  void *sum, *sumd;               // (S, split, C) opmath
  int64_t C, L, R, chunk, split;
  int64_t sxn, sxc, sxl, sdn, sdc, sdl;
  double slope;
  int act;
  bool channels_fast;
  bool small;  // fewer than 2^31 elements: row indices divided in 32 bits (index.cuh)
};

struct Tile {
  int tc, tr, c, r;  // channels x rows per block, and this thread's channel and row offsets
};

__device__ __forceinline__ Tile tile(const Params& p) {
  const int tid = threadIdx.x;
  return p.channels_fast ? Tile{32, kThreads / 32, tid % 32, tid / 32} : Tile{kThreads / 32, 32, tid / 32, tid % 32};
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) norm_bwd_sums_kernel(const Params p) {
  using T = at::opmath_type<scalar_t>;
  const Tile t = tile(p);
  const int64_t s = blockIdx.z, part = blockIdx.x, c = static_cast<int64_t>(blockIdx.y) * t.tc + t.c;
  T s1 = 0, s2 = 0;
  if (c < p.C) {
    const int64_t sc = s * p.C + c;
    const T m = static_cast<const T*>(p.m)[sc], a = static_cast<const T*>(p.a)[sc], b = static_cast<const T*>(p.b)[sc];
    const T slope = static_cast<T>(p.slope);
    const int64_t r1 = min(p.R, (part + 1) * p.chunk);
    for (int64_t r = part * p.chunk + t.r; r < r1; r += t.tr) {
      const int64_t row = s * p.R + r, n = fastgen::idiv(row, p.L, p.small), l = row - n * p.L;
      const T d = static_cast<T>(static_cast<const scalar_t*>(p.x)[n * p.sxn + l * p.sxl + c * p.sxc]) - m;
      const T gz = static_cast<T>(static_cast<const scalar_t*>(p.dy)[n * p.sdn + l * p.sdl + c * p.sdc]) *
                   fastgen::activate_grad<T>(d * a + b, p.act, slope);
      s1 += gz;
      s2 += gz * d;
    }
  }
  // add up the block's rows per channel
  __shared__ T sh1[kThreads], sh2[kThreads];
  sh1[threadIdx.x] = s1;
  sh2[threadIdx.x] = s2;
  __syncthreads();
  if (t.r == 0 && c < p.C) {
    for (int i = 1; i < t.tr; ++i) {
      const int other = p.channels_fast ? i * 32 + t.c : t.c * 32 + i;
      s1 += sh1[other];
      s2 += sh2[other];
    }
    const int64_t out = (s * p.split + part) * p.C + c;
    static_cast<T*>(p.sum)[out] = s1;
    static_cast<T*>(p.sumd)[out] = s2;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) norm_bwd_dx_kernel(const Params p) {
  using T = at::opmath_type<scalar_t>;
  const Tile t = tile(p);
  const int64_t s = blockIdx.z, part = blockIdx.x, c = static_cast<int64_t>(blockIdx.y) * t.tc + t.c;
  if (c >= p.C) return;
  const int64_t sc = s * p.C + c;
  const T m = static_cast<const T*>(p.m)[sc], a = static_cast<const T*>(p.a)[sc], b = static_cast<const T*>(p.b)[sc];
  const T pc = static_cast<const T*>(p.p)[sc], qc = static_cast<const T*>(p.q)[sc];
  const T slope = static_cast<T>(p.slope);
  const int64_t r1 = min(p.R, (part + 1) * p.chunk);
  for (int64_t r = part * p.chunk + t.r; r < r1; r += t.tr) {
    const int64_t row = s * p.R + r, n = fastgen::idiv(row, p.L, p.small), l = row - n * p.L;
    const int64_t od = n * p.sdn + l * p.sdl + c * p.sdc;
    const T d = static_cast<T>(static_cast<const scalar_t*>(p.x)[n * p.sxn + l * p.sxl + c * p.sxc]) - m;
    const T gz = static_cast<T>(static_cast<const scalar_t*>(p.dy)[od]) * fastgen::activate_grad<T>(d * a + b, p.act, slope);
    static_cast<scalar_t*>(p.dx)[od] = static_cast<scalar_t>(gz * a + (d * pc + qc));
  }
}

// dx (empty unless need_x), dgamma (S, C) = sum(gz * xhat) and dbeta (S, C) = sum(gz), opmath.
// m, a, b: (S, C) opmath coefficients of the forward; rstd: (S, C / CG) opmath; normalize false: the
// statistics were given, not taken of x (p = q = 0).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_act_backward(
    const at::Tensor& grad, const at::Tensor& x_in, int64_t S, int64_t CG, const at::Tensor& m, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& rstd, bool normalize, int64_t act, double slope, bool need_x) {
  TORCH_CHECK(act >= 0 && act < fastgen::kNumActivations, "unknown activation code ", act);
  const bool channels_last = fastgen::is_channels_last(x_in);
  const at::Tensor x = fastgen::dense(x_in);
  const at::Tensor dy = grad.contiguous(fastgen::output_format(x));
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / std::max<int64_t>(1, N * C), R = N * L / S;
  at::Tensor dx = need_x ? at::empty_like(dy) : at::empty({0}, x.options());
  if (x.numel() == 0) return {dx, at::zeros_like(m), at::zeros_like(m)};
  const int64_t tc = channels_last ? 32 : kThreads / 32, tr = kThreads / tc;
  const int64_t col_blocks = (C + tc - 1) / tc;
  // about 4 blocks per SM, each at least 8 rows per thread
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = std::max<int64_t>(1, (4 * sms + S * col_blocks - 1) / (S * col_blocks));
  const int64_t chunk = std::max<int64_t>(8 * tr, (R + want - 1) / want);
  const int64_t split = (R + chunk - 1) / chunk;
  TORCH_CHECK(col_blocks < 65536 && S < 65536 && split < (int64_t(1) << 31), "norm backward: too large");
  at::Tensor sums = at::empty({S, split, C}, m.options()), sumds = at::empty_like(sums);
  const at::Tensor mc = m.contiguous(), ac = a.contiguous(), bc = b.contiguous();

  Params p;
  p.dy = dy.data_ptr(); p.x = x.data_ptr(); p.dx = need_x ? dx.data_ptr() : nullptr;
  p.m = mc.data_ptr(); p.a = ac.data_ptr(); p.b = bc.data_ptr(); p.p = nullptr; p.q = nullptr;
  p.sum = sums.data_ptr(); p.sumd = sumds.data_ptr();
  p.C = C; p.L = L; p.R = R; p.chunk = chunk; p.split = split;
  p.sxn = x.stride(0); p.sxc = channels_last ? 1 : L; p.sxl = channels_last ? C : 1;
  p.sdn = dy.stride(0); p.sdc = p.sxc; p.sdl = p.sxl;
  p.slope = slope; p.act = static_cast<int>(act); p.channels_fast = channels_last;
  p.small = fastgen::small_indices(x.numel());
  const dim3 grid(static_cast<unsigned>(split), static_cast<unsigned>(col_blocks), static_cast<unsigned>(S));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_bwd_sums", [&] {
    norm_bwd_sums_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor dbeta = sums.sum(1), sumd = sumds.sum(1);
  const int64_t G = C / CG;
  const at::Tensor rstd_c = rstd.reshape({S, G, 1}).expand({S, G, CG}).reshape({S, C});
  const at::Tensor dgamma = sumd * rstd_c;
  if (need_x) {
    at::Tensor pc = at::zeros_like(mc), qc = at::zeros_like(mc);
    if (normalize) {
      const double count = static_cast<double>(CG * R);
      const at::Tensor s1 = (ac * dbeta).reshape({S, G, CG}).sum(2, true);
      const at::Tensor s2 = (ac * sumd).reshape({S, G, CG}).sum(2, true);
      const at::Tensor r = rstd.reshape({S, G, 1});
      pc = (-(r * r * s2) / count).expand({S, G, CG}).reshape({S, C}).contiguous();
      qc = (-s1 / count).expand({S, G, CG}).reshape({S, C}).contiguous();
    }
    p.p = pc.data_ptr(); p.q = qc.data_ptr();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_bwd_dx", [&] {
      norm_bwd_dx_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {dx, dgamma, dbeta};
}

}  // namespace fastgen::norm_backward
