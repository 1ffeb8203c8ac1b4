"""Case selection (tests/conftest.py): greedy all-pairs, with the core axes as a full product, and one case
per core combination."""

import itertools

from all_pairs import all_pairs, one_per_core


def test_every_pair_of_values_is_kept_and_fewer_cases_run():
    grid = {"backend": ["composite", "cpu", "triton"], "dtype": ["f32", "bf16", "f16"],
            "layout": ["nchw", "nhwc"], "activation": ["identity", "silu", "gelu", "relu"]}
    cases = [("t", dict(zip(grid, values))) for values in itertools.product(*grid.values())]
    kept = all_pairs(cases, key=lambda case: case)
    for (a, av), (b, bv) in itertools.combinations([(n, v) for n, vs in grid.items() for v in vs], 2):
        if a != b:
            assert any(p[a] == av and p[b] == bv for _, p in kept), (a, av, b, bv)
    assert len(kept) < len(cases) // 2


def test_tests_are_covered_separately_and_plain_tests_all_kept():
    cases = [("t1", {"x": 1}), ("t1", {"x": 1}), ("t2", {"x": 1}), ("t3", None), ("t3", None)]
    assert all_pairs(cases, key=lambda case: case) == [("t1", {"x": 1}), ("t2", {"x": 1}), ("t3", None), ("t3", None)]


GRID = {"backend": ["composite", "cpu", "triton"], "dtype": ["f32", "bf16", "f16"], "layout": ["nchw", "nhwc"],
        "activation": ["identity", "silu", "gelu", "relu", "tanh", "elu"], "shape": ["a", "b", "c", "d"],
        "clamp": [False, True]}
SWEEP = [("t", dict(zip(GRID, values))) for values in itertools.product(*GRID.values())]
CORE = ("backend", "dtype", "layout")


def test_a_sweep_keeps_every_core_combination_with_every_behaviour_value_and_pair():
    kept = all_pairs(SWEEP, key=lambda case: case, core=CORE)
    cores = {tuple(p[n] for n in CORE) for _, p in kept}
    assert len(cores) == 18  # the full product of backend, dtype and layout
    behaviour = [n for n in GRID if n not in CORE]
    for core in cores:
        mine = [p for _, p in kept if tuple(p[n] for n in CORE) == core]
        for name in behaviour:
            assert {p[name] for p in mine} == set(GRID[name]), (core, name)
    for a, b in itertools.combinations(behaviour, 2):
        assert {(p[a], p[b]) for _, p in kept} == set(itertools.product(GRID[a], GRID[b]))
    # greedy: about as few as the widest core x behaviour product allows (18 x 6), far below every case
    assert len(kept) <= 18 * 6 * 1.3 and len(kept) <= len(SWEEP) / 8


def test_one_case_per_core_combination():
    kept = one_per_core(SWEEP, key=lambda case: case, core=CORE)
    assert len(kept) == 18 and len({tuple(p[n] for n in CORE) for _, p in kept}) == 18
