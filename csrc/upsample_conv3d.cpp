// Schema of the fused upsample + conv3d kernel op. The public op fastgen::upsample_conv3d is defined in
// fastgen/ops/upsample_conv3d.py; its "cuda" backend calls this one with weights already folded per phase:
//
//   packed_weight: (P, KFT, KFH, KFW, C, CO), P = the phases st * sh * sw, KF* the folded taps per axis.
//   scale_factor (st, sh, sw), padding six ints in F.pad's order, kernel_size (KT, KH, KW): the
//   output's size, as upsample_conv3d_ref computes it.
//
// The CUDA kernel is upsample_conv2d's (csrc/upsample_conv2d.cu: a 2-D call is a clip of one frame). No
// CPU kernel: on the CPU the composite (oneDNN convolutions over folded weights) is the fast path.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastgen, m) {
  m.def(
      "_upsample_conv3d_fused(Tensor x, Tensor packed_weight, Tensor? bias, int[] scale_factor, int[] padding, "
      "int[] kernel_size) -> Tensor");
}
