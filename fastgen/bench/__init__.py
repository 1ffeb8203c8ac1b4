"""`python -m fastgen bench`: every op's providers side by side at real generator shapes.

    suite.py     the suite interface (what an op's benchmark declares) and shared input makers
    <op>.py      one suite per op (upsample_conv2d.py, group_norm_act.py, ...)
    harness.py   timing, the correctness check against the float64 oracle, peak memory, ceilings
    report.py    the summary table and the chart
    cli.py       the command: which rows, the progress bar, JSON + PNG under runs/bench/ (--record: benchmarks/results/)
    models.py    whole generators (`--models`), each provider in its own process

benchmarks/bench_<op>.py run the same suites under pytest-benchmark.
"""

from fastgen.bench import (batch_norm_act, bias_act, group_norm_act, modulated_conv2d,  # noqa: F401 (registers)
                           pixel_norm, rms_norm_act, upfirdn2d, upsample_conv2d, upsample_conv3d)
from fastgen.bench.harness import environment, make_inputs, providers, time_ms  # noqa: F401
from fastgen.bench.suite import _SUITES, Shape, suite  # noqa: F401
from fastgen.ops import REGISTRY

# in the registry's order (fastgen.ops.REGISTRY)
SUITES = {name: cls for name in REGISTRY for cls in _SUITES if cls.op == name}
