// CPU building blocks of the fused normalization kernels: shifted sums for the statistics, and the
// normalize + activate pass (activations: activation.h). Vectorized for float (at::vec, the ISA
// setup.py compiles for); scalar loops in opmath for the other dtypes.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "activation.h"
#include "layout.h"

namespace fastgen::cpu {

constexpr int64_t kBlock = 512;  // values summed in float before the double accumulators

inline float horizontal_sum(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float s = 0.f;
  for (int i = 0; i < Vec::size(); ++i) s += lanes[i];
  return s;
}

// s1 += sum(x - k), s2 += sum((x - k)^2) over len contiguous values.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void shifted_sums(const scalar_t* x, int64_t len, opmath_t k, double& s1, double& s2) {
  for (int64_t b0 = 0; b0 < len; b0 += kBlock) {
    const int64_t b1 = std::min(len, b0 + kBlock);
    int64_t i = b0;
    opmath_t a1 = 0, a2 = 0;
    if constexpr (std::is_same_v<scalar_t, float>) {
      Vec v1(0.f), v2(0.f);
      for (; i + Vec::size() <= b1; i += Vec::size()) {
        const Vec d = Vec::loadu(x + i) - Vec(k);
        v1 += d;
        v2 += d * d;
      }
      a1 = horizontal_sum(v1);
      a2 = horizontal_sum(v2);
    }
    for (; i < b1; ++i) {
      const opmath_t d = static_cast<opmath_t>(x[i]) - k;
      a1 += d;
      a2 += d * d;
    }
    s1 += a1;
    s2 += a2;
  }
}

// Channels-last rows: for each channel c, a1[c] += sum_r (x[r][c] - k[c]) and
// a2[c] += sum_r (x[r][c] - k[c])^2 over `rows` rows of C values (row stride C). Float: a strip of
// four vectors of channels at a time, its sums in registers across all the rows, so that x is the
// only memory stream (the block of rows stays in L2 across strips).
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void shifted_sums_rows(const scalar_t* x, int64_t rows, int64_t C, const opmath_t* k, opmath_t* a1, opmath_t* a2) {
  int64_t c = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    constexpr int64_t kStrip = 4, V = Vec::size();
    for (; c + kStrip * V <= C; c += kStrip * V) {
      Vec s1[kStrip], s2[kStrip], kv[kStrip];
      for (int64_t j = 0; j < kStrip; ++j) {
        s1[j] = Vec(0.f);
        s2[j] = Vec(0.f);
        kv[j] = Vec::loadu(k + c + j * V);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = x + r * C + c;
        for (int64_t j = 0; j < kStrip; ++j) {
          const Vec d = Vec::loadu(row + j * V) - kv[j];
          s1[j] += d;
          s2[j] += d * d;
        }
      }
      for (int64_t j = 0; j < kStrip; ++j) {
        (Vec::loadu(a1 + c + j * V) + s1[j]).store(a1 + c + j * V);
        (Vec::loadu(a2 + c + j * V) + s2[j]).store(a2 + c + j * V);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t cc = c; cc < C; ++cc) {
      const opmath_t d = static_cast<opmath_t>(x[r * C + cc]) - k[cc];
      a1[cc] += d;
      a2[cc] += d * d;
    }
  }
}

// y = act((x - m) * a + b) over len values; m, a, b scalars (NCHW rows) or per-value arrays (NHWC rows).
// The mean is subtracted before scaling, not folded into b = bias - mean * a: where a group is nearly
// constant, a = rstd * w is huge and the folded x * a + b cancels two large numbers (1e-4 off in fp32).
template <typename scalar_t, int ACT, bool kPerValue, typename opmath_t = at::opmath_type<scalar_t>>
void apply_span(const scalar_t* x, scalar_t* y, int64_t len, const opmath_t* m, const opmath_t* a, const opmath_t* b,
                double slope) {
  // slope stays double until it meets the compute type: a float64 input computes with 0.2, not 0.2f
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    const Vec vs(static_cast<float>(slope));
    for (; i + Vec::size() <= len; i += Vec::size()) {
      const Vec vm = kPerValue ? Vec::loadu(m + i) : Vec(*m);
      const Vec va = kPerValue ? Vec::loadu(a + i) : Vec(*a);
      const Vec vb = kPerValue ? Vec::loadu(b + i) : Vec(*b);
      activate_vec<ACT>(at::vec::fmadd(Vec::loadu(x + i) - vm, va, vb), vs).store(y + i);
    }
  }
  for (; i < len; ++i) {
    const opmath_t z = (static_cast<opmath_t>(x[i]) - (kPerValue ? m[i] : *m)) * (kPerValue ? a[i] : *a) +
                       (kPerValue ? b[i] : *b);
    y[i] = static_cast<scalar_t>(fastgen::activate<opmath_t>(z, ACT, static_cast<opmath_t>(slope)));
  }
}

// ---------------------------------------------------------------------------------------------
// What a backward op starts from: x dense in the layout it keeps, the incoming gradient in that
// layout, dx (undefined unless need_x) and the statistics' dtype.
struct BackwardInputs {
  at::Tensor x, dy, dx;
  bool channels_last;
  at::ScalarType opmath;
};

inline BackwardInputs backward_inputs(const at::Tensor& grad, const at::Tensor& x_in, int64_t activation, bool need_x) {
  TORCH_CHECK(grad.sizes() == x_in.sizes(), "grad must have x's shape");
  TORCH_CHECK(activation >= 0 && activation < fastgen::kNumActivations, "unknown activation code ", activation);
  BackwardInputs in;
  in.channels_last = fastgen::is_channels_last(x_in);
  in.x = fastgen::dense(x_in);
  in.dy = grad.contiguous(fastgen::output_format(in.x));
  in.dx = need_x ? at::empty_like(in.x, fastgen::output_format(in.x)) : at::Tensor();
  in.opmath = in.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return in;
}

// ---------------------------------------------------------------------------------------------
// Backward of y = act((x - m) * a + b), a = rstd * w: gz = dy * act'(z) is the gradient of the
// pre-activation. Pass 1 sums gz and gz * (x - m) per channel (dbeta, and dgamma / rstd; the group's
// sums of w * those give dx's two correction terms); pass 2 writes
//   dx = gz * a + (x - m) * p + q,   p = -rstd^2 * sum(w * gz * (x - m) * rstd) / n,  q = -rstd * sum(w * gz) / n
// per group (p = q = 0 when the statistics are given, not taken of x). When x's dtype is its own
// opmath (float, double), pass 1 stores gz in dx and pass 2 reads it back; otherwise pass 2
// recomputes it (dx in half precision cannot hold gz).

template <typename scalar_t>
constexpr bool kStoresGz = std::is_same_v<scalar_t, at::opmath_type<scalar_t>>;

// Pass 1 over len contiguous values with one (m, a, b): s_gz += sum(gz), s_gzd += sum(gz * (x - m))
// (float within a block, double across blocks); gz stored to dx when dx is not null and kStoresGz.
template <typename scalar_t, int ACT, typename opmath_t = at::opmath_type<scalar_t>>
void grad_sums(const scalar_t* x, const scalar_t* dy, scalar_t* dx, int64_t len, opmath_t m, opmath_t a, opmath_t b,
               double slope, double& s_gz, double& s_gzd) {
  const bool store = kStoresGz<scalar_t> && dx != nullptr;
  for (int64_t b0 = 0; b0 < len; b0 += kBlock) {
    const int64_t b1 = std::min(len, b0 + kBlock);
    int64_t i = b0;
    opmath_t t1 = 0, t2 = 0;
    if constexpr (std::is_same_v<scalar_t, float>) {
      const Vec vm(m), va(a), vb(b), vs(static_cast<float>(slope));
      Vec v1(0.f), v2(0.f);
      for (; i + Vec::size() <= b1; i += Vec::size()) {
        const Vec d = Vec::loadu(x + i) - vm;
        const Vec gz = Vec::loadu(dy + i) * activate_grad_vec<ACT>(at::vec::fmadd(d, va, vb), vs);
        if (store) gz.store(dx + i);
        v1 += gz;
        v2 = at::vec::fmadd(gz, d, v2);
      }
      t1 = horizontal_sum(v1);
      t2 = horizontal_sum(v2);
    }
    for (; i < b1; ++i) {
      const opmath_t d = static_cast<opmath_t>(x[i]) - m;
      const opmath_t gz = static_cast<opmath_t>(dy[i]) * activate_grad<opmath_t>(d * a + b, ACT, static_cast<opmath_t>(slope));
      if constexpr (kStoresGz<scalar_t>) if (store) dx[i] = gz;
      t1 += gz;
      t2 += gz * d;
    }
    s_gz += t1;
    s_gzd += t2;
  }
}

// Pass 1 over `rows` channels_last rows of C channels with per-channel m, a, b: s_gz[c] += sum(gz),
// s_gzd[c] += sum(gz * (x - m)); gz stored to dx as in grad_sums. Float: strips of channels whose
// coefficients and sums stay in registers across all the rows (as shifted_sums_rows).
template <typename scalar_t, int ACT, typename opmath_t = at::opmath_type<scalar_t>>
void grad_sums_rows(const scalar_t* x, const scalar_t* dy, scalar_t* dx, int64_t rows, int64_t C, const opmath_t* m,
                    const opmath_t* a, const opmath_t* b, double slope, opmath_t* s_gz, opmath_t* s_gzd) {
  const bool store = kStoresGz<scalar_t> && dx != nullptr;
  int64_t c = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    const Vec vs(static_cast<float>(slope));
    auto strips = [&](auto width) {
      constexpr int64_t K = decltype(width)::value, V = Vec::size();
      for (; c + K * V <= C; c += K * V) {
        Vec vm[K], va[K], vb[K], s1[K], s2[K];
        for (int64_t j = 0; j < K; ++j) {
          vm[j] = Vec::loadu(m + c + j * V);
          va[j] = Vec::loadu(a + c + j * V);
          vb[j] = Vec::loadu(b + c + j * V);
          s1[j] = Vec(0.f);
          s2[j] = Vec(0.f);
        }
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < K; ++j) {
            const int64_t o = r * C + c + j * V;
            const Vec d = Vec::loadu(x + o) - vm[j];
            const Vec gz = Vec::loadu(dy + o) * activate_grad_vec<ACT>(at::vec::fmadd(d, va[j], vb[j]), vs);
            if (store) gz.store(dx + o);
            s1[j] += gz;
            s2[j] = at::vec::fmadd(gz, d, s2[j]);
          }
        for (int64_t j = 0; j < K; ++j) {
          (Vec::loadu(s_gz + c + j * V) + s1[j]).store(s_gz + c + j * V);
          (Vec::loadu(s_gzd + c + j * V) + s2[j]).store(s_gzd + c + j * V);
        }
      }
    };
    strips(std::integral_constant<int64_t, 4>{});
    strips(std::integral_constant<int64_t, 1>{});
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t cc = c; cc < C; ++cc) {
      const int64_t o = r * C + cc;
      const opmath_t d = static_cast<opmath_t>(x[o]) - m[cc];
      const opmath_t gz = static_cast<opmath_t>(dy[o]) *
                          activate_grad<opmath_t>(d * a[cc] + b[cc], ACT, static_cast<opmath_t>(slope));
      if constexpr (kStoresGz<scalar_t>) if (store) dx[o] = gz;
      s_gz[cc] += gz;
      s_gzd[cc] += gz * d;
    }
}

// Pass 2 over len values: dx = gz * a + (x - m) * p + q, gz as pass 1 stored it in dx (kStoresGz)
// or recomputed from x and dy; m, a, b, p, q scalars (NCHW spans) or per-value arrays (kPerValue:
// channels_last rows).
template <typename scalar_t, int ACT, bool kPerValue, typename opmath_t = at::opmath_type<scalar_t>>
void grad_input_span(const scalar_t* x, const scalar_t* dy, scalar_t* dx, int64_t len, const opmath_t* m,
                     const opmath_t* a, const opmath_t* b, const opmath_t* p, const opmath_t* q, double slope) {
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + Vec::size() <= len; i += Vec::size()) {
      const Vec vm = kPerValue ? Vec::loadu(m + i) : Vec(*m);
      const Vec va = kPerValue ? Vec::loadu(a + i) : Vec(*a);
      const Vec vp = kPerValue ? Vec::loadu(p + i) : Vec(*p);
      const Vec vq = kPerValue ? Vec::loadu(q + i) : Vec(*q);
      const Vec d = Vec::loadu(x + i) - vm;
      at::vec::fmadd(Vec::loadu(dx + i), va, at::vec::fmadd(d, vp, vq)).store(dx + i);
    }
  }
  for (; i < len; ++i) {
    const opmath_t d = static_cast<opmath_t>(x[i]) - (kPerValue ? m[i] : *m);
    const opmath_t av = kPerValue ? a[i] : *a;
    opmath_t gz;
    if constexpr (kStoresGz<scalar_t>) {
      gz = dx[i];
    } else {
      gz = static_cast<opmath_t>(dy[i]) *
           activate_grad<opmath_t>(d * av + (kPerValue ? b[i] : *b), ACT, static_cast<opmath_t>(slope));
    }
    dx[i] = static_cast<scalar_t>(gz * av + (d * (kPerValue ? p[i] : *p) + (kPerValue ? q[i] : *q)));
  }
}

// Pass 2 over `rows` channels_last rows of C channels with per-channel coefficients (grad_input_span's
// formula); float in strips of channels, as grad_sums_rows.
template <typename scalar_t, int ACT, typename opmath_t = at::opmath_type<scalar_t>>
void grad_input_rows(const scalar_t* x, const scalar_t* dy, scalar_t* dx, int64_t rows, int64_t C, const opmath_t* m,
                     const opmath_t* a, const opmath_t* b, const opmath_t* p, const opmath_t* q, double slope) {
  int64_t c = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    auto strips = [&](auto width) {
      constexpr int64_t K = decltype(width)::value, V = Vec::size();
      for (; c + K * V <= C; c += K * V) {
        Vec vm[K], va[K], vp[K], vq[K];
        for (int64_t j = 0; j < K; ++j) {
          vm[j] = Vec::loadu(m + c + j * V);
          va[j] = Vec::loadu(a + c + j * V);
          vp[j] = Vec::loadu(p + c + j * V);
          vq[j] = Vec::loadu(q + c + j * V);
        }
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < K; ++j) {
            const int64_t o = r * C + c + j * V;
            const Vec d = Vec::loadu(x + o) - vm[j];
            at::vec::fmadd(Vec::loadu(dx + o), va[j], at::vec::fmadd(d, vp[j], vq[j])).store(dx + o);
          }
      }
    };
    strips(std::integral_constant<int64_t, 4>{});
    strips(std::integral_constant<int64_t, 1>{});
  }
  if (c < C)
    for (int64_t r = 0; r < rows; ++r)
      grad_input_span<scalar_t, ACT, true>(x + r * C + c, dy + r * C + c, dx + r * C + c, C - c, m + c, a + c, b + c,
                                           p + c, q + c, slope);
}

// The backward over channels_last rows: S segments of R rows of C channels, statistics per
// (segment, group of CG channels). GroupNorm: a segment per sample; BatchNorm: one segment of all
// N * L rows, CG = 1. m, a, b: (S, C) coefficients of the forward; rstd: (S, C / CG); out: dgamma
// (S, C) = sum(gz * xhat) and dbeta (S, C) = sum(gz); dx written unless null; normalize false: the
// statistics were given, not taken of x (p = q = 0). Each task sums a run of rows of one segment
// into its own accumulators (as the forward's statistics), then per group p and q, then each task
// writes dx over its rows.
template <typename scalar_t, int ACT, typename opmath_t = at::opmath_type<scalar_t>>
void norm_act_backward_rows(const scalar_t* x, const scalar_t* dy, scalar_t* dx, int64_t S, int64_t R, int64_t C,
                            int64_t CG, const opmath_t* m, const opmath_t* a, const opmath_t* b, const opmath_t* rstd,
                            bool normalize, double slope, opmath_t* dgamma, opmath_t* dbeta) {
  const int64_t rows_per_task = std::clamp<int64_t>(32768 / C, 1, kBlock);
  const int64_t tasks_per_s = (R + rows_per_task - 1) / rows_per_task;
  std::vector<opmath_t> p1(S * tasks_per_s * C, opmath_t(0)), p2(S * tasks_per_s * C, opmath_t(0));
  at::parallel_for(0, S * tasks_per_s, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t / tasks_per_s, r0 = s * R + (t % tasks_per_s) * rows_per_task;
      const int64_t r1 = std::min((s + 1) * R, r0 + rows_per_task);
      grad_sums_rows<scalar_t, ACT>(x + r0 * C, dy + r0 * C, dx ? dx + r0 * C : nullptr, r1 - r0, C, m + s * C,
                                    a + s * C, b + s * C, slope, p1.data() + t * C, p2.data() + t * C);
    }
  });
  const int64_t G = C / CG;
  std::vector<opmath_t> p(S * C, opmath_t(0)), q(S * C, opmath_t(0));
  for (int64_t s = 0; s < S; ++s)
    for (int64_t g = 0; g < G; ++g) {
      const double r = static_cast<double>(rstd[s * G + g]);
      double s1 = 0, s2 = 0;
      for (int64_t c = g * CG; c < (g + 1) * CG; ++c) {
        double t1 = 0, t2 = 0;
        for (int64_t t = s * tasks_per_s; t < (s + 1) * tasks_per_s; ++t) {
          t1 += p1[t * C + c];
          t2 += p2[t * C + c];
        }
        dbeta[s * C + c] = static_cast<opmath_t>(t1);
        dgamma[s * C + c] = static_cast<opmath_t>(t2 * r);
        s1 += static_cast<double>(a[s * C + c]) * t1;
        s2 += static_cast<double>(a[s * C + c]) * t2;
      }
      if (!normalize) continue;
      const double count = static_cast<double>(CG * R);
      for (int64_t c = g * CG; c < (g + 1) * CG; ++c) {
        p[s * C + c] = static_cast<opmath_t>(-r * r * s2 / count);
        q[s * C + c] = static_cast<opmath_t>(-s1 / count);
      }
    }
  if (dx == nullptr) return;
  at::parallel_for(0, S * tasks_per_s, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t / tasks_per_s, r0 = s * R + (t % tasks_per_s) * rows_per_task;
      const int64_t r1 = std::min((s + 1) * R, r0 + rows_per_task);
      grad_input_rows<scalar_t, ACT>(x + r0 * C, dy + r0 * C, dx + r0 * C, r1 - r0, C, m + s * C, a + s * C,
                                     b + s * C, p.data() + s * C, q.data() + s * C, slope);
    }
  });
}

}  // namespace fastgen::cpu
