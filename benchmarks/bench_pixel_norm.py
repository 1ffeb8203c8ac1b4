"""pixel_norm: the eager formula vs torch.compile vs fastgen (pytest benchmarks --benchmark-only)."""

from fastgen.bench.pixel_norm import PixelNorm
from harness import benchmark_suite

test_pixel_norm = benchmark_suite(PixelNorm)
