// Fused upsample + convolution on CUDA: the "cuda" backend of fastgen::upsample_conv2d and of
// fastgen::upsample_conv3d (one kernel: a 2-D call is a clip of one frame).
//
// In PyTorch:
//   xu  = F.interpolate(x, scale_factor=S, mode=mode)     # never materialized here
//   out = F.conv2d(xu, weight, bias, padding=PAD)          (3-D: F.pad(xu, pads), then F.conv3d)
// computed per output phase as an implicit GEMM over the un-upsampled x (derivations in
// kernels/upsample_conv2d.py and kernels/upsample_conv3d.py; the host folds and packs the weights):
//   out[n, o, Z, Y, X] = bias[o] + sum_{tap, c} A[(n, mt, my, mx), (tap, c)] * Wp[phase, tap, c, o]
// One block computes a BM x BN tile (positions x output channels) in fp32 (fp64 for double):
// tensor cores (WMMA) for fp16/bf16, FMA for fp32/fp64. The tile is written straight to its
// interleaved places in the output; bias is added in the epilogue.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "index.cuh"
#include "layout.h"

namespace {

constexpr int BM = 64;  // output pixels per block
constexpr int BN = 64;  // output channels per block
constexpr int BK = 32;  // input channels per K step
constexpr int THREADS = 256;
constexpr int SKEW = 8;  // smem row padding, in elements; keeps WMMA rows 32-byte aligned

struct UpsampleConvParams {
  const void* x;     // (N, C, T, H, W), strides sx* (2-D: T = 1)
  const void* w;     // (P, KFT, KFH, KFW, C, CO) contiguous, x's dtype; P = the phases
  const void* bias;  // (CO,) or nullptr
  void* out;         // (N, CO, TOUT, HOUT, WOUT), strides so*
  int64_t N, C, T, H, W, CO, TOUT, HOUT, WOUT;
  int64_t TM, HM, WM;  // positions per phase: ceil(OUT / S) per axis for nearest, the output for bilinear
  int64_t sxn, sxc, sxt, sxh, sxw;
  int64_t son, soc, sot, soh, sow;
  int st, sh, sw;     // nearest: the scale per axis (phases st * sh * sw); bilinear: 1, 2, 2 in one phase
  int kft, kfh, kfw;  // taps per axis: folded for nearest, the kernel size for bilinear
  int ft, fh, fw;     // zero padding in front of each upsampled axis
  bool bilinear;      // 2-D only
  bool small;  // N * TM * HM * WM positions below 2^31: indices divided in 32 bits (index.cuh)
};

// small operands (a phase minus the padding, the scale): a 32-bit division
__device__ __forceinline__ int floordiv(int a, int b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

template <typename T> struct Wmma;
template <> struct Wmma<at::Half> { using type = __half; };
template <> struct Wmma<at::BFloat16> { using type = __nv_bfloat16; };

struct Phase {
  int rt, rh, rw;
};

__device__ __forceinline__ Phase phase_of(const UpsampleConvParams& p, int phase) {
  if (p.bilinear) return {0, 0, 0};
  return {phase / (p.sh * p.sw), (phase / p.sw) % p.sh, phase % p.sw};
}

// A position of this phase's grid: (n, mt, my, mx).
struct Position {
  int64_t n, t, y, x;
};

__device__ __forceinline__ Position position_of(const UpsampleConvParams& p, int64_t m) {
  const int64_t q = fastgen::idiv(m, p.WM, p.small), qq = fastgen::idiv(q, p.HM, p.small);
  const int64_t n = fastgen::idiv(qq, p.TM, p.small);
  return {n, qq - n * p.TM, q - qq * p.HM, m - q * p.WM};
}

// Where output tile row `row` (a position of this phase) lands, or -1 when it is outside the output.
__device__ __forceinline__ int64_t out_pixel_offset(const UpsampleConvParams& p, int64_t m, Phase r) {
  if (m >= p.N * p.TM * p.HM * p.WM) return -1;
  const Position q = position_of(p, m);
  const int64_t t = q.t * p.st + r.rt;  // bilinear: st = 1, r = 0, one frame
  const int64_t y = p.bilinear ? q.y : q.y * p.sh + r.rh;
  const int64_t x = p.bilinear ? q.x : q.x * p.sw + r.rw;
  if (t >= p.TOUT || y >= p.HOUT || x >= p.WOUT) return -1;
  return q.n * p.son + t * p.sot + y * p.soh + x * p.sow;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_out(const UpsampleConvParams& p, int64_t pixel, int64_t o, acc_t v) {
  if (pixel < 0 || o >= p.CO) return;
  if (p.bias) v += static_cast<acc_t>(static_cast<const scalar_t*>(p.bias)[o]);
  static_cast<scalar_t*>(p.out)[pixel + o * p.soc] = static_cast<scalar_t>(v);
}

template <typename scalar_t, bool kTensorCores>
__global__ void __launch_bounds__(THREADS) upsample_conv_kernel(const UpsampleConvParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ __align__(32) scalar_t As[BM][BK + SKEW];  // positions x input channels
  __shared__ __align__(32) scalar_t Bs[BK][BN + SKEW];  // input channels x output channels

  const int tid = threadIdx.x;
  const int phase = blockIdx.z;
  const Phase r = phase_of(p, phase);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * BN;

  // A loader: one position row and BK / 4 consecutive channels per thread.
  const int a_row = tid % BM, a_col = (tid / BM) * (BK / 4);
  const int64_t m = m0 + a_row;
  const bool row_ok = m < p.N * p.TM * p.HM * p.WM;
  const Position q = position_of(p, row_ok ? m : 0);
  const scalar_t* xn = static_cast<const scalar_t*>(p.x) + q.n * p.sxn;
  // B loader: one input channel and 8 consecutive output channels per thread.
  const int b_row = tid / (BN / 8), b_col = (tid % (BN / 8)) * 8;
  const scalar_t* w = static_cast<const scalar_t*>(p.w);
  // nearest: this phase's first source index per axis, relative to its position
  const int lo_t = floordiv(r.rt - p.ft, p.st), lo_h = floordiv(r.rh - p.fh, p.sh), lo_w = floordiv(r.rw - p.fw, p.sw);

  // Accumulators: WMMA fragments (tensor cores) or a 4x4 register tile (FMA).
  const int warp = tid / 32, wm = warp % 4, wn = warp / 4;  // warp tile: 16 rows x 32 cols
  using namespace nvcuda;
  using frag_c = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  frag_c c_frag[2];
  acc_t acc[4][4] = {};
  const int ty = tid / 16, tx = tid % 16;  // FMA tile: rows ty*4.., cols tx*4..
  if constexpr (kTensorCores) {
    wmma::fill_fragment(c_frag[0], 0.0f);
    wmma::fill_fragment(c_frag[1], 0.0f);
  }

  const int taps = p.kft * p.kfh * p.kfw;
  for (int tap = 0; tap < taps; ++tap) {
    const int ta = tap / (p.kfh * p.kfw), tb = (tap / p.kfw) % p.kfh, tc = tap % p.kfw;
    // This row's source offsets for the tap (bilinear: the four neighbours and their weights).
    bool valid;
    int64_t off[4] = {0, 0, 0, 0};
    if (p.bilinear) {
      const int64_t uy = q.y + tb - p.fh, ux = q.x + tc - p.fw;
      valid = row_ok && uy >= 0 && uy < 2 * p.H && ux >= 0 && ux < 2 * p.W;
      const int64_t y0 = max(uy, int64_t(0)) / 2, x0 = max(ux, int64_t(0)) / 2;
      const int64_t y1 = (uy & 1) ? min(y0 + 1, p.H - 1) : max(y0 - 1, int64_t(0));
      const int64_t x1 = (ux & 1) ? min(x0 + 1, p.W - 1) : max(x0 - 1, int64_t(0));
      off[0] = y0 * p.sxh + x0 * p.sxw;
      off[1] = y0 * p.sxh + x1 * p.sxw;
      off[2] = y1 * p.sxh + x0 * p.sxw;
      off[3] = y1 * p.sxh + x1 * p.sxw;
    } else {
      const int64_t it = q.t + lo_t + ta, iy = q.y + lo_h + tb, ix = q.x + lo_w + tc;
      valid = row_ok && it >= 0 && it < p.T && iy >= 0 && iy < p.H && ix >= 0 && ix < p.W;
      off[0] = it * p.sxt + iy * p.sxh + ix * p.sxw;
    }
    const scalar_t* w_tap = w + (static_cast<int64_t>(phase) * taps + tap) * p.C * p.CO;

    for (int64_t c0 = 0; c0 < p.C; c0 += BK) {
#pragma unroll
      for (int j = 0; j < BK / 4; ++j) {
        const int64_t c = c0 + a_col + j;
        acc_t v = 0;
        if (valid && c < p.C) {
          const scalar_t* xc = xn + c * p.sxc;
          if (p.bilinear) {
            v = acc_t(0.5625) * static_cast<acc_t>(xc[off[0]]) + acc_t(0.1875) * static_cast<acc_t>(xc[off[1]]) +
                acc_t(0.1875) * static_cast<acc_t>(xc[off[2]]) + acc_t(0.0625) * static_cast<acc_t>(xc[off[3]]);
          } else {
            v = static_cast<acc_t>(xc[off[0]]);
          }
        }
        As[a_row][a_col + j] = static_cast<scalar_t>(v);  // rounds like eager's upsampled image
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int64_t c = c0 + b_row, o = o0 + b_col + j;
        Bs[b_row][b_col + j] = (c < p.C && o < p.CO) ? w_tap[c * p.CO + o] : static_cast<scalar_t>(0);
      }
      __syncthreads();
      if constexpr (kTensorCores) {
        using T = typename Wmma<scalar_t>::type;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag;
          wmma::load_matrix_sync(a_frag, reinterpret_cast<const T*>(&As[wm * 16][kk]), BK + SKEW);
#pragma unroll
          for (int f = 0; f < 2; ++f) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b_frag;
            wmma::load_matrix_sync(b_frag, reinterpret_cast<const T*>(&Bs[kk][wn * 32 + f * 16]), BN + SKEW);
            wmma::mma_sync(c_frag[f], a_frag, b_frag, c_frag[f]);
          }
        }
      } else {
#pragma unroll 8
        for (int kk = 0; kk < BK; ++kk) {
          acc_t a[4], b[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            a[i] = static_cast<acc_t>(As[ty * 4 + i][kk]);
            b[i] = static_cast<acc_t>(Bs[kk][tx * 4 + i]);
          }
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
      }
      __syncthreads();
    }
  }

  if constexpr (kTensorCores) {
    __shared__ __align__(32) float Cs[BM][BN + 4];
#pragma unroll
    for (int f = 0; f < 2; ++f)
      wmma::store_matrix_sync(&Cs[wm * 16][wn * 32 + f * 16], c_frag[f], BN + 4, wmma::mem_row_major);
    __syncthreads();
    // Consecutive threads write consecutive addresses: along channels (channels_last) or pixels.
    const bool along_channels = p.soc == 1;
    for (int idx = tid; idx < BM * BN; idx += THREADS) {
      const int row = along_channels ? idx / BN : idx % BM;
      const int col = along_channels ? idx % BN : idx / BM;
      store_out<scalar_t, float>(p, out_pixel_offset(p, m0 + row, r), o0 + col, Cs[row][col]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t pixel = out_pixel_offset(p, m0 + ty * 4 + i, r);
#pragma unroll
      for (int j = 0; j < 4; ++j) store_out<scalar_t, acc_t>(p, pixel, o0 + tx * 4 + j, acc[i][j]);
    }
  }
}

// x (N, C, T, H, W), packed (P, KFT, KFH, KFW, C, CO) and out (N, CO, TOUT, HOUT, WOUT) as 5-D views.
void launch(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias, const at::Tensor& out,
            std::array<int64_t, 3> scale, std::array<int64_t, 3> front, bool bilinear) {
  const at::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(at::cuda::getCurrentDeviceProperties()->major >= 8,
              "the cuda backend of upsample_conv2d / upsample_conv3d needs compute capability 8.0 or newer");
  if (out.numel() == 0) return;
  UpsampleConvParams p;
  p.x = x.data_ptr();
  p.w = packed.data_ptr();
  p.bias = bias.defined() ? bias.data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.N = x.size(0); p.C = x.size(1); p.T = x.size(2); p.H = x.size(3); p.W = x.size(4);
  p.CO = out.size(1); p.TOUT = out.size(2); p.HOUT = out.size(3); p.WOUT = out.size(4);
  p.TM = bilinear ? p.TOUT : (p.TOUT + scale[0] - 1) / scale[0];
  p.HM = bilinear ? p.HOUT : (p.HOUT + scale[1] - 1) / scale[1];
  p.WM = bilinear ? p.WOUT : (p.WOUT + scale[2] - 1) / scale[2];
  p.sxn = x.stride(0); p.sxc = x.stride(1); p.sxt = x.stride(2); p.sxh = x.stride(3); p.sxw = x.stride(4);
  p.son = out.stride(0); p.soc = out.stride(1); p.sot = out.stride(2); p.soh = out.stride(3); p.sow = out.stride(4);
  p.st = static_cast<int>(scale[0]); p.sh = static_cast<int>(scale[1]); p.sw = static_cast<int>(scale[2]);
  p.kft = static_cast<int>(packed.size(1)); p.kfh = static_cast<int>(packed.size(2));
  p.kfw = static_cast<int>(packed.size(3));
  p.ft = static_cast<int>(front[0]); p.fh = static_cast<int>(front[1]); p.fw = static_cast<int>(front[2]);
  p.bilinear = bilinear;
  const int64_t positions = p.N * p.TM * p.HM * p.WM;
  p.small = positions + 256 < fastgen::kIndex32 && fastgen::small_indices(x.numel(), out.numel());

  const int64_t blocks_m = (positions + BM - 1) / BM;
  TORCH_CHECK(blocks_m < (int64_t(1) << 31) && (p.CO + BN - 1) / BN < 65536, "upsample_conv: too large");
  const dim3 grid(static_cast<unsigned>(blocks_m), static_cast<unsigned>((p.CO + BN - 1) / BN),
                  static_cast<unsigned>(packed.size(0)));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upsample_conv_cuda", [&] {
    constexpr bool kTensorCores = std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;
    upsample_conv_kernel<scalar_t, kTensorCores><<<grid, THREADS, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_packed(const at::Tensor& x, const at::Tensor& packed, int64_t dim) {
  TORCH_CHECK(packed.dim() == dim && packed.is_contiguous() && packed.scalar_type() == x.scalar_type() &&
                  packed.device() == x.device() && packed.size(dim - 2) == x.size(1),
              "packed_weight must be a contiguous (P, KF.., C, CO) tensor of x's dtype, device and channels");
}

at::Tensor upsample_conv2d_fused_cuda(const at::Tensor& x, const at::Tensor& packed_weight,
                                      const std::optional<at::Tensor>& bias, int64_t scale_factor,
                                      bool bilinear, int64_t padding, int64_t kernel_size) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "x must be a 4-D CUDA tensor");
  check_packed(x, packed_weight, 5);
  const int64_t phases = bilinear ? 1 : scale_factor;
  TORCH_CHECK(packed_weight.size(0) == phases * phases && packed_weight.size(1) == packed_weight.size(2),
              "packed_weight does not match the scale factor");
  const int64_t HOUT = scale_factor * x.size(2) + 2 * padding - kernel_size + 1;
  const int64_t WOUT = scale_factor * x.size(3) + 2 * padding - kernel_size + 1;
  TORCH_CHECK(HOUT > 0 && WOUT > 0, "the output would be empty");
  at::Tensor out = at::empty({x.size(0), packed_weight.size(4), HOUT, WOUT}, x.options(), fastgen::output_format(x));
  // a clip of one frame: time at scale 1, one folded tap, no padding
  launch(x.unsqueeze(2), packed_weight.unsqueeze(1), fastgen::contiguous_or_undefined(bias), out.unsqueeze(2),
         {1, scale_factor, scale_factor}, {0, padding, padding}, bilinear);
  return out;
}

at::Tensor upsample_conv3d_fused_cuda(const at::Tensor& x, const at::Tensor& packed_weight,
                                      const std::optional<at::Tensor>& bias, at::IntArrayRef scale_factor,
                                      at::IntArrayRef padding, at::IntArrayRef kernel_size) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 5, "x must be a 5-D CUDA tensor");
  check_packed(x, packed_weight, 6);
  TORCH_CHECK(scale_factor.size() == 3 && padding.size() == 6 && kernel_size.size() == 3,
              "scale_factor and kernel_size take 3 values, padding 6 (F.pad's order)");
  TORCH_CHECK(packed_weight.size(0) == scale_factor[0] * scale_factor[1] * scale_factor[2],
              "packed_weight does not match the scale factor");
  std::vector<int64_t> size{x.size(0), packed_weight.size(5)};
  for (int d = 0; d < 3; ++d) {
    size.push_back(scale_factor[d] * x.size(2 + d) + padding[4 - 2 * d] + padding[5 - 2 * d] - kernel_size[d] + 1);
    TORCH_CHECK(size.back() > 0, "the output would be empty");
  }
  at::Tensor out = at::empty(size, x.options(), fastgen::output_format(x));
  launch(x, packed_weight, fastgen::contiguous_or_undefined(bias), out, {scale_factor[0], scale_factor[1], scale_factor[2]},
         {padding[4], padding[2], padding[0]}, false);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CUDA, m) {
  m.impl("_upsample_conv2d_fused", &upsample_conv2d_fused_cuda);
  m.impl("_upsample_conv3d_fused", &upsample_conv3d_fused_cuda);
}
