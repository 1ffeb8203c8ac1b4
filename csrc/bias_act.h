// fastgen::bias_act's elementwise map y = clamp(act(x + b) * gain, -clamp, clamp) (clamp < 0: none)
// and its derivative, in opmath, on top of the shared activations (activation.h).
#pragma once
#include "activation.h"

namespace fastgen {

template <typename T>
C10_HOST_DEVICE inline T bias_act_value(T z, int act, T alpha, T gain, T clamp) {
  T y = activate<T>(z, act, alpha) * gain;
  if (clamp >= T(0)) y = y > clamp ? clamp : (y < -clamp ? -clamp : y);
  return y;
}

// d y / d x at z = x + b: gain * act'(z), 0 where the clamp cut y (torch.clamp's gradient passes
// -clamp <= y <= clamp).
template <typename T>
C10_HOST_DEVICE inline T bias_act_grad_value(T z, int act, T alpha, T gain, T clamp) {
  if (clamp >= T(0)) {
    const T y = activate<T>(z, act, alpha) * gain;
    if (y < -clamp || y > clamp) return T(0);
  }
  return activate_grad<T>(z, act, alpha) * gain;
}

}  // namespace fastgen
