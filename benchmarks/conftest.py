"""Parametrizes each suite's benchmark with its (shape, provider) cases: every shape when timing,
the quick shape when pytest-benchmark is disabled (the test command's pass that keeps the files
working)."""

from harness import cases


def pytest_generate_tests(metafunc):
    suite = getattr(metafunc.function, "suite", None)
    if suite is not None:
        quick = metafunc.config.getoption("benchmark_disable")
        pairs = cases(suite, quick)
        metafunc.parametrize("case", pairs, ids=[f"{shape.name}-{name}" for shape, name in pairs])


def pytest_collection_modifyitems(config, items):
    """Run, not timed (--benchmark-disable): the torch.compile rows are left out. The main job (python -m
    fastgen bench) and tests/test_bench.py compile those; here a cold compile of every op and model
    took most of the files' minutes."""
    if not config.getoption("benchmark_disable"):
        return
    params = [getattr(it, "callspec", None) and it.callspec.params for it in items]
    compiled = [p is not None and "compile" in (p.get("provider"), (p.get("case") or (None, None))[1])
                for p in params]
    config.hook.pytest_deselected(items=[it for it, c in zip(items, compiled) if c])
    items[:] = [it for it, c in zip(items, compiled) if not c]
