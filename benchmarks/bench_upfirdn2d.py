"""StyleGAN2 upfirdn2d (FIR after an upsampling conv, ToRGB upsample, discriminator downsample) (pytest benchmarks --benchmark-only).

Each group is one shape x dtype x layout x pass; compare the medians inside a group. Shapes:
fastgen/bench.py Upfirdn2d.
"""

from fastgen.bench.upfirdn2d import Upfirdn2d
from harness import benchmark_suite

test_upfirdn2d = benchmark_suite(Upfirdn2d)
