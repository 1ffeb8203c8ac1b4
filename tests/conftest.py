import importlib.util
import json
import os
import time
import zlib

import pytest
import torch

from all_pairs import CORE, all_pairs, one_per_core

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


# ... and reads each result from FASTGEN_TEST_LOG, written as the tests run (one JSON line per report;
# under pytest-xdist by the controller, which sees every worker's reports), so that a stage killed at its
# budget still has the failures it saw (pytest writes its junit XML only at the end)
_TEST_LOG = os.environ.get("FASTGEN_TEST_LOG")


def pytest_runtest_logreport(report):
    if not _TEST_LOG or os.environ.get("PYTEST_XDIST_WORKER") or (report.when != "call" and report.passed):
        return
    message = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else ""
    with open(_TEST_LOG, "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                            "message": message}) + "\n")


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


# Which cases of a parametrized test run (tests/all_pairs.py). Tests marked `sweep` cross the kernel's
# compile-time axes (backend, device, dtype, memory format: all kept) with behaviour axes (activation,
# shape, mode, k): by default a greedy all-pairs subset of them runs. The oldest-torch stage
# (tools/test_xla.sh) reruns the suite to catch what differs between torch and Triton versions (an API,
# a lowering, an interpreter's behaviour), not the numerics again: there each sweep runs one case per
# core combination (--sweep=cores) and every other parametrized test an all-pairs subset (--all-pairs).
def pytest_addoption(parser):
    parser.addoption("--sweep", choices=("pairs", "cores", "every"), default="pairs",
                     help="the cases of tests marked sweep: all-pairs of their behaviour axes with every core "
                          "combination (default), one case per core combination, or every case")
    parser.addoption("--all-pairs", action="store_true",
                     help="also run an all-pairs subset of each other parametrized test")
    parser.addoption("--api-only", action="store_true",
                     help="the oldest-torch stage's selection: the registry, build, backend and convert files, each "
                          "op's opcheck / compile / gradcheck / export tests, one case per core combination of "
                          "each sweep (implies --sweep=cores and --all-pairs)")


# --api-only: what checks the API and ABI of another torch and Triton, not the numerics again
API_FILES = ("test_build.py", "test_registry.py", "test_backends.py", "test_convert.py", "test_launchers.py")
API_WORDS = ("opcheck", "compile", "gradcheck", "export")


def _api(item) -> bool:
    return (item.path.name in API_FILES or item.get_closest_marker("sweep") is not None
            or any(word in item.originalname for word in API_WORDS))


def _key(item):
    return (item.path, item.originalname), getattr(item, "callspec", None) and item.callspec.params


def pytest_collection_modifyitems(config, items):
    api = config.getoption("--api-only")
    mode = "cores" if api else config.getoption("--sweep")
    pairs_everywhere = api or config.getoption("--all-pairs")
    if api:
        config.hook.pytest_deselected(items=[it for it in items if not _api(it)])
        items[:] = [it for it in items if _api(it)]
    # the cases that run without a GPU cover first, so a skipped GPU case never stands in for them
    cases = sorted(items, key=lambda it: it.get_closest_marker("cuda") is not None)
    sweeps = [it for it in cases if it.get_closest_marker("sweep")]
    others = [it for it in cases if not it.get_closest_marker("sweep")]
    keep = set()
    if mode == "every":
        keep.update(map(id, sweeps))
    else:
        choose = (lambda c: all_pairs(c, _key, CORE)) if mode == "pairs" else (lambda c: one_per_core(c, _key))
        keep.update(map(id, choose(sweeps)))
    keep.update(map(id, all_pairs(others, _key) if pairs_everywhere else others))
    config.hook.pytest_deselected(items=[it for it in items if id(it) not in keep])
    items[:] = [it for it in items if id(it) in keep]
