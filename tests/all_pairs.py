"""Case selection for parametrized tests (tests/conftest.py): greedy all-pairs, with some parameters
kept as a full product.

A sweep crosses the axes a kernel is compiled for (backend, device, dtype, memory format: a different
kernel, or launcher branch, per combination) with axes that select behaviour inside it (activation,
shape, mode, kernel size). The first must all run; of the second, a bug shows with some pair of values
(this activation at that shape), rarely only with a triple. So the core axes are merged into one value
and the selection keeps every pair of values of any two axes, the core one included: each core
combination meets every activation, every shape, ..., and every activation meets every shape.
"""

# parameters kept as a full product: the kernel's compile-time choices
CORE = ("backend", "device", "dtype", "layout", "fmt", "channels_last")


def _values(params: dict, core: tuple) -> list:
    merged = tuple((name, repr(params[name])) for name in core if name in params)
    rest = sorted((name, repr(v)) for name, v in params.items() if name not in core)
    return ([("core", merged)] if merged else []) + rest


def _pairs(values: list) -> set:
    # (a, a): the single values, so a value no pair reaches is still covered
    return {(a, b) for i, a in enumerate(values) for b in values[i:]}


def all_pairs(cases, key, core: tuple = ()):
    """The cases, in their order, of a greedy all-pairs selection per test: with key(case) = (test,
    params dict or None), every pair of values of any two parameters of a test (and every single value)
    appears in at least one kept case; the parameters named in `core` count as one (their combinations
    all kept). Greedy: the case that covers the most pairs not yet covered first (ties: the earlier);
    about 5x fewer cases than taking each case that covers something new, in order. Unparametrized
    cases are all kept."""
    groups: dict = {}
    for i, case in enumerate(cases):
        test, params = key(case)
        groups.setdefault(test, []).append((i, params))
    kept = set()
    for members in groups.values():
        if not members[0][1]:
            kept.update(i for i, _ in members)
            continue
        todo = {i: _pairs(_values(params, core)) for i, params in members}
        uncovered = set().union(*todo.values())
        while uncovered:
            best = max(todo, key=lambda i: (len(todo[i] & uncovered), -i))
            kept.add(best)
            uncovered -= todo.pop(best)
    return [case for i, case in enumerate(cases) if i in kept]


def one_per_core(cases, key, core: tuple = CORE):
    """One case per combination of the core parameters of each test (the first in order): the oldest-torch
    stage's check that each kernel still builds and runs there, not its numerics again. Unparametrized
    cases are all kept."""
    seen, kept = set(), []
    for case in cases:
        test, params = key(case)
        if params:
            mark = (test, tuple((name, repr(params[name])) for name in core if name in params))
            if mark in seen:
                continue
            seen.add(mark)
        kept.append(case)
    return kept
