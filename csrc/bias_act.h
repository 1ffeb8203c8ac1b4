// The activations of fastgen::bias_act by code (fastgen/ops/bias_act.py BIAS_ACTS, in order), and the
// whole elementwise map y = clamp(act(x + b) * gain, -clamp, clamp) (clamp < 0: none), in opmath.
#pragma once
#include <c10/macros/Macros.h>
#include <cmath>

namespace fastgen {

enum BiasAct : int {
  kLinear = 0, kBaRelu = 1, kLrelu = 2, kTanh = 3, kSigmoid = 4, kElu = 5, kSelu = 6, kSoftplus = 7, kSwish = 8
};
constexpr double kSeluAlpha = 1.6732632423543772848170429916717;
constexpr double kSeluScale = 1.0507009873554804934193349852946;
constexpr double kSoftplusThreshold = 20.0;  // F.softplus: above it, softplus(z) = z

template <typename T>
C10_HOST_DEVICE inline T bias_act_value(T z, int act, T alpha, T gain, T clamp) {
  T y;
  switch (act) {
    case kBaRelu: y = z > T(0) ? z : T(0); break;
    case kLrelu: y = z > T(0) ? z : z * alpha; break;
    case kTanh: y = ::tanh(z); break;
    case kSigmoid: y = T(1) / (T(1) + ::exp(-z)); break;
    case kElu: y = z > T(0) ? z : ::expm1(z); break;
    case kSelu: y = T(kSeluScale) * (z > T(0) ? z : T(kSeluAlpha) * ::expm1(z)); break;
    case kSoftplus: y = z > T(kSoftplusThreshold) ? z : ::log1p(::exp(z)); break;
    case kSwish: y = z / (T(1) + ::exp(-z)); break;
    default: y = z;
  }
  y = y * gain;
  if (clamp >= T(0)) y = y > clamp ? clamp : (y < -clamp ? -clamp : y);
  return y;
}

// d y / d x for the same map at z = x + b: gain * act'(z), 0 where the clamp cut y (torch.clamp's
// gradient passes -clamp <= y <= clamp). At the kinks, torch's one-sided choices (0 -> left).
template <typename T>
C10_HOST_DEVICE inline T bias_act_grad_value(T z, int act, T alpha, T gain, T clamp) {
  if (clamp >= T(0)) {
    const T y = bias_act_value<T>(z, act, alpha, gain, T(-1));
    if (y < -clamp || y > clamp) return T(0);
  }
  T d;
  switch (act) {
    case kBaRelu: d = z > T(0) ? T(1) : T(0); break;
    case kLrelu: d = z > T(0) ? T(1) : alpha; break;
    case kTanh: { const T t = ::tanh(z); d = T(1) - t * t; break; }
    case kSigmoid: { const T s = T(1) / (T(1) + ::exp(-z)); d = s * (T(1) - s); break; }
    case kElu: d = z > T(0) ? T(1) : ::exp(z); break;
    case kSelu: d = T(kSeluScale) * (z > T(0) ? T(1) : T(kSeluAlpha) * ::exp(z)); break;
    case kSoftplus: d = z > T(kSoftplusThreshold) ? T(1) : T(1) / (T(1) + ::exp(-z)); break;
    case kSwish: { const T s = T(1) / (T(1) + ::exp(-z)); d = s * (T(1) + z * (T(1) - s)); break; }
    default: d = T(1);
  }
  return d * gain;
}

}  // namespace fastgen
