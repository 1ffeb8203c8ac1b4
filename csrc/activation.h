// The activations of every fused op, by code: the kernels' side of the one activation table
// (fastgen/activations.py; tests/test_activations.py pins each code here against torch).
// Scalar value and derivative for CPU tails and CUDA (in opmath), and for the CPU the vectorized
// float versions plus a dispatcher that instantiates a kernel per activation.
#pragma once
#include <c10/macros/Macros.h>
#include <cmath>

namespace fastgen {

enum Activation : int {
  kIdentity = 0, kRelu = 1, kLeakyRelu = 2, kSilu = 3, kGelu = 4, kGeluTanh = 5,
  kTanh = 6, kSigmoid = 7, kElu = 8, kSelu = 9, kSoftplus = 10,
  kNumActivations = 11
};
constexpr double kSeluAlpha = 1.6732632423543772848170429916717;
constexpr double kSeluScale = 1.0507009873554804934193349852946;
constexpr double kSoftplusThreshold = 20.0;  // F.softplus: above it, softplus(z) = z
constexpr double kSqrtHalf = 0.70710678118654752440;
constexpr double kSqrtTwoOverPi = 0.79788456080286535588;
constexpr double kInvSqrtTwoPi = 0.39894228040143267794;

template <typename T>
C10_HOST_DEVICE inline T sigmoid(T z) { return T(1) / (T(1) + ::exp(-z)); }

template <typename T>
C10_HOST_DEVICE inline T activate(T z, int act, T alpha) {
  switch (act) {
    case kRelu: return z < T(0) ? T(0) : z;  // a NaN passes, as torch.relu's does
    case kLeakyRelu: return z > T(0) ? z : z * alpha;
    case kSilu: return z / (T(1) + ::exp(-z));
    case kGelu: return T(0.5) * z * (T(1) + ::erf(z * T(kSqrtHalf)));
    case kGeluTanh: return T(0.5) * z * (T(1) + ::tanh(T(kSqrtTwoOverPi) * (z + T(0.044715) * z * z * z)));
    case kTanh: return ::tanh(z);
    case kSigmoid: return sigmoid(z);
    case kElu: return z > T(0) ? z : ::expm1(z);
    case kSelu: return T(kSeluScale) * (z > T(0) ? z : T(kSeluAlpha) * ::expm1(z));
    case kSoftplus: return z > T(kSoftplusThreshold) ? z : ::log1p(::exp(z));
    default: return z;
  }
}

// d act(z) / dz with torch's one-sided choices at the kinks (the left one at 0).
template <typename T>
C10_HOST_DEVICE inline T activate_grad(T z, int act, T alpha) {
  switch (act) {
    case kRelu: return z > T(0) ? T(1) : T(0);
    case kLeakyRelu: return z > T(0) ? T(1) : alpha;
    case kSilu: { const T s = sigmoid(z); return s * (T(1) + z * (T(1) - s)); }
    case kGelu: return T(0.5) * (T(1) + ::erf(z * T(kSqrtHalf))) + z * T(kInvSqrtTwoPi) * ::exp(T(-0.5) * z * z);
    case kGeluTanh: {
      const T t = ::tanh(T(kSqrtTwoOverPi) * (z + T(0.044715) * z * z * z));
      return T(0.5) * (T(1) + t) + T(0.5) * z * (T(1) - t * t) * T(kSqrtTwoOverPi) * (T(1) + T(3 * 0.044715) * z * z);
    }
    case kTanh: { const T t = ::tanh(z); return T(1) - t * t; }
    case kSigmoid: { const T s = sigmoid(z); return s * (T(1) - s); }
    case kElu: return z > T(0) ? T(1) : ::exp(z);
    case kSelu: return T(kSeluScale) * (z > T(0) ? T(1) : T(kSeluAlpha) * ::exp(z));
    case kSoftplus: return z > T(kSoftplusThreshold) ? T(1) : sigmoid(z);
    default: return T(1);
  }
}

}  // namespace fastgen

#ifndef __CUDACC__
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace fastgen::cpu {

using Vec = at::vec::Vectorized<float>;

template <int ACT>
inline Vec activate_vec(Vec z, Vec alpha) {
  const Vec one(1.f), zero(0.f);
  if constexpr (ACT == kRelu) return at::vec::clamp_min(z, zero);
  if constexpr (ACT == kLeakyRelu) return Vec::blendv(z * alpha, z, z > zero);
  if constexpr (ACT == kSilu) return z / (one + z.neg().exp_u20());  // exp to 2 ulp: fast enough to hide
  if constexpr (ACT == kGelu) return Vec(0.5f) * z * (one + (z * Vec(static_cast<float>(kSqrtHalf))).erf());
  if constexpr (ACT == kGeluTanh) {
    const Vec u = Vec(static_cast<float>(kSqrtTwoOverPi)) * (z + Vec(0.044715f) * z * z * z);
    return Vec(0.5f) * z * (one + u.tanh());
  }
  if constexpr (ACT == kTanh) return z.tanh();
  if constexpr (ACT == kSigmoid) return one / (one + z.neg().exp());
  if constexpr (ACT == kElu) return Vec::blendv(z.expm1(), z, z > zero);
  if constexpr (ACT == kSelu)
    return Vec(static_cast<float>(kSeluScale)) * Vec::blendv(Vec(static_cast<float>(kSeluAlpha)) * z.expm1(), z, z > zero);
  if constexpr (ACT == kSoftplus) {
    const Vec big(static_cast<float>(kSoftplusThreshold));
    return Vec::blendv(at::vec::minimum(z, big).exp().log1p(), z, z > big);
  }
  return z;
}

// The derivatives use exp_u20 (2 ulp) throughout: a gradient needs no more, and Sleef's 1-ulp exp
// made the backward's first pass twice as slow (silu at 1x256x64x64: 0.33 vs 0.17 ms on 2 cores).
template <int ACT>
inline Vec activate_grad_vec(Vec z, Vec alpha) {
  const Vec one(1.f), zero(0.f);
  if constexpr (ACT == kRelu) return Vec::blendv(zero, one, z > zero);
  if constexpr (ACT == kLeakyRelu) return Vec::blendv(alpha, one, z > zero);
  if constexpr (ACT == kSilu || ACT == kSigmoid || ACT == kSoftplus) {
    const Vec s = one / (one + z.neg().exp_u20());
    if constexpr (ACT == kSilu) return s * (one + z * (one - s));
    if constexpr (ACT == kSigmoid) return s * (one - s);
    if constexpr (ACT == kSoftplus) return Vec::blendv(s, one, z > Vec(static_cast<float>(kSoftplusThreshold)));
  }
  if constexpr (ACT == kGelu)
    return Vec(0.5f) * (one + (z * Vec(static_cast<float>(kSqrtHalf))).erf()) +
           z * Vec(static_cast<float>(kInvSqrtTwoPi)) * (Vec(-0.5f) * z * z).exp_u20();
  if constexpr (ACT == kGeluTanh) {
    const Vec k(static_cast<float>(kSqrtTwoOverPi));
    const Vec t = (k * (z + Vec(0.044715f) * z * z * z)).tanh();
    return Vec(0.5f) * (one + t) + Vec(0.5f) * z * (one - t * t) * k * (one + Vec(3 * 0.044715f) * z * z);
  }
  if constexpr (ACT == kTanh) {
    const Vec t = z.tanh();
    return one - t * t;
  }
  if constexpr (ACT == kElu) return Vec::blendv(at::vec::minimum(z, zero).exp_u20(), one, z > zero);
  if constexpr (ACT == kSelu)
    return Vec(static_cast<float>(kSeluScale)) *
           Vec::blendv(Vec(static_cast<float>(kSeluAlpha)) * at::vec::minimum(z, zero).exp_u20(), one, z > zero);
  return one;
}

// Calls f(std::integral_constant<int, ACT>{}) for the activation code, so that kernels are
// instantiated per activation and the inner loops carry no switch.
template <typename F>
void with_activation(int64_t act, F&& f) {
  switch (act) {
    case kRelu: f(std::integral_constant<int, kRelu>{}); break;
    case kLeakyRelu: f(std::integral_constant<int, kLeakyRelu>{}); break;
    case kSilu: f(std::integral_constant<int, kSilu>{}); break;
    case kGelu: f(std::integral_constant<int, kGelu>{}); break;
    case kGeluTanh: f(std::integral_constant<int, kGeluTanh>{}); break;
    case kTanh: f(std::integral_constant<int, kTanh>{}); break;
    case kSigmoid: f(std::integral_constant<int, kSigmoid>{}); break;
    case kElu: f(std::integral_constant<int, kElu>{}); break;
    case kSelu: f(std::integral_constant<int, kSelu>{}); break;
    case kSoftplus: f(std::integral_constant<int, kSoftplus>{}); break;
    default: f(std::integral_constant<int, kIdentity>{});
  }
}

}  // namespace fastgen::cpu
#endif
