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
