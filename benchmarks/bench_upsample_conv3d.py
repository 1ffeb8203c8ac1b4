"""upsample_conv3d: the eager upsampling + causal conv3d vs torch.compile vs fastgen (pytest benchmarks --benchmark-only)."""

from fastgen.bench.upsample_conv3d import UpsampleConv3d
from harness import benchmark_suite

test_upsample_conv3d = benchmark_suite(UpsampleConv3d)
