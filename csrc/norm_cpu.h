// CPU building blocks of the fused normalization kernels: shifted sums for the statistics, and the
// normalize + activate pass (activations: activation.h). Vectorized for float (at::vec, the ISA
// setup.py compiles for); scalar loops in opmath for the other dtypes.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "activation.h"

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

}  // namespace fastgen::cpu
