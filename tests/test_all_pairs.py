"""The oldest-torch stage's case selection (--all-pairs): every pair of parameter values is kept."""

import itertools

from all_pairs import all_pairs


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
