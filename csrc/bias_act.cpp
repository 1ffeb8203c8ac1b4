// Bias + activation + gain + clamp on the CPU: the "cpu" backend of fastgen::bias_act, and the
// schema of the kernel op that the "cpu" and "cuda" backends call.
//
// In PyTorch:
//   y = (act(x + b.view(shape along dim)) * gain).clamp(-clamp, clamp)
// x is dense and seen in memory order as (outer, C, inner), b along C (the Python side computes the
// three sizes from dim and the memory format). One read and one write; vectorized for float.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "bias_act.h"

TORCH_LIBRARY_FRAGMENT(fastgen, m) {
  m.def(
      "_bias_act_fused(Tensor x, Tensor? b, int outer, int C, int inner, int act, float alpha, float gain, "
      "float clamp) -> Tensor");
  // grad * dy/dx, from x and b (z recomputed), for a first-order backward: one pass
  m.def(
      "_bias_act_grad_fused(Tensor grad, Tensor x, Tensor? b, int outer, int C, int inner, int act, float alpha, "
      "float gain, float clamp) -> Tensor");
}

namespace {

using fastgen::cpu::Vec;

template <int ACT>
inline Vec bias_act_vec(Vec z, Vec alpha, Vec gain, float clamp) {
  Vec y = fastgen::cpu::activate_vec<ACT>(z, alpha) * gain;
  if (clamp >= 0.f) y = at::vec::clamp(y, Vec(-clamp), Vec(clamp));
  return y;
}

template <int ACT>
inline Vec bias_act_grad_vec(Vec z, Vec alpha, Vec gain, float clamp) {
  const Vec d = fastgen::cpu::activate_grad_vec<ACT>(z, alpha) * gain;
  if (clamp < 0.f) return d;
  const Vec y = fastgen::cpu::activate_vec<ACT>(z, alpha) * gain;
  return Vec::blendv(Vec(0.f), d, (y >= Vec(-clamp)) & (y <= Vec(clamp)));
}

// y[i] = f(x[i] + bias), over len values; bias one scalar (inner > 1) or one per value (inner == 1).
// grad == nullptr: y[i] = f(x[i] + bias); else y[i] = grad[i] * f'(x[i] + bias).
template <typename scalar_t, int ACT, bool kPerValue>
void bias_act_span(const scalar_t* x, const scalar_t* grad, scalar_t* y, int64_t len, const scalar_t* b, double alpha,
                   double gain, double clamp) {
  using opmath_t = at::opmath_type<scalar_t>;
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    const Vec va(static_cast<float>(alpha)), vg(static_cast<float>(gain));
    const Vec scalar_bias(b && !kPerValue ? *b : 0.f);
    const float cl = static_cast<float>(clamp);
    for (; i + Vec::size() <= len; i += Vec::size()) {
      const Vec z = Vec::loadu(x + i) + (kPerValue && b ? Vec::loadu(b + i) : scalar_bias);
      if (grad)
        (Vec::loadu(grad + i) * bias_act_grad_vec<ACT>(z, va, vg, cl)).store(y + i);
      else
        bias_act_vec<ACT>(z, va, vg, cl).store(y + i);
    }
  }
  const opmath_t a = static_cast<opmath_t>(alpha), g = static_cast<opmath_t>(gain), cl = static_cast<opmath_t>(clamp);
  for (; i < len; ++i) {
    const opmath_t z = static_cast<opmath_t>(x[i]) + (b ? static_cast<opmath_t>(kPerValue ? b[i] : *b) : opmath_t(0));
    y[i] = static_cast<scalar_t>(grad ? static_cast<opmath_t>(grad[i]) * fastgen::bias_act_grad_value<opmath_t>(z, ACT, a, g, cl)
                                      : fastgen::bias_act_value<opmath_t>(z, ACT, a, g, cl));
  }
}

template <typename scalar_t, int ACT>
void bias_act_kernel(const scalar_t* x, const scalar_t* grad, const scalar_t* b, scalar_t* y, int64_t outer,
                     int64_t C, int64_t inner, double alpha, double gain, double clamp) {
  constexpr int64_t kGrain = 32768;  // values per task: OpenMP's start-up is not worth less
  if (inner == 1) {  // rows of C values, one bias per value (channels_last, or no bias with C = 1)
    const int64_t rows_per_task = std::max<int64_t>(1, kGrain / C);
    at::parallel_for(0, outer, rows_per_task, [&](int64_t r0, int64_t r1) {
      if (C == 1 && !b) {  // no bias: one flat span
        bias_act_span<scalar_t, ACT, false>(x + r0, grad ? grad + r0 : nullptr, y + r0, r1 - r0, nullptr, alpha, gain,
                                            clamp);
        return;
      }
      for (int64_t r = r0; r < r1; ++r)
        bias_act_span<scalar_t, ACT, true>(x + r * C, grad ? grad + r * C : nullptr, y + r * C, C, b, alpha, gain, clamp);
    });
    return;
  }
  // rows of inner values sharing one bias (NCHW along channels)
  at::parallel_for(0, outer * C, std::max<int64_t>(1, kGrain / inner), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      bias_act_span<scalar_t, ACT, false>(x + r * inner, grad ? grad + r * inner : nullptr, y + r * inner, inner,
                                          b ? b + r % C : nullptr, alpha, gain, clamp);
  });
}

void check_args(const at::Tensor& x, const std::optional<at::Tensor>& b, int64_t outer, int64_t C, int64_t inner,
                int64_t act) {
  TORCH_CHECK(outer * C * inner == x.numel(), "bias_act: outer * C * inner must be x.numel()");
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "bias_act: x must be dense");
  TORCH_CHECK(!b.has_value() || (b->numel() == C && b->scalar_type() == x.scalar_type()), "bias_act: b must be (C,)");
  TORCH_CHECK(act >= 0 && act < fastgen::kNumActivations, "bias_act: unknown activation code ", act);
}

at::Tensor run(const at::Tensor& x, const at::Tensor& grad, const std::optional<at::Tensor>& b, int64_t outer,
               int64_t C, int64_t inner, int64_t act, double alpha, double gain, double clamp) {
  at::Tensor y = at::empty_like(x);  // x's dense strides: the same memory order
  if (x.numel() == 0) return y;
  const at::Tensor bc = b.has_value() ? b->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act_cpu", [&] {
    fastgen::cpu::with_activation(act, [&](auto a) {
      bias_act_kernel<scalar_t, decltype(a)::value>(
          x.const_data_ptr<scalar_t>(), grad.defined() ? grad.const_data_ptr<scalar_t>() : nullptr,
          bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(), outer, C, inner,
          alpha, gain, clamp);
    });
  });
  return y;
}

at::Tensor bias_act_cpu(const at::Tensor& x, const std::optional<at::Tensor>& b, int64_t outer, int64_t C,
                        int64_t inner, int64_t act, double alpha, double gain, double clamp) {
  check_args(x, b, outer, C, inner, act);
  return run(x, at::Tensor(), b, outer, C, inner, act, alpha, gain, clamp);
}

at::Tensor bias_act_grad_cpu(const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& b,
                             int64_t outer, int64_t C, int64_t inner, int64_t act, double alpha, double gain,
                             double clamp) {
  check_args(x, b, outer, C, inner, act);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.strides() == x.strides() && grad.scalar_type() == x.scalar_type(),
              "bias_act: grad must have x's shape, strides and dtype");
  return run(x, grad, b, outer, C, inner, act, alpha, gain, clamp);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("_bias_act_fused", &bias_act_cpu);
  m.impl("_bias_act_grad_fused", &bias_act_grad_cpu);
}
