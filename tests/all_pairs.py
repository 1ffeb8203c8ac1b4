"""All-pairs selection of parametrized test cases (the oldest-torch stage's --all-pairs, conftest.py)."""


def all_pairs(cases, key):
    """The cases, in order, that first cover some pair of parameter values of their test: with
    key(case) = (test, params dict or None), every pair of values of any two parameters of a test (and
    every single value) appears in at least one kept case; unparametrized cases are all kept."""
    covered, kept = set(), []
    for case in cases:
        test, params = key(case)
        if not params:
            kept.append(case)
            continue
        values = sorted((name, repr(value)) for name, value in params.items())
        pairs = {(test, a, b) for i, a in enumerate(values) for b in values[i:]}  # (a, a): the single values
        if not pairs <= covered:
            covered |= pairs
            kept.append(case)
    return kept
