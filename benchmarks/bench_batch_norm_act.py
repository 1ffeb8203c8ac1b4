"""batch_norm_act: nn.BatchNorm2d + nn.ReLU vs torch.compile vs fastgen (pytest benchmarks --benchmark-only)."""

from fastgen.bench.batch_norm_act import BatchNormAct2d
from harness import benchmark_suite

test_batch_norm_act = benchmark_suite(BatchNormAct2d)
