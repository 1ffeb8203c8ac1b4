"""StyleGAN2 bias + lrelu + clamp vs eager's four kernels vs torch.compile vs fastgen (pytest benchmarks --benchmark-only).

Each group is one shape x dtype x layout x pass; compare the medians inside a group. Shapes:
fastgen/bench.py BiasAct.
"""

from fastgen.bench.bias_act import BiasAct
from harness import benchmark_suite

test_bias_act = benchmark_suite(BiasAct)
