// Schema of the fused upsample+conv kernel op. The public op fastgen::upsample_conv2d is defined in
// fastgen/ops/upsample_conv2d.py; its "cuda" backend calls this one with weights already packed:
//
//   packed_weight: (P, KF, KF, C, CO), P = scale^2 phases for nearest (weights folded per phase,
//                  KF = folded kernel size), P = 1 and KF = kernel_size for bilinear.
//
// There is no CPU kernel: on the CPU the composite (oneDNN convolution over folded weights) is the
// fast path, and a hand-written direct convolution would only be slower.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastgen, m) {
  m.def(
      "_upsample_conv2d_fused(Tensor x, Tensor packed_weight, Tensor? bias, int scale_factor, "
      "bool bilinear, int padding, int kernel_size) -> Tensor");
}
