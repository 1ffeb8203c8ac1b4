// The activations of the fused normalization ops, by code (fastgen/ops/_activation.py ACTIVATIONS):
// 0 identity, 1 relu, 2 leaky_relu, 3 silu, 4 gelu (exact), 5 gelu_tanh. Computed in opmath.
#pragma once
#include <c10/macros/Macros.h>
#include <cmath>

namespace fastgen {

enum Activation : int { kIdentity = 0, kRelu = 1, kLeakyRelu = 2, kSilu = 3, kGelu = 4, kGeluTanh = 5 };

template <typename T>
C10_HOST_DEVICE inline T activate(T z, int act, T slope) {
  switch (act) {
    case kRelu: return z > T(0) ? z : T(0);
    case kLeakyRelu: return z > T(0) ? z : z * slope;
    case kSilu: return z / (T(1) + ::exp(-z));
    case kGelu: return T(0.5) * z * (T(1) + ::erf(z * T(0.70710678118654752440)));
    case kGeluTanh: {
      const T u = T(0.79788456080286535588) * (z + T(0.044715) * z * z * z);
      return T(0.5) * z * (T(1) + ::tanh(u));
    }
    default: return z;
  }
}

}  // namespace fastgen
