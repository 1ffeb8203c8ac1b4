// fastgen::rms_norm_act on the CPU: a channel RMS norm, its affine and an activation in one read
// and one write of x (eager: five to seven passes).
//
//   ms = (x * x).mean(1, keepdim=True)                       per sample and position
//   r  = 1 / sqrt(ms + eps)            (clamp: 1 / max(sqrt(ms), eps), F.normalize's form)
//   y  = act(x * r * weight[c] + bias[c])
//
// x is seen as (N, C, L): NCHW / NCTHW (unit stride along L) or channels-last (along C). NCHW: a
// tile of positions accumulates its squares channel row by channel row (vectorized along L), then
// the same rows are normalized while they are in cache. Channels-last: each row of C values is
// reduced and written at once. Returns y and r (N, L) in opmath for the fused backward below.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "activation.h"
#include "layout.h"

namespace {

using fastgen::cpu::Vec;

constexpr int64_t kTile = 256;  // positions per NCHW task: 256 sums and C rows of 1 KB stay in L2

template <typename opmath_t>
inline opmath_t inverse_rms(opmath_t mean_square, opmath_t eps, bool clamp) {
  return clamp ? opmath_t(1) / std::max(std::sqrt(mean_square), eps) : opmath_t(1) / std::sqrt(mean_square + eps);
}

// y[i] = act(x[i] * r * a + b) over len values.
template <typename scalar_t, int ACT, bool kRowScale>
void normalize_span(const scalar_t* x, scalar_t* y, int64_t len, const at::opmath_type<scalar_t>* r,
                    const at::opmath_type<scalar_t>* a, const at::opmath_type<scalar_t>* b,
                    at::opmath_type<scalar_t> a1, at::opmath_type<scalar_t> b1, double slope) {
  using opmath_t = at::opmath_type<scalar_t>;
  // kRowScale: one r for the span, a[i] and b[i] per value (a channels-last row); else r[i] per value
  // and one a1, b1 (a channel's run of positions, NCHW)
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    const Vec vs(static_cast<float>(slope));
    for (; i + Vec::size() <= len; i += Vec::size()) {
      const Vec vx = Vec::loadu(x + i);
      const Vec z = kRowScale ? at::vec::fmadd(vx * Vec(*r), Vec::loadu(a + i), Vec::loadu(b + i))
                              : at::vec::fmadd(vx * Vec::loadu(r + i), Vec(a1), Vec(b1));
      fastgen::cpu::activate_vec<ACT>(z, vs).store(y + i);
    }
  }
  for (; i < len; ++i) {
    const opmath_t xr = static_cast<opmath_t>(x[i]) * (kRowScale ? *r : r[i]);
    const opmath_t z = kRowScale ? xr * a[i] + b[i] : xr * a1 + b1;
    y[i] = static_cast<scalar_t>(fastgen::activate<opmath_t>(z, ACT, static_cast<opmath_t>(slope)));
  }
}

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
opmath_t sum_of_squares(const scalar_t* x, int64_t len) {
  int64_t i = 0;
  opmath_t s = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    Vec v(0.f);
    for (; i + Vec::size() <= len; i += Vec::size()) {
      const Vec vx = Vec::loadu(x + i);
      v = at::vec::fmadd(vx, vx, v);
    }
    alignas(64) float lanes[Vec::size()];
    v.store(lanes);
    for (int j = 0; j < Vec::size(); ++j) s += lanes[j];
  }
  for (; i < len; ++i) s += static_cast<opmath_t>(x[i]) * static_cast<opmath_t>(x[i]);
  return s;
}

// acc[i] += x[i]^2 over len values
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void add_squares(const scalar_t* x, opmath_t* acc, int64_t len) {
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + Vec::size() <= len; i += Vec::size()) {
      const Vec vx = Vec::loadu(x + i);
      at::vec::fmadd(vx, vx, Vec::loadu(acc + i)).store(acc + i);
    }
  }
  for (; i < len; ++i) acc[i] += static_cast<opmath_t>(x[i]) * static_cast<opmath_t>(x[i]);
}

template <typename scalar_t, int ACT>
void rms_norm_act_kernel(const at::Tensor& x, at::Tensor& y, const at::Tensor& w, const at::Tensor& b, double eps,
                         bool clamp, double slope, bool channels_last, at::Tensor& rstd) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / (N * C);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  opmath_t* rp = rstd.mutable_data_ptr<opmath_t>();
  // weight and bias in opmath, ones and zeros where absent
  std::vector<opmath_t> a(C, opmath_t(1)), bb(C, opmath_t(0));
  for (int64_t c = 0; c < C; ++c) {
    if (w.defined()) a[c] = static_cast<opmath_t>(w.const_data_ptr<scalar_t>()[c]);
    if (b.defined()) bb[c] = static_cast<opmath_t>(b.const_data_ptr<scalar_t>()[c]);
  }
  const opmath_t e = static_cast<opmath_t>(eps), inv_c = opmath_t(1) / static_cast<opmath_t>(C);
  if (channels_last) {
    at::parallel_for(0, N * L, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const opmath_t r = inverse_rms(sum_of_squares(xp + row * C, C) * inv_c, e, clamp);
        rp[row] = r;
        normalize_span<scalar_t, ACT, true>(xp + row * C, yp + row * C, C, &r, a.data(), bb.data(), 0, 0, slope);
      }
    });
    return;
  }
  const int64_t tiles = (L + kTile - 1) / kTile;
  at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> r(kTile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiles, l0 = (task % tiles) * kTile, len = std::min(kTile, L - l0);
      std::fill(r.begin(), r.end(), opmath_t(0));
      const scalar_t* xn = xp + n * C * L + l0;
      for (int64_t c = 0; c < C; ++c) add_squares(xn + c * L, r.data(), len);
      for (int64_t i = 0; i < len; ++i) r[i] = inverse_rms(r[i] * inv_c, e, clamp);
      std::copy(r.begin(), r.begin() + len, rp + n * L + l0);
      for (int64_t c = 0; c < C; ++c)
        normalize_span<scalar_t, ACT, false>(xn + c * L, yp + n * C * L + l0 + c * L, len, r.data(), nullptr,
                                             nullptr, a[c], bb[c], slope);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_act_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                                                    const std::optional<at::Tensor>& bias, double eps, bool clamp,
                                                    int64_t activation, double negative_slope) {
  TORCH_CHECK(x_in.dim() >= 2 && x_in.size(1) > 0, "x must be (N, C, *) with C > 0");
  TORCH_CHECK(activation >= 0 && activation < fastgen::kNumActivations, "unknown activation code ", activation);
  const bool channels_last = fastgen::is_channels_last(x_in);
  const at::Tensor x = fastgen::dense(x_in);
  at::Tensor out = at::empty_like(x, fastgen::output_format(x));
  const auto opmath = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor rstd = at::empty({N, N * C ? x.numel() / (N * C) : 0}, x.options().dtype(opmath));
  if (x.numel() == 0) return {out, rstd};
  const at::Tensor w = fastgen::contiguous_or_undefined(weight), b = fastgen::contiguous_or_undefined(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_act_cpu", [&] {
    fastgen::cpu::with_activation(activation, [&](auto act) {
      rms_norm_act_kernel<scalar_t, decltype(act)::value>(x, out, w, b, eps, clamp, negative_slope, channels_last,
                                                          rstd);
    });
  });
  return {out, rstd};
}

// ---------------------------------------------------------------------------------------------
// backward, from the forward's r: xhat = x r, z = xhat w + b, gz = dy act'(z), g = gz w;
// dw = sum gz xhat, db = sum gz (per channel, over samples and positions), and
// dx = r (g - xhat mean_c(g xhat)) (clamp: where rms <= eps, r = 1 / eps is constant: dx = r g).
// Pass 1 keeps g in a buffer and sums the projection per position; pass 2 writes dx.

// Over len values: g[i] = gz * a, and the sums s (per position) += g xhat, dw (per channel) += gz xhat,
// db += gz. kRowScale: a channels-last row (r, s one value; a, b, dw, db per value); else a channel's
// run of positions (r, s per value; a1, b1, dw, db one value).
template <typename scalar_t, int ACT, bool kRowScale>
void grad_span(const scalar_t* x, const scalar_t* dy, int64_t len, const at::opmath_type<scalar_t>* r,
               const at::opmath_type<scalar_t>* a, const at::opmath_type<scalar_t>* b, at::opmath_type<scalar_t> a1,
               at::opmath_type<scalar_t> b1, double slope, at::opmath_type<scalar_t>* g,
               at::opmath_type<scalar_t>* s, at::opmath_type<scalar_t>* dw, at::opmath_type<scalar_t>* db) {
  using opmath_t = at::opmath_type<scalar_t>;
  int64_t i = 0;
  opmath_t s_row = 0, dw_run = 0, db_run = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    const Vec vs(static_cast<float>(slope));
    Vec vs_row(0.f), vdw(0.f), vdb(0.f);
    for (; i + Vec::size() <= len; i += Vec::size()) {
      const Vec xhat = Vec::loadu(x + i) * (kRowScale ? Vec(*r) : Vec::loadu(r + i));
      const Vec va = kRowScale ? Vec::loadu(a + i) : Vec(a1);
      const Vec z = at::vec::fmadd(xhat, va, kRowScale ? Vec::loadu(b + i) : Vec(b1));
      const Vec gz = Vec::loadu(dy + i) * fastgen::cpu::activate_grad_vec<ACT>(z, vs);
      const Vec gv = gz * va;
      gv.store(g + i);
      if constexpr (kRowScale) {
        vs_row = at::vec::fmadd(gv, xhat, vs_row);
        at::vec::fmadd(gz, xhat, Vec::loadu(dw + i)).store(dw + i);
        (Vec::loadu(db + i) + gz).store(db + i);
      } else {
        at::vec::fmadd(gv, xhat, Vec::loadu(s + i)).store(s + i);
        vdw = at::vec::fmadd(gz, xhat, vdw);
        vdb = vdb + gz;
      }
    }
    alignas(64) float lanes[3][Vec::size()];
    vs_row.store(lanes[0]);
    vdw.store(lanes[1]);
    vdb.store(lanes[2]);
    for (int j = 0; j < Vec::size(); ++j) {
      s_row += lanes[0][j];
      dw_run += lanes[1][j];
      db_run += lanes[2][j];
    }
  }
  for (; i < len; ++i) {
    const opmath_t xhat = static_cast<opmath_t>(x[i]) * (kRowScale ? *r : r[i]);
    const opmath_t va = kRowScale ? a[i] : a1;
    const opmath_t z = xhat * va + (kRowScale ? b[i] : b1);
    const opmath_t gz = static_cast<opmath_t>(dy[i]) *
                        fastgen::activate_grad<opmath_t>(z, ACT, static_cast<opmath_t>(slope));
    g[i] = gz * va;
    if constexpr (kRowScale) {
      s_row += g[i] * xhat;
      dw[i] += gz * xhat;
      db[i] += gz;
    } else {
      s[i] += g[i] * xhat;
      dw_run += gz * xhat;
      db_run += gz;
    }
  }
  if constexpr (kRowScale) {
    *s += s_row;
  } else {
    *dw += dw_run;
    *db += db_run;
  }
}

// dx[i] = r (g[i] - x[i] r p) over len values; kRowScale: r and p one value, else per value.
template <typename scalar_t, bool kRowScale>
void dx_span(const scalar_t* x, const at::opmath_type<scalar_t>* g, int64_t len, const at::opmath_type<scalar_t>* r,
             const at::opmath_type<scalar_t>* p, scalar_t* dx) {
  using opmath_t = at::opmath_type<scalar_t>;
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + Vec::size() <= len; i += Vec::size()) {
      const Vec vr = kRowScale ? Vec(*r) : Vec::loadu(r + i), vp = kRowScale ? Vec(*p) : Vec::loadu(p + i);
      (vr * (Vec::loadu(g + i) - Vec::loadu(x + i) * vr * vp)).store(dx + i);
    }
  }
  for (; i < len; ++i) {
    const opmath_t ri = kRowScale ? *r : r[i], pi = kRowScale ? *p : p[i];
    dx[i] = static_cast<scalar_t>(ri * (g[i] - static_cast<opmath_t>(x[i]) * ri * pi));
  }
}

constexpr int64_t kBackwardTile = 64;  // positions per NCHW task: the C x 64 buffer of g stays in L2

template <typename scalar_t, int ACT>
void rms_norm_act_backward_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd,
                                  const at::Tensor& w, const at::Tensor& b, double eps, bool clamp, double slope,
                                  bool channels_last, at::Tensor& dx, at::Tensor& dgamma, at::Tensor& dbeta) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / (N * C);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const opmath_t* rp = rstd.const_data_ptr<opmath_t>();
  scalar_t* dxp = dx.defined() ? dx.mutable_data_ptr<scalar_t>() : nullptr;
  std::vector<opmath_t> a(C, opmath_t(1)), bb(C, opmath_t(0));
  for (int64_t c = 0; c < C; ++c) {
    if (w.defined()) a[c] = static_cast<opmath_t>(w.const_data_ptr<scalar_t>()[c]);
    if (b.defined()) bb[c] = static_cast<opmath_t>(b.const_data_ptr<scalar_t>()[c]);
  }
  const opmath_t inv_c = opmath_t(1) / static_cast<opmath_t>(C), e = static_cast<opmath_t>(eps);
  // the projection mean_c(g xhat), zero where r does not depend on x (clamp, rms <= eps)
  auto projection = [&](opmath_t sum, opmath_t r) { return clamp && r * e >= opmath_t(1) ? opmath_t(0) : sum * inv_c; };
  // per-thread sums of dw and db, added up at the end
  const int64_t threads = at::get_num_threads();
  std::vector<opmath_t> dw_t(threads * C, opmath_t(0)), db_t(threads * C, opmath_t(0));
  if (channels_last) {
    at::parallel_for(0, N * L, std::max<int64_t>(1, 8192 / C), [&](int64_t begin, int64_t end) {
      const int64_t t = at::get_thread_num();
      std::vector<opmath_t> g(C);
      for (int64_t row = begin; row < end; ++row) {
        opmath_t sum = 0;
        grad_span<scalar_t, ACT, true>(xp + row * C, dyp + row * C, C, rp + row, a.data(), bb.data(), 0, 0, slope,
                                       g.data(), &sum, &dw_t[t * C], &db_t[t * C]);
        if (dxp) {
          const opmath_t p = projection(sum, rp[row]);
          dx_span<scalar_t, true>(xp + row * C, g.data(), C, rp + row, &p, dxp + row * C);
        }
      }
    });
  } else {
    const int64_t tiles = (L + kBackwardTile - 1) / kBackwardTile;
    at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
      const int64_t t = at::get_thread_num();
      std::vector<opmath_t> g(C * kBackwardTile), sums(kBackwardTile);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / tiles, l0 = (task % tiles) * kBackwardTile, len = std::min(kBackwardTile, L - l0);
        const int64_t base = n * C * L + l0;
        const opmath_t* r = rp + n * L + l0;
        std::fill(sums.begin(), sums.end(), opmath_t(0));
        for (int64_t c = 0; c < C; ++c)
          grad_span<scalar_t, ACT, false>(xp + base + c * L, dyp + base + c * L, len, r, nullptr, nullptr, a[c],
                                          bb[c], slope, &g[c * kBackwardTile], sums.data(), &dw_t[t * C + c],
                                          &db_t[t * C + c]);
        if (!dxp) continue;
        for (int64_t i = 0; i < len; ++i) sums[i] = projection(sums[i], r[i]);
        for (int64_t c = 0; c < C; ++c)
          dx_span<scalar_t, false>(xp + base + c * L, &g[c * kBackwardTile], len, r, sums.data(), dxp + base + c * L);
      }
    });
  }
  opmath_t* dgp = dgamma.mutable_data_ptr<opmath_t>();
  opmath_t* dbp = dbeta.mutable_data_ptr<opmath_t>();
  for (int64_t c = 0; c < C; ++c) {
    opmath_t sw = 0, sb = 0;
    for (int64_t t = 0; t < threads; ++t) {
      sw += dw_t[t * C + c];
      sb += db_t[t * C + c];
    }
    dgp[c] = sw;
    dbp[c] = sb;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_act_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool clamp, int64_t activation, double negative_slope,
    bool need_x) {
  TORCH_CHECK(x_in.dim() >= 2 && grad.sizes() == x_in.sizes(), "grad and x must be (N, C, *) of one shape");
  TORCH_CHECK(activation >= 0 && activation < fastgen::kNumActivations, "unknown activation code ", activation);
  const bool channels_last = fastgen::is_channels_last(x_in);
  const at::Tensor x = fastgen::dense(x_in);
  const at::Tensor dy = grad.contiguous(fastgen::output_format(x));
  const auto opmath = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t C = x.size(1);
  TORCH_CHECK(rstd.scalar_type() == opmath && rstd.numel() * C == x.numel(), "rstd must be (N, L) in opmath");
  at::Tensor dx = need_x ? at::empty_like(x, fastgen::output_format(x)) : at::Tensor();
  at::Tensor dgamma = at::zeros({C}, x.options().dtype(opmath)), dbeta = at::zeros_like(dgamma);
  if (x.numel() > 0) {
    const at::Tensor w = fastgen::contiguous_or_undefined(weight), b = fastgen::contiguous_or_undefined(bias);
    const at::Tensor r = rstd.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_act_backward_cpu", [&] {
      fastgen::cpu::with_activation(activation, [&](auto act) {
        rms_norm_act_backward_kernel<scalar_t, decltype(act)::value>(dy, x, r, w, b, eps, clamp, negative_slope,
                                                                     channels_last, dx, dgamma, dbeta);
      });
    });
  }
  return {need_x ? dx : x.new_empty({0}), dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastgen, m) {
  m.def("_rms_norm_act_fused(Tensor x, Tensor? weight, Tensor? bias, float eps, bool clamp, int activation, "
        "float negative_slope) -> (Tensor, Tensor)");
  m.def("_rms_norm_act_backward(Tensor grad, Tensor x, Tensor rstd, Tensor? weight, Tensor? bias, float eps, "
        "bool clamp, int activation, float negative_slope, bool need_x) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("_rms_norm_act_fused", &rms_norm_act_cpu);
  m.impl("_rms_norm_act_backward", &rms_norm_act_backward_cpu);
}
