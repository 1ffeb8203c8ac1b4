// BatchNorm + activation on the CPU: the "cpu" backend of fastgen::batch_norm_act, and the schema of
// its kernel op.
//
// In PyTorch:
//   y = act(F.batch_norm(x, mean, var, weight, bias, training, eps=eps))
// training: per-channel statistics over (N, *) by shifted sums (K = the channel's first value;
// float within a block, double across blocks), returned as (mean, biased var) for the caller's
// running-statistics update; otherwise the given mean and var. Then one pass writing
// act((x - mean_c) * a_c + bias_c), a_c = weight_c / sqrt(var_c + eps).
// Backward (_batch_norm_act_backward): from the statistics the forward used, norm_cpu.h's two passes
// per channel (the statistics' terms only when they were taken of x, in training).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "layout.h"

#include <vector>

#include "norm_cpu.h"

TORCH_LIBRARY_FRAGMENT(fastgen, m) {
  m.def(
      "_batch_norm_act_fused(Tensor x, Tensor? weight, Tensor? bias, Tensor? mean, Tensor? var, "
      "bool training, float eps, int activation, float negative_slope) -> (Tensor, Tensor, Tensor)");
  // dx (empty unless need_x), dgamma = sum(gz * xhat) and dbeta = sum(gz) per channel in opmath
  m.def(
      "_batch_norm_act_backward(Tensor grad, Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, "
      "bool training, float eps, int activation, float negative_slope, bool need_x) -> (Tensor, Tensor, Tensor)");
}

namespace {

using namespace fastgen::cpu;

template <typename scalar_t, int ACT>
void batch_norm_act_kernel(const at::Tensor& x, at::Tensor& out, const at::Tensor& weight, const at::Tensor& bias,
                           at::Tensor& mean, at::Tensor& var, bool training, double eps, double slope,
                           bool channels_last) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / (N * C);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = out.mutable_data_ptr<scalar_t>();
  opmath_t* mp = mean.mutable_data_ptr<opmath_t>();
  opmath_t* vp = var.mutable_data_ptr<opmath_t>();

  if (training) {
    // K_c: channel c's first value. NCHW (n, c, l) at (n*C + c)*L + l; channels_last at (n*L + l)*C + c.
    std::vector<opmath_t> k(C);
    for (int64_t c = 0; c < C; ++c) k[c] = static_cast<opmath_t>(xp[channels_last ? c : c * L]);
    std::vector<double> t1(C, 0.0), t2(C, 0.0);
    if (!channels_last) {
      at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c)
          for (int64_t n = 0; n < N; ++n) shifted_sums(xp + (n * C + c) * L, L, k[c], t1[c], t2[c]);
      });
    } else {
      const int64_t rows = N * L, per_task = std::clamp<int64_t>(32768 / C, 1, kBlock);
      const int64_t tasks = (rows + per_task - 1) / per_task;
      std::vector<opmath_t> p1(tasks * C), p2(tasks * C);
      at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t r0 = t * per_task, r1 = std::min(rows, r0 + per_task);
          shifted_sums_rows(xp + r0 * C, r1 - r0, C, k.data(), p1.data() + t * C, p2.data() + t * C);
        }
      });
      for (int64_t t = 0; t < tasks; ++t)
        for (int64_t c = 0; c < C; ++c) {
          t1[c] += p1[t * C + c];
          t2[c] += p2[t * C + c];
        }
    }
    const double count = static_cast<double>(N * L);
    for (int64_t c = 0; c < C; ++c) {
      const double m1 = t1[c] / count;
      mp[c] = static_cast<opmath_t>(k[c] + m1);
      vp[c] = static_cast<opmath_t>(std::max(t2[c] / count - m1 * m1, 0.0));
    }
  }

  std::vector<opmath_t> a(C), b(C);
  const scalar_t* wp = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  for (int64_t c = 0; c < C; ++c) {
    a[c] = static_cast<opmath_t>((wp ? static_cast<double>(wp[c]) : 1.0) / std::sqrt(static_cast<double>(vp[c]) + eps));
    b[c] = static_cast<opmath_t>(bp ? static_cast<double>(bp[c]) : 0.0);
  }
  if (!channels_last) {
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc)
        apply_span<scalar_t, ACT, false>(xp + nc * L, yp + nc * L, L, &mp[nc % C], &a[nc % C], &b[nc % C], slope);
    });
  } else {
    at::parallel_for(0, N * L, std::max<int64_t>(1, 4096 / C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) apply_span<scalar_t, ACT, true>(xp + r * C, yp + r * C, C, mp, a.data(), b.data(), slope);
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var, bool training, double eps,
    int64_t activation, double negative_slope) {
  TORCH_CHECK(x_in.dim() >= 2, "x must be (N, C, *)");
  TORCH_CHECK(training || (mean.has_value() && var.has_value()), "mean and var are needed when not training");
  TORCH_CHECK(activation >= 0 && activation < fastgen::kNumActivations, "unknown activation code ", activation);
  const bool channels_last = fastgen::is_channels_last(x_in);
  const at::Tensor x = fastgen::dense(x_in);
  at::Tensor out = at::empty_like(x, fastgen::output_format(x));
  const auto opmath = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t C = x.size(1);
  at::Tensor m = training ? at::empty({C}, x.options().dtype(opmath)) : mean->to(opmath).contiguous().clone();
  at::Tensor v = training ? at::empty({C}, x.options().dtype(opmath)) : var->to(opmath).contiguous().clone();
  if (x.numel() == 0) return {out, m.fill_(NAN), v.fill_(NAN)};
  const at::Tensor w = fastgen::contiguous_or_undefined(weight), b = fastgen::contiguous_or_undefined(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_cpu", [&] {
    with_activation(activation, [&](auto act) {
      batch_norm_act_kernel<scalar_t, decltype(act)::value>(x, out, w, b, m, v, training, eps,
                                                            negative_slope, channels_last);
    });
  });
  return {out, m, v};
}

template <typename scalar_t, int ACT>
void batch_norm_act_backward_kernel(const at::Tensor& dy_t, const at::Tensor& x, at::Tensor& dx_t, const at::Tensor& mean,
                                    const at::Tensor& var, const at::Tensor& weight, const at::Tensor& bias, bool training,
                                    double eps, double slope, bool channels_last, at::Tensor& dgamma_t,
                                    at::Tensor& dbeta_t) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / (N * C);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* dy = dy_t.const_data_ptr<scalar_t>();
  scalar_t* dx = dx_t.defined() ? dx_t.mutable_data_ptr<scalar_t>() : nullptr;
  opmath_t* dgamma = dgamma_t.mutable_data_ptr<opmath_t>();
  opmath_t* dbeta = dbeta_t.mutable_data_ptr<opmath_t>();
  const scalar_t* wp = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  // the forward's coefficients (as batch_norm_act_kernel forms them)
  const opmath_t* mp = mean.const_data_ptr<opmath_t>();
  const opmath_t* vp = var.const_data_ptr<opmath_t>();
  std::vector<opmath_t> m(mp, mp + C), r(C), a(C), b(C);
  for (int64_t c = 0; c < C; ++c) {
    const double rstd = 1.0 / std::sqrt(static_cast<double>(vp[c]) + eps);
    r[c] = static_cast<opmath_t>(rstd);
    a[c] = static_cast<opmath_t>((wp ? static_cast<double>(wp[c]) : 1.0) * rstd);
    b[c] = static_cast<opmath_t>(bp ? static_cast<double>(bp[c]) : 0.0);
  }
  if (channels_last) {
    norm_act_backward_rows<scalar_t, ACT>(xp, dy, dx, 1, N * L, C, 1, m.data(), a.data(), b.data(), r.data(), training,
                                          slope, dgamma, dbeta);
    return;
  }
  // NCHW: a channel is N spans of L; both passes per channel while its spans are in cache
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double t1 = 0, t2 = 0;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = (n * C + c) * L;
        grad_sums<scalar_t, ACT>(xp + o, dy + o, dx ? dx + o : nullptr, L, m[c], a[c], b[c], slope, t1, t2);
      }
      dbeta[c] = static_cast<opmath_t>(t1);
      dgamma[c] = static_cast<opmath_t>(t2 * static_cast<double>(r[c]));
      if (dx == nullptr) continue;
      const double count = static_cast<double>(N * L), rc = r[c], ac = a[c];
      const opmath_t p = training ? static_cast<opmath_t>(-rc * rc * ac * t2 / count) : opmath_t(0);
      const opmath_t q = training ? static_cast<opmath_t>(-ac * t1 / count) : opmath_t(0);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = (n * C + c) * L;
        grad_input_span<scalar_t, ACT, false>(xp + o, dy + o, dx + o, L, &m[c], &a[c], &b[c], &p, &q, slope);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, bool training, double eps,
    int64_t activation, double negative_slope, bool need_x) {
  TORCH_CHECK(x_in.dim() >= 2 && mean.numel() == x_in.size(1) && var.numel() == x_in.size(1),
              "x must be (N, C, *) with mean and var (C,)");
  auto [x, dy, dx, channels_last, opmath] = backward_inputs(grad, x_in, activation, need_x);
  at::Tensor dgamma = at::zeros({x.size(1)}, x.options().dtype(opmath)), dbeta = at::zeros_like(dgamma);
  if (x.numel() > 0) {
    const at::Tensor w = fastgen::contiguous_or_undefined(weight), b = fastgen::contiguous_or_undefined(bias);
    const at::Tensor m = mean.to(opmath).contiguous(), v = var.to(opmath).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_backward_cpu", [&] {
      with_activation(activation, [&](auto act) {
        batch_norm_act_backward_kernel<scalar_t, decltype(act)::value>(dy, x, dx, m, v, w, b, training, eps,
                                                                       negative_slope, channels_last, dgamma, dbeta);
      });
    });
  }
  return {need_x ? dx : at::empty({0}, x.options()), dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("_batch_norm_act_fused", &batch_norm_act_cpu);
  m.impl("_batch_norm_act_backward", &batch_norm_act_backward_cpu);
}
