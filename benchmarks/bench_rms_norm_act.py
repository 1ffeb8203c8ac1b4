"""rms_norm_act: Wan's eager norm + SiLU vs torch.compile vs fastgen (pytest benchmarks --benchmark-only)."""

from fastgen.bench.rms_norm_act import RMSNormAct
from harness import benchmark_suite

test_rms_norm_act = benchmark_suite(RMSNormAct)
