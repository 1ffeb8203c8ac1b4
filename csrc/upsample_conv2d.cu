// Fused upsample + conv2d on CUDA: the "cuda" backend of fastgen::upsample_conv2d.
//
// In PyTorch:
//   xu  = F.interpolate(x, scale_factor=S, mode=mode)     # never materialized here
//   out = F.conv2d(xu, weight, bias, padding=PAD)
// computed per output phase as an implicit GEMM over the un-upsampled x (derivation in
// kernels/upsample_conv2d.py; the host folds and packs the weights):
//   out[n, o, Y, X] = bias[o] + sum_{tap, c} A[(n, my, mx), (tap, c)] * Wp[phase, tap, c, o]
// One block computes a BM x BN tile (pixels x output channels) in fp32 (fp64 for double):
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

#include "index.cuh"
#include "layout.h"

namespace {

constexpr int BM = 64;  // output pixels per block
constexpr int BN = 64;  // output channels per block
constexpr int BK = 32;  // input channels per K step
constexpr int THREADS = 256;
constexpr int SKEW = 8;  // smem row padding, in elements; keeps WMMA rows 32-byte aligned

struct UpsampleConvParams {
  const void* x;     // (N, C, H, W), strides sx*
  const void* w;     // (P, KF, KF, C, CO) contiguous, x's dtype; P = phases^2
  const void* bias;  // (CO,) or nullptr
  void* out;         // (N, CO, HOUT, WOUT), strides so*
  int64_t N, C, H, W, CO, HOUT, WOUT;
  int64_t HM, WM;  // pixel grid per phase: ceil(HOUT / S) for nearest, HOUT for bilinear
  int64_t sxn, sxc, sxh, sxw;
  int64_t son, soc, soh, sow;
  int scale;   // S
  int phases;  // S for nearest, 1 for bilinear
  int kf;      // taps per axis: folded for nearest, the kernel size for bilinear
  int pad;     // the conv's zero padding, on the upsampled image
  bool bilinear;
  bool small;  // N * HM * WM pixels below 2^31: pixel indices divided in 32 bits (index.cuh)
};

// small operands (a phase minus the padding, the scale): a 32-bit division
__device__ __forceinline__ int floordiv(int a, int b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

template <typename T> struct Wmma;
template <> struct Wmma<at::Half> { using type = __half; };
template <> struct Wmma<at::BFloat16> { using type = __nv_bfloat16; };

// Where output tile row `row` (a pixel of this phase) lands, or -1 when it is outside the output.
__device__ __forceinline__ int64_t out_pixel_offset(const UpsampleConvParams& p, int64_t m, int ry, int rx) {
  if (m >= p.N * p.HM * p.WM) return -1;
  const int64_t q = fastgen::idiv(m, p.WM, p.small), mx = m - q * p.WM;
  const int64_t n = fastgen::idiv(q, p.HM, p.small), my = q - n * p.HM;
  const int64_t y = p.bilinear ? my : my * p.scale + ry;
  const int64_t x = p.bilinear ? mx : mx * p.scale + rx;
  if (y >= p.HOUT || x >= p.WOUT) return -1;
  return n * p.son + y * p.soh + x * p.sow;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_out(const UpsampleConvParams& p, int64_t pixel, int64_t o, acc_t v) {
  if (pixel < 0 || o >= p.CO) return;
  if (p.bias) v += static_cast<acc_t>(static_cast<const scalar_t*>(p.bias)[o]);
  static_cast<scalar_t*>(p.out)[pixel + o * p.soc] = static_cast<scalar_t>(v);
}

template <typename scalar_t, bool kTensorCores>
__global__ void __launch_bounds__(THREADS) upsample_conv2d_kernel(const UpsampleConvParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ __align__(32) scalar_t As[BM][BK + SKEW];  // pixels x input channels
  __shared__ __align__(32) scalar_t Bs[BK][BN + SKEW];  // input channels x output channels

  const int tid = threadIdx.x;
  const int phase = blockIdx.z;
  const int ry = phase / p.phases, rx = phase % p.phases;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * BN;

  // A loader: one pixel row and BK / 4 consecutive channels per thread.
  const int a_row = tid % BM, a_col = (tid / BM) * (BK / 4);
  const int64_t m = m0 + a_row;
  const bool row_ok = m < p.N * p.HM * p.WM;
  const int64_t mq = row_ok ? fastgen::idiv(m, p.WM, p.small) : 0, mn = fastgen::idiv(mq, p.HM, p.small);
  const int64_t my = row_ok ? mq - mn * p.HM : 0, mx = row_ok ? m - mq * p.WM : 0;
  const scalar_t* xn = static_cast<const scalar_t*>(p.x) + (row_ok ? mn : 0) * p.sxn;
  // B loader: one input channel and 8 consecutive output channels per thread.
  const int b_row = tid / (BN / 8), b_col = (tid % (BN / 8)) * 8;
  const scalar_t* w = static_cast<const scalar_t*>(p.w);

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

  for (int tap = 0; tap < p.kf * p.kf; ++tap) {
    const int ta = tap / p.kf, tb = tap % p.kf;
    // This row's source offsets for the tap (bilinear: the four neighbours and their weights).
    bool valid;
    int64_t off[4] = {0, 0, 0, 0};
    if (p.bilinear) {
      const int64_t uy = my + ta - p.pad, ux = mx + tb - p.pad;
      valid = row_ok && uy >= 0 && uy < 2 * p.H && ux >= 0 && ux < 2 * p.W;
      const int64_t y0 = max(uy, int64_t(0)) / 2, x0 = max(ux, int64_t(0)) / 2;
      const int64_t y1 = (uy & 1) ? min(y0 + 1, p.H - 1) : max(y0 - 1, int64_t(0));
      const int64_t x1 = (ux & 1) ? min(x0 + 1, p.W - 1) : max(x0 - 1, int64_t(0));
      off[0] = y0 * p.sxh + x0 * p.sxw;
      off[1] = y0 * p.sxh + x1 * p.sxw;
      off[2] = y1 * p.sxh + x0 * p.sxw;
      off[3] = y1 * p.sxh + x1 * p.sxw;
    } else {
      const int64_t iy = my + floordiv(ry - p.pad, p.scale) + ta;
      const int64_t ix = mx + floordiv(rx - p.pad, p.scale) + tb;
      valid = row_ok && iy >= 0 && iy < p.H && ix >= 0 && ix < p.W;
      off[0] = iy * p.sxh + ix * p.sxw;
    }
    const scalar_t* w_tap = w + (static_cast<int64_t>(phase) * p.kf * p.kf + tap) * p.C * p.CO;

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
      store_out<scalar_t, float>(p, out_pixel_offset(p, m0 + row, ry, rx), o0 + col, Cs[row][col]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t pixel = out_pixel_offset(p, m0 + ty * 4 + i, ry, rx);
#pragma unroll
      for (int j = 0; j < 4; ++j) store_out<scalar_t, acc_t>(p, pixel, o0 + tx * 4 + j, acc[i][j]);
    }
  }
}

at::Tensor upsample_conv2d_fused_cuda(const at::Tensor& x, const at::Tensor& packed_weight,
                                      const std::optional<at::Tensor>& bias, int64_t scale_factor,
                                      bool bilinear, int64_t padding, int64_t kernel_size) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "x must be a 4-D CUDA tensor");
  TORCH_CHECK(packed_weight.dim() == 5 && packed_weight.is_contiguous() &&
                  packed_weight.scalar_type() == x.scalar_type() && packed_weight.device() == x.device(),
              "packed_weight must be a contiguous (P, KF, KF, C, CO) tensor of x's dtype and device");
  const int64_t phases = bilinear ? 1 : scale_factor;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(packed_weight.size(0) == phases * phases && packed_weight.size(1) == packed_weight.size(2) &&
                  packed_weight.size(3) == C, "packed_weight does not match x and the scale factor");
  const int64_t HOUT = scale_factor * H + 2 * padding - kernel_size + 1;
  const int64_t WOUT = scale_factor * W + 2 * padding - kernel_size + 1;
  TORCH_CHECK(HOUT > 0 && WOUT > 0, "the output would be empty");
  const at::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(at::cuda::getCurrentDeviceProperties()->major >= 8,
              "the cuda backend of upsample_conv2d needs compute capability 8.0 or newer");
  const auto fmt = fastgen::output_format(x);
  const int64_t CO = packed_weight.size(4);
  at::Tensor out = at::empty({N, CO, HOUT, WOUT}, x.options(), fmt);
  if (out.numel() == 0) return out;
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();

  UpsampleConvParams p;
  p.x = x.data_ptr();
  p.w = packed_weight.data_ptr();
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.N = N; p.C = C; p.H = H; p.W = W; p.CO = CO; p.HOUT = HOUT; p.WOUT = WOUT;
  p.HM = bilinear ? HOUT : (HOUT + scale_factor - 1) / scale_factor;
  p.WM = bilinear ? WOUT : (WOUT + scale_factor - 1) / scale_factor;
  p.sxn = x.stride(0); p.sxc = x.stride(1); p.sxh = x.stride(2); p.sxw = x.stride(3);
  p.son = out.stride(0); p.soc = out.stride(1); p.soh = out.stride(2); p.sow = out.stride(3);
  p.scale = static_cast<int>(scale_factor);
  p.phases = static_cast<int>(phases);
  p.kf = static_cast<int>(packed_weight.size(1));
  p.pad = static_cast<int>(padding);
  p.bilinear = bilinear;
  p.small = N * p.HM * p.WM + 256 < fastgen::kIndex32 && fastgen::small_indices(x.numel(), out.numel());

  const int64_t blocks_m = (N * p.HM * p.WM + BM - 1) / BM;
  TORCH_CHECK(blocks_m < (int64_t(1) << 31) && (CO + BN - 1) / BN < 65536, "upsample_conv2d: too large");
  const dim3 grid(static_cast<unsigned>(blocks_m), static_cast<unsigned>((CO + BN - 1) / BN),
                  static_cast<unsigned>(phases * phases));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upsample_conv2d_cuda", [&] {
    constexpr bool kTensorCores = std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;
    upsample_conv2d_kernel<scalar_t, kTensorCores><<<grid, THREADS, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CUDA, m) {
  m.impl("_upsample_conv2d_fused", &upsample_conv2d_fused_cuda);
}
