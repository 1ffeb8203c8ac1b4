// Schema of the pixel norm kernel op behind the "cuda" backend of fastgen::pixel_norm (defined in
// fastgen/ops/pixel_norm.py). No CPU kernel: on the CPU the composite is one reduction and one
// multiply, already at memory speed.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastgen, m) {
  m.def("_pixel_norm_fused(Tensor x, float eps) -> Tensor");
}
