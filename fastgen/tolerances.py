"""The one tolerance table: per dtype (atol, rtol) against a float64 oracle, for outputs of order 1.
The tests (tests/tolerances.py), the GPU verification (fastgen.verify) and the benchmarks' correctness
column (both through `judge`) all read it."""

import torch

TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


# the floor of a tensor's judgement is on its own scale, but not below this share of the list's largest
FLOOR_SHARE = 0.05


def within_eager_error(got, eager, want, factor: float = 3.0, floor_share: float = FLOOR_SHARE) -> list[str]:
    """The flash-attention rule, per tensor of a list: against the float64 oracle `want`, the fused
    result errs by at most `factor` times what the unfused layers err in the same dtype (`eager`),
    plus a floor of 1e-6 (in float64: 16 rounding steps) times the tensor's own largest magnitude, or
    `floor_share` of the list's largest where that is more (1: every tensor on the list's scale). Its own scale: a dx 2000x smaller than the
    dbias beside it is not judged on dbias's scale (where a dx 0.1% off passed). Not below a share of
    the list's: a tensor that cancels down (a running mean of centred data, a gradient that is 0 in
    exact arithmetic) carries the rounding of its terms, which are on the list's scale, and eager may
    have summed it in float64 (aten's CPU reductions do). A float64 result is held to float64's
    accuracy. Returns what broke the rule."""
    steps = 16 * torch.finfo(torch.float64).eps if got[0].dtype == torch.float64 else 1e-6
    largest = [w.abs().max().item() if w.numel() else 0.0 for w in want]
    problems = []
    for i, (g, e, w) in enumerate(zip(got, eager, want, strict=True)):
        if g.isnan().any() and not w.isnan().any():
            problems.append(f"result {i}: NaN")
            continue
        floor = steps * max(largest[i], floor_share * max(largest))
        err, base = (g.double() - w).abs().max().item(), (e.double() - w).abs().max().item()
        if not err <= factor * base + floor:
            problems.append(f"result {i}: error {err:.3g} > {factor} x eager's {base:.3g} + {floor:.3g}")
    return problems


def within_table(got, want, dtype, scale: float = 1.0) -> bool:
    """Every tensor within the table's (atol, rtol) for dtype, times scale, against the float64 oracle,
    each relative to its own largest magnitude (when above 1), as the tests' gradient check does: a
    small dx is not judged on the scale of a large dweight beside it."""
    atol, rtol = TOLERANCES[dtype]

    def norm(w):
        return max(1.0, w.abs().max().item()) if w.numel() else 1.0

    return all(torch.allclose(g.double() / norm(w), w / norm(w), atol=atol * scale, rtol=rtol * scale)
               for g, w in zip(got, want, strict=True))


def judge(got, eager, want, dtype) -> list[str]:
    """What is wrong with `got` = [output, *gradients] against the float64 oracle `want` (empty: it
    passed): each part within the table (gradients at 3x) or, failing that, the flash-attention rule
    against the unfused layers' own results in the same dtype, `eager` (2x for the output, 3x for
    gradients)."""
    problems = []
    if not within_table(got[:1], want[:1], dtype):
        problems += [f"output: {p}" for p in within_eager_error(got[:1], eager[:1], want[:1], 2.0)]
    if len(got) > 1 and not within_table(got[1:], want[1:], dtype, 3.0):
        problems += [f"gradients: {p}" for p in within_eager_error(got[1:], eager[1:], want[1:], 3.0)]
    return problems
