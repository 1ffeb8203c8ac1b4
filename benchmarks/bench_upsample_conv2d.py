"""upsample_conv2d: eager vs torch.compile vs fastgen, side by side (pytest benchmarks --benchmark-only).

Each group is one shape x dtype x layout x pass; compare the medians inside a group. The GPU
sweep with achieved TFLOP/s, errors and peak memory is `python -m fastgen bench`.
"""

from fastgen.bench.upsample_conv2d import UpsampleConv2d
from harness import benchmark_suite

test_upsample_conv2d = benchmark_suite(UpsampleConv2d)
