import importlib.util
import os
import time
import zlib

import pytest
import torch

from all_pairs import all_pairs

# hypothesis profiles (tests/test_properties.py): quick by default; --hypothesis-profile=deep for long
# runs. (The XLA stage's environment has no hypothesis and runs no property test.)
if importlib.util.find_spec("hypothesis"):
    from hypothesis import HealthCheck, settings

    _slow_ok = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    # quick: the same examples every run (derandomized, no example database), so CI cannot flake
    settings.register_profile("quick", max_examples=12, derandomize=True, database=None, **_slow_ok)
    settings.register_profile("deep", max_examples=400, **_slow_ok)
    settings.load_profile("quick")


# tools/gpu_check.sh runs its test stages against a deadline (epoch seconds): a test that would start
# after it is skipped as "cut by time", so that the run ends, reports and writes its junit XML in
# time instead of being killed mid-test (the script reads those skips as an incomplete stage)
_DEADLINE = float(os.environ.get("FASTGEN_TEST_DEADLINE") or 0)


def pytest_runtest_setup(item):
    if _DEADLINE and time.time() > _DEADLINE:
        pytest.skip("cut by time (FASTGEN_TEST_DEADLINE, tools/gpu_check.sh's stage budget)")


# tests/xla runs in the XLA stage's own environment (tools/test_xla.sh), where torch_xla exists
collect_ignore = [] if importlib.util.find_spec("torch_xla") else ["xla"]


@pytest.fixture(autouse=True)
def poison_empty_tensors():
    """Every torch.empty is NaN-filled, so an output element a kernel forgets to write fails."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 means fp32: cuDNN convolutions default to TF32 on Ampere and Hopper (~1e-3 error, far
    above the fp32 tolerance), which would fail every fp32 convolution test on the GPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def fresh_seed(request):
    # different random inputs in every test, reproducible from the test's id
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# The oldest-torch stage (tools/test_xla.sh) reruns the suite to catch what differs between torch and
# Triton versions: an API, a lowering, an interpreter's behaviour. Those show with each pair of
# parameter values (backend x dtype, backend x layout, ...), not only with every product of them (the
# main run has those), so there it runs an all-pairs subset of each parametrized test.
def pytest_addoption(parser):
    parser.addoption("--all-pairs", action="store_true",
                     help="run an all-pairs subset of each parametrized test: every pair of values of any two "
                          "of its parameters at least once, not every combination; the rest is deselected")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--all-pairs"):
        return
    # the cases that run without a GPU cover first, so a skipped GPU case never stands in for them
    cases = sorted(items, key=lambda it: it.get_closest_marker("cuda") is not None)
    keep = {id(it) for it in all_pairs(cases, lambda it: ((it.path, it.originalname),
                                                           getattr(it, "callspec", None) and it.callspec.params))}
    config.hook.pytest_deselected(items=[it for it in items if id(it) not in keep])
    items[:] = [it for it in items if id(it) in keep]
