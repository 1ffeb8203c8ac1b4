"""The GPU gate's own examples (`python -m fastgen verify`: each op's examples and the TILING sizes, forward
and gradients, in every dtype and memory format) run here on every CPU backend, judged as the gate judges
them: what the gate would report on a GPU, this suite reports on the CPU first, and the two lists of
cases are one."""

import pytest
import torch

from cases import cpu_backends, skip_unavailable
from fastgen import verify
from fastgen.ops import REGISTRY

CASES = [pytest.param(name, backend, dtype, layout, id=f"{name}-{backend}-{str(dtype)[6:]}-{layout}")
         for name in verify.RISK_ORDER for backend in cpu_backends(name)
         for dtype in verify.DTYPES if dtype in REGISTRY[name].impls[backend].dtypes
         for layout in verify.layouts(REGISTRY[name])]


@pytest.mark.parametrize("name,backend,dtype,layout", CASES)
def test_every_verify_example_passes_on_every_cpu_backend(name, backend, dtype, layout):
    skip_unavailable(backend, "cpu")
    problems = verify.check(REGISTRY[name], backend, "cpu", dtype, layout)
    assert not problems, problems


def test_the_cases_cover_5d_channels_last_and_every_op():
    assert {c.values[0] for c in CASES} == set(REGISTRY)
    assert ("upsample_conv3d", "composite", torch.bfloat16, "ndhwc") in [tuple(c.values) for c in CASES]
    assert {"nchw", "nhwc", "ncdhw", "ndhwc"} <= set(verify.layouts(REGISTRY["rms_norm_act"]))
