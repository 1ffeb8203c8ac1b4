"""StyleGAN2 modulated conv (up 2, plain): eager generic path vs StyleGAN2's own formulation (stylegan2) vs fastgen (pytest benchmarks --benchmark-only).

Each group is one shape x dtype x layout x pass; compare the medians inside a group. Shapes:
fastgen/bench.py ModulatedConv2d.
"""

from fastgen.bench.modulated_conv2d import ModulatedConv2d
from harness import benchmark_suite

test_modulated_conv2d = benchmark_suite(ModulatedConv2d)
