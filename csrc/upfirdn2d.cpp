// upfirdn2d on the CPU: the "cpu" backend of fastgen::upfirdn2d, and the schema of the kernel op
// that the "cpu" and "cuda" backends call.
//
// In PyTorch (fastgen/ops/upfirdn2d.py upfirdn2d_ref):
//   u = pad(zero_insert(x, up), pad)                     # never materialized here
//   out[n, c, oy, ox] = sum_{ky, kx} taps[ky, kx] * u[n, c, oy*down_y + ky, ox*down_x + kx]
// taps: (fh, fw) correlation taps in opmath (gain folded in, flipped for a convolution).
// NCHW: per image plane and output row, each filter row whose tap lands on an input row adds
// taps[ky, :] correlated with that input row zero-inserted and padded into a small buffer
// (vectorized along the row when down_x = 1). channels_last: per output pixel, every tap that
// lands on an input pixel adds a whole vector of channels. Sums in opmath (fp32 for fp16/bf16).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "layout.h"

TORCH_LIBRARY_FRAGMENT(fastgen, m) {
  m.def("_upfirdn2d_fused(Tensor x, Tensor taps, int[] up, int[] down, int[] pad) -> Tensor");
}

namespace {

using Vec = at::vec::Vectorized<float>;

struct Geometry {
  int64_t N, C, H, W, OH, OW, upx, upy, downx, downy, padx0, pady0, fh, fw;
};

// sources[o * taps + k]: the input row (or column) that tap k of output row (or column) o lands on,
// or -1 on an inserted zero or the padding. Computed once per call: no division in the loops.
std::vector<int64_t> tap_sources(int64_t out_size, int64_t taps, int64_t down, int64_t pad0, int64_t up,
                                 int64_t in_size) {
  std::vector<int64_t> sources(out_size * taps);
  for (int64_t o = 0; o < out_size; ++o)
    for (int64_t k = 0; k < taps; ++k) {
      const int64_t u = o * down + k - pad0;
      sources[o * taps + k] = (u < 0 || u % up != 0 || u / up >= in_size) ? -1 : u / up;
    }
  return sources;
}

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void upfirdn2d_nchw(const scalar_t* x, const opmath_t* taps, scalar_t* out, const Geometry& g) {
  // The input row, zero-inserted and padded, is dealt into down_x phases (phase p holds positions
  // m * down_x + p), so that tap kx reads phase kx % down_x from kx / down_x on: a contiguous run.
  const int64_t plen = g.OW + (g.fw - 1) / g.downx;
  const std::vector<int64_t> rows_of = tap_sources(g.OH, g.fh, g.downy, g.pady0, g.upy, g.H);
  const int64_t ix0 = std::max<int64_t>(0, (g.upx - 1 - g.padx0) / g.upx);  // the first column at j >= 0
  const int64_t row_size = g.downx * plen;
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> rows(g.H * row_size), acc(g.OW);  // every input row of the plane, dealt once
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* xp = x + plane * g.H * g.W;
      scalar_t* op = out + plane * g.OH * g.OW;
      std::fill(rows.begin(), rows.end(), opmath_t(0));
      const int64_t j0 = ix0 * g.upx + g.padx0;  // column ix sits at j = ix * up_x + pad_x0
      for (int64_t iy = 0; iy < g.H; ++iy) {
        opmath_t* row = rows.data() + iy * row_size;
        for (int64_t ix = ix0, m = j0 / g.downx, p = j0 % g.downx; ix < g.W && m < plen; ++ix) {
          row[p * plen + m] = static_cast<opmath_t>(xp[iy * g.W + ix]);
          for (p += g.upx; p >= g.downx; p -= g.downx) ++m;
        }
      }
      for (int64_t oy = 0; oy < g.OH; ++oy) {
        std::fill(acc.begin(), acc.end(), opmath_t(0));
        for (int64_t ky = 0; ky < g.fh; ++ky) {
          const int64_t iy = rows_of[oy * g.fh + ky];
          if (iy < 0) continue;
          for (int64_t kx = 0; kx < g.fw; ++kx) {
            const opmath_t t = taps[ky * g.fw + kx];
            const opmath_t* src = rows.data() + iy * row_size + (kx % g.downx) * plen + kx / g.downx;
            int64_t ox = 0;
            if constexpr (std::is_same_v<opmath_t, float>) {
              for (; ox + Vec::size() <= g.OW; ox += Vec::size())
                at::vec::fmadd(Vec(t), Vec::loadu(src + ox), Vec::loadu(acc.data() + ox)).store(acc.data() + ox);
            }
            for (; ox < g.OW; ++ox) acc[ox] += t * src[ox];
          }
        }
        for (int64_t ox = 0; ox < g.OW; ++ox) op[oy * g.OW + ox] = static_cast<scalar_t>(acc[ox]);
      }
    }
  });
}

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void upfirdn2d_nhwc(const scalar_t* x, const opmath_t* taps, scalar_t* out, const Geometry& g) {
  // Per output pixel: the taps that land on input pixels, then blocks of channels summed in
  // registers over those taps (one store per block).
  const std::vector<int64_t> rows_of = tap_sources(g.OH, g.fh, g.downy, g.pady0, g.upy, g.H);
  const std::vector<int64_t> cols_of = tap_sources(g.OW, g.fw, g.downx, g.padx0, g.upx, g.W);
  at::parallel_for(0, g.N * g.OH, 1, [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> src;
    std::vector<opmath_t> weight;
    src.reserve(g.fh * g.fw);
    weight.reserve(g.fh * g.fw);
    for (int64_t noy = begin; noy < end; ++noy) {
      const int64_t n = noy / g.OH, oy = noy % g.OH;
      for (int64_t ox = 0; ox < g.OW; ++ox) {
        src.clear();
        weight.clear();
        for (int64_t ky = 0; ky < g.fh; ++ky) {
          const int64_t iy = rows_of[oy * g.fh + ky];
          if (iy < 0) continue;
          for (int64_t kx = 0; kx < g.fw; ++kx) {
            const int64_t ix = cols_of[ox * g.fw + kx];
            if (ix < 0) continue;
            src.push_back(x + ((n * g.H + iy) * g.W + ix) * g.C);
            weight.push_back(taps[ky * g.fw + kx]);
          }
        }
        const int64_t count = static_cast<int64_t>(src.size());
        scalar_t* po = out + ((n * g.OH + oy) * g.OW + ox) * g.C;
        int64_t c = 0;
        if constexpr (std::is_same_v<scalar_t, float>) {
          constexpr int64_t V = Vec::size();
          for (; c + 4 * V <= g.C; c += 4 * V) {
            Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
            for (int64_t k = 0; k < count; ++k) {
              const Vec t(weight[k]);
              a0 = at::vec::fmadd(t, Vec::loadu(src[k] + c), a0);
              a1 = at::vec::fmadd(t, Vec::loadu(src[k] + c + V), a1);
              a2 = at::vec::fmadd(t, Vec::loadu(src[k] + c + 2 * V), a2);
              a3 = at::vec::fmadd(t, Vec::loadu(src[k] + c + 3 * V), a3);
            }
            a0.store(po + c);
            a1.store(po + c + V);
            a2.store(po + c + 2 * V);
            a3.store(po + c + 3 * V);
          }
          for (; c + V <= g.C; c += V) {
            Vec a(0.f);
            for (int64_t k = 0; k < count; ++k) a = at::vec::fmadd(Vec(weight[k]), Vec::loadu(src[k] + c), a);
            a.store(po + c);
          }
        }
        for (; c < g.C; ++c) {
          opmath_t a = 0;
          for (int64_t k = 0; k < count; ++k) a += weight[k] * static_cast<opmath_t>(src[k][c]);
          po[c] = static_cast<scalar_t>(a);
        }
      }
    }
  });
}

at::Tensor upfirdn2d_cpu(const at::Tensor& x_in, const at::Tensor& taps_in, at::IntArrayRef up, at::IntArrayRef down,
                         at::IntArrayRef pad) {
  TORCH_CHECK(x_in.dim() == 4, "upfirdn2d: x must be (N, C, H, W)");
  TORCH_CHECK(taps_in.dim() == 2 && taps_in.scalar_type() == at::toOpMathType(x_in.scalar_type()),
              "upfirdn2d: taps must be (fh, fw) in x's opmath dtype");
  TORCH_CHECK(up.size() == 2 && down.size() == 2 && pad.size() == 4, "upfirdn2d: up, down [x, y]; pad [x0, x1, y0, y1]");
  TORCH_CHECK(up[0] >= 1 && up[1] >= 1 && down[0] >= 1 && down[1] >= 1, "upfirdn2d: up and down must be >= 1");
  // channels_last with fewer channels than a vector (RGB images): the row-wise NCHW kernel on a
  // contiguous copy, the output put back in channels_last
  const bool keep_channels_last = fastgen::is_channels_last(x_in);
  const bool channels_last = keep_channels_last && x_in.size(1) >= Vec::size();
  const at::Tensor x = channels_last ? x_in : x_in.contiguous();
  const at::Tensor taps = taps_in.contiguous();
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, up[0], up[1], down[0], down[1], pad[0], pad[2],
             taps.size(0), taps.size(1)};
  g.OH = (g.H * g.upy + pad[2] + pad[3] - g.fh) / g.downy + 1;
  g.OW = (g.W * g.upx + pad[0] + pad[1] - g.fw) / g.downx + 1;
  TORCH_CHECK(g.OH > 0 && g.OW > 0, "upfirdn2d: the output would be empty");
  at::Tensor out = at::empty({g.N, g.C, g.OH, g.OW}, x.options().memory_format(fastgen::output_format(x)));
  if (out.numel() == 0) return keep_channels_last ? out.contiguous(at::MemoryFormat::ChannelsLast) : out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upfirdn2d_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    if (channels_last)
      upfirdn2d_nhwc<scalar_t>(x.const_data_ptr<scalar_t>(), taps.const_data_ptr<opmath_t>(),
                               out.mutable_data_ptr<scalar_t>(), g);
    else
      upfirdn2d_nchw<scalar_t>(x.const_data_ptr<scalar_t>(), taps.const_data_ptr<opmath_t>(),
                               out.mutable_data_ptr<scalar_t>(), g);
  });
  return keep_channels_last && !channels_last ? out.contiguous(at::MemoryFormat::ChannelsLast) : out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("_upfirdn2d_fused", &upfirdn2d_cpu);
}
