// GroupNorm + activation on the CPU: the "cpu" backend of fastgen::group_norm_act, and the schema
// of the kernel op that the "cpu" and "cuda" backends call.
//
// In PyTorch:
//   y = act(F.group_norm(x, G, weight, bias, eps))          # weight, bias: (C,) or (N, C)
// in two passes over x seen as (N, C, L), NCHW (unit stride along L) or channels_last (along C):
//   1. per channel, shifted sums S1 = sum(x - K), S2 = sum((x - K)^2) with K = the group's first
//      element (float within a block, double across blocks); per group
//      mean = K + S1 / n, var = S2 / n - (S1 / n)^2: with K a sample of the group there is no
//      catastrophic cancellation, unlike E[x^2] - E[x]^2.
//   2. y = act((x - mean) * a_c + bias_c), a_c = rstd * weight_c.
// The kernel returns y and each (sample, group)'s mean and rstd, which the backward
// (_group_norm_act_backward: norm_cpu.h's two passes) reads instead of recomputing them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "layout.h"

#include <vector>

#include "activation.h"
#include "norm_cpu.h"

TORCH_LIBRARY_FRAGMENT(fastgen, m) {
  m.def(
      "_group_norm_act_fused(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, "
      "int activation, float negative_slope) -> (Tensor, Tensor, Tensor)");
  // dx (empty unless need_x), and per (sample, channel) sum(gz * xhat) and sum(gz) in opmath,
  // gz = dy * act'(z): dgamma and dbeta before the sum over samples of a per-channel affine
  m.def(
      "_group_norm_act_backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, "
      "int activation, float negative_slope, bool need_x) -> (Tensor, Tensor, Tensor)");
}

namespace {

using namespace fastgen::cpu;

template <typename scalar_t, int ACT>
void group_norm_act_kernel(const at::Tensor& x, at::Tensor& out, int64_t G, const at::Tensor& weight,
                           const at::Tensor& bias, double eps, double slope, bool channels_last,
                           at::Tensor& mean_out, at::Tensor& rstd_out) {
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / (N * C), CG = C / G;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = out.mutable_data_ptr<scalar_t>();
  using opmath_t = at::opmath_type<scalar_t>;
  opmath_t* saved_mean = mean_out.mutable_data_ptr<opmath_t>();
  opmath_t* saved_rstd = rstd_out.mutable_data_ptr<opmath_t>();
  // element (n, c, l): NCHW n*C*L + c*L + l; channels_last n*L*C + l*C + c
  const int64_t sc = channels_last ? 1 : L;
  auto shift = [&](int64_t n, int64_t g) { return static_cast<opmath_t>(xp[n * C * L + g * CG * sc]); };

  const int64_t swn = weight.defined() && weight.dim() == 2 ? C : 0;
  const int64_t sbn = bias.defined() && bias.dim() == 2 ? C : 0;
  const scalar_t* wp = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  // from a group's shifted sums to its channels' m = mean, a = rstd * w and b = bias
  auto coefficients = [&](int64_t n, int64_t g, double t1, double t2, opmath_t* m, opmath_t* a, opmath_t* b) {
    const double count = static_cast<double>(CG * L), m1 = t1 / count;
    const double mean = static_cast<double>(shift(n, g)) + m1;
    const double rstd = 1.0 / std::sqrt(std::max(t2 / count - m1 * m1, 0.0) + eps);
    saved_mean[n * G + g] = static_cast<opmath_t>(mean);
    saved_rstd[n * G + g] = static_cast<opmath_t>(rstd);
    for (int64_t c = g * CG; c < (g + 1) * CG; ++c) {
      m[c - g * CG] = static_cast<opmath_t>(mean);
      a[c - g * CG] = static_cast<opmath_t>(rstd * (wp ? static_cast<double>(wp[n * swn + c]) : 1.0));
      b[c - g * CG] = static_cast<opmath_t>(bp ? static_cast<double>(bp[n * sbn + c]) : 0.0);
    }
  };

  if (!channels_last) {
    // A group is CG contiguous rows of L: statistics then output while it is still in cache.
    at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> m(CG), a(CG), b(CG);
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t n = ng / G, g = ng % G;
        const scalar_t* rows = xp + ng * CG * L;
        double t1 = 0, t2 = 0;
        for (int64_t c = 0; c < CG; ++c) shifted_sums(rows + c * L, L, shift(n, g), t1, t2);
        coefficients(n, g, t1, t2, m.data(), a.data(), b.data());
        for (int64_t c = 0; c < CG; ++c)
          apply_span<scalar_t, ACT, false>(rows + c * L, yp + ng * CG * L + c * L, L, &m[c], &a[c], &b[c], slope);
      }
    });
    return;
  }

  // channels_last: rows of C channels. 1. each task sums a run of rows of one sample into its
  // own per-channel accumulators; 2. per group coefficients; 3. y = act((x - m) * a + b) row by row.
  const int64_t rows_per_task = std::clamp<int64_t>(32768 / C, 1, kBlock);
  const int64_t tasks_per_n = (L + rows_per_task - 1) / rows_per_task;
  std::vector<opmath_t> p1(N * tasks_per_n * C), p2(N * tasks_per_n * C);
  at::parallel_for(0, N * tasks_per_n, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> k(C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tasks_per_n, l0 = (t % tasks_per_n) * rows_per_task;
      const int64_t l1 = std::min(L, l0 + rows_per_task);
      for (int64_t c = 0; c < C; ++c) k[c] = shift(n, c / CG);
      opmath_t* a1 = p1.data() + t * C;
      opmath_t* a2 = p2.data() + t * C;
      shifted_sums_rows(xp + (n * L + l0) * C, l1 - l0, C, k.data(), a1, a2);
    }
  });
  std::vector<opmath_t> m(N * C), a(N * C), b(N * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      double t1 = 0, t2 = 0;
      for (int64_t t = n * tasks_per_n; t < (n + 1) * tasks_per_n; ++t)
        for (int64_t c = g * CG; c < (g + 1) * CG; ++c) {
          t1 += p1[t * C + c];
          t2 += p2[t * C + c];
        }
      coefficients(n, g, t1, t2, &m[n * C + g * CG], &a[n * C + g * CG], &b[n * C + g * CG]);
    }
  at::parallel_for(0, N * L, std::max<int64_t>(1, 4096 / C), [&](int64_t begin, int64_t end) {
    for (int64_t nl = begin; nl < end; ++nl) {
      const int64_t n = nl / L;
      apply_span<scalar_t, ACT, true>(xp + nl * C, yp + nl * C, C, &m[n * C], &a[n * C], &b[n * C], slope);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cpu(
    const at::Tensor& x_in, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, int64_t activation, double negative_slope) {
  TORCH_CHECK(x_in.dim() >= 2 && x_in.size(1) % num_groups == 0, "x must be (N, C, *) with C divisible by num_groups");
  TORCH_CHECK(activation >= 0 && activation < fastgen::kNumActivations, "unknown activation code ", activation);
  const bool channels_last = fastgen::is_channels_last(x_in);
  const at::Tensor x = fastgen::dense(x_in);
  at::Tensor out = at::empty_like(x, fastgen::output_format(x));
  const auto opmath = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({x.size(0), num_groups}, x.options().dtype(opmath)), rstd = at::empty_like(mean);
  if (x.numel() == 0) return {out, mean, rstd};
  const at::Tensor w = fastgen::contiguous_or_undefined(weight), b = fastgen::contiguous_or_undefined(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_act_cpu", [&] {
    fastgen::cpu::with_activation(activation, [&](auto act) {
      group_norm_act_kernel<scalar_t, decltype(act)::value>(x, out, num_groups, w, b, eps,
                                                            negative_slope, channels_last, mean, rstd);
    });
  });
  return {out, mean, rstd};
}

// ---------------------------------------------------------------------------------------------
// backward: gz = dy * act'(z) from the saved statistics; per channel sum(gz) and sum(gz * (x - mean)),
// per group their weighted sums, then dx (norm_cpu.h). NCHW: a group's CG rows of L, both passes
// while it is in cache; channels_last: norm_act_backward_rows with a segment per sample.

template <typename scalar_t, int ACT>
void group_norm_act_backward_kernel(const at::Tensor& dy_t, const at::Tensor& x, at::Tensor& dx_t, const at::Tensor& mean,
                                    const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& bias, double slope,
                                    bool channels_last, at::Tensor& dgamma_t, at::Tensor& dbeta_t) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / (N * C), G = mean.size(1), CG = C / G;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* dy = dy_t.const_data_ptr<scalar_t>();
  scalar_t* dx = dx_t.defined() ? dx_t.mutable_data_ptr<scalar_t>() : nullptr;
  const opmath_t* mp = mean.const_data_ptr<opmath_t>();
  const opmath_t* rp = rstd.const_data_ptr<opmath_t>();
  opmath_t* dgamma = dgamma_t.mutable_data_ptr<opmath_t>();
  opmath_t* dbeta = dbeta_t.mutable_data_ptr<opmath_t>();
  const int64_t swn = weight.defined() && weight.dim() == 2 ? C : 0;
  const int64_t sbn = bias.defined() && bias.dim() == 2 ? C : 0;
  const scalar_t* wp = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  // the forward's per-channel coefficients: a = rstd * w, b
  auto coefficient_a = [&](int64_t n, int64_t c) {
    return static_cast<opmath_t>(static_cast<double>(rp[n * G + c / CG]) * (wp ? static_cast<double>(wp[n * swn + c]) : 1.0));
  };
  auto coefficient_b = [&](int64_t n, int64_t c) { return bp ? static_cast<opmath_t>(bp[n * sbn + c]) : opmath_t(0); };

  if (channels_last) {
    std::vector<opmath_t> m(N * C), a(N * C), b(N * C);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        m[n * C + c] = mp[n * G + c / CG];
        a[n * C + c] = coefficient_a(n, c);
        b[n * C + c] = coefficient_b(n, c);
      }
    norm_act_backward_rows<scalar_t, ACT>(xp, dy, dx, N, L, C, CG, m.data(), a.data(), b.data(), rp, true, slope,
                                          dgamma, dbeta);
    return;
  }
  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> a(CG), b(CG);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / G, c0 = (ng % G) * CG, base = ng * CG * L;
      const opmath_t m = mp[ng];
      const double r = static_cast<double>(rp[ng]);
      double s1 = 0, s2 = 0;
      for (int64_t j = 0; j < CG; ++j) {
        a[j] = coefficient_a(n, c0 + j);
        b[j] = coefficient_b(n, c0 + j);
        double t1 = 0, t2 = 0;
        grad_sums<scalar_t, ACT>(xp + base + j * L, dy + base + j * L, dx ? dx + base + j * L : nullptr, L, m, a[j],
                                 b[j], slope, t1, t2);
        dbeta[n * C + c0 + j] = static_cast<opmath_t>(t1);
        dgamma[n * C + c0 + j] = static_cast<opmath_t>(t2 * r);
        s1 += static_cast<double>(a[j]) * t1;
        s2 += static_cast<double>(a[j]) * t2;
      }
      if (dx == nullptr) continue;
      const double count = static_cast<double>(CG * L);
      const opmath_t p = static_cast<opmath_t>(-r * r * s2 / count), q = static_cast<opmath_t>(-s1 / count);
      for (int64_t j = 0; j < CG; ++j)
        grad_input_span<scalar_t, ACT, false>(xp + base + j * L, dy + base + j * L, dx + base + j * L, L, &m, &a[j],
                                              &b[j], &p, &q, slope);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t activation,
    double negative_slope, bool need_x) {
  TORCH_CHECK(x_in.dim() >= 2 && mean.dim() == 2 && mean.size(0) == x_in.size(0) && x_in.size(1) % mean.size(1) == 0,
              "x must be (N, C, *) and mean (N, G) with G dividing C");
  auto [x, dy, dx, channels_last, opmath] = backward_inputs(grad, x_in, activation, need_x);
  at::Tensor dgamma = at::zeros({x.size(0), x.size(1)}, x.options().dtype(opmath)), dbeta = at::zeros_like(dgamma);
  if (x.numel() > 0) {
    const at::Tensor w = fastgen::contiguous_or_undefined(weight), b = fastgen::contiguous_or_undefined(bias);
    const at::Tensor m = mean.contiguous(), r = rstd.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_act_backward_cpu", [&] {
      TORCH_CHECK(m.scalar_type() == opmath && r.scalar_type() == opmath, "mean and rstd must be in opmath");
      with_activation(activation, [&](auto act) {
        group_norm_act_backward_kernel<scalar_t, decltype(act)::value>(dy, x, dx, m, r, w, b, negative_slope,
                                                                       channels_last, dgamma, dbeta);
      });
    });
  }
  return {need_x ? dx : at::empty({0}, x.options()), dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("_group_norm_act_fused", &group_norm_act_cpu);
  m.impl("_group_norm_act_backward", &group_norm_act_backward_cpu);
}
