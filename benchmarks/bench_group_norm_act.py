"""group_norm_act: nn.GroupNorm + nn.SiLU vs torch.compile vs fastgen (pytest benchmarks --benchmark-only).

Each group is one shape x dtype x layout x pass; compare the medians inside a group. GB/s against
the copy bandwidth: `python -m fastgen bench --ops group_norm_act`.
"""

from fastgen.bench.group_norm_act import GroupNormAct
from harness import benchmark_suite

test_group_norm_act = benchmark_suite(GroupNormAct)
