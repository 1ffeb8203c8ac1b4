"""batch_norm_act and pixel_norm: eager vs torch.compile vs fastgen (pytest benchmarks --benchmark-only)."""

from fastgen.bench import BatchNormAct, PixelNorm
from harness import benchmark_suite

test_batch_norm_act = benchmark_suite(BatchNormAct)
test_pixel_norm = benchmark_suite(PixelNorm)
