// Bias + activation + gain + clamp on CUDA: the "cuda" backend of fastgen::bias_act.
//
// In PyTorch:
//   y = (act(x + b.view(shape along dim)) * gain).clamp(-clamp, clamp)
// x is dense and seen in memory order as (outer, C, inner) with b along C: element i has bias
// b[(i / inner) % C]. One thread per element in a grid-stride loop, int64 indices; one read and one
// write, math in opmath (fp32 for fp16/bf16).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bias_act.h"
#include "index.cuh"

namespace {

constexpr int kThreads = 256;

// grad == nullptr: y = f(x + b); else y = grad * f'(x + b) (a first-order backward).
template <typename scalar_t>
__global__ void bias_act_kernel(const scalar_t* __restrict__ x,     // (outer, C, inner) dense
                                const scalar_t* __restrict__ grad,  // like x, or nullptr
                                const scalar_t* __restrict__ b,     // (C,) or nullptr
                                scalar_t* __restrict__ y,           // like x
                                int64_t numel, int64_t C, int64_t inner, int act, double alpha, double gain,
                                double clamp, bool small) {  // small: numel < 2^31 (index.cuh)
  using T = at::opmath_type<scalar_t>;
  const T a = static_cast<T>(alpha), g = static_cast<T>(gain), cl = static_cast<T>(clamp);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    T z = static_cast<T>(x[i]);
    if (b) z += static_cast<T>(b[fastgen::imod(fastgen::idiv(i, inner, small), C, small)]);
    y[i] = static_cast<scalar_t>(grad ? static_cast<T>(grad[i]) * fastgen::bias_act_grad_value<T>(z, act, a, g, cl)
                                      : fastgen::bias_act_value<T>(z, act, a, g, cl));
  }
}

at::Tensor run(const at::Tensor& x, const at::Tensor& grad, const std::optional<at::Tensor>& b, int64_t outer,
               int64_t C, int64_t inner, int64_t act, double alpha, double gain, double clamp) {
  TORCH_CHECK(x.is_cuda() && outer * C * inner == x.numel(), "bias_act: x must be CUDA, outer * C * inner its numel");
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "bias_act: x must be dense");
  TORCH_CHECK(!b.has_value() || (b->numel() == C && b->scalar_type() == x.scalar_type()), "bias_act: b must be (C,)");
  TORCH_CHECK(!grad.defined() || (grad.sizes() == x.sizes() && grad.strides() == x.strides() &&
                                  grad.scalar_type() == x.scalar_type()),
              "bias_act: grad must have x's shape, strides and dtype");
  const at::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const at::Tensor bc = b.has_value() ? b->contiguous() : at::Tensor();
  const int64_t blocks = std::min<int64_t>((x.numel() + kThreads - 1) / kThreads, 65535 * 8);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act_cuda", [&] {
    bias_act_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), grad.defined() ? grad.const_data_ptr<scalar_t>() : nullptr,
        bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(), x.numel(), C, inner,
        static_cast<int>(act), alpha, gain, clamp, fastgen::small_indices(x.numel()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor bias_act_cuda(const at::Tensor& x, const std::optional<at::Tensor>& b, int64_t outer, int64_t C,
                         int64_t inner, int64_t act, double alpha, double gain, double clamp) {
  return run(x, at::Tensor(), b, outer, C, inner, act, alpha, gain, clamp);
}

at::Tensor bias_act_grad_cuda(const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& b,
                              int64_t outer, int64_t C, int64_t inner, int64_t act, double alpha, double gain,
                              double clamp) {
  return run(x, grad, b, outer, C, inner, act, alpha, gain, clamp);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CUDA, m) {
  m.impl("_bias_act_fused", &bias_act_cuda);
  m.impl("_bias_act_grad_fused", &bias_act_grad_cuda);
}
