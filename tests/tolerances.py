"""The test side of the one tolerance table (fastgen/tolerances.py): per dtype (atol, rtol) against a
float64 oracle, for outputs of order 1 (tests scale weights by 1/sqrt(fan_in)). A test may pass a
documented `scale`, never its own numbers."""

import torch

from fastgen.tolerances import FLOOR_SHARE, TOLERANCES, within_eager_error


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """actual (any dtype) against the float64 oracle `expected`."""
    atol, rtol = TOLERANCES[dtype]
    assert not actual.isnan().any(), "NaN in the result (an element was never written?)"
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale)


def assert_close_grad(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype):
    """Gradients: sums over many more terms and of any magnitude, so both sides are divided by the
    oracle's largest magnitude (when above 1) and the forward tolerance is tripled (the
    flash-attention rule for gradients)."""
    norm = max(1.0, expected.abs().max().item())
    assert_close(actual.double() / norm, expected.double() / norm, dtype, scale=3.0)


def assert_within_eager_error(got, eager, want, factor: float = 3.0, floor_share: float = FLOOR_SHARE):
    """The flash-attention rule (fastgen.tolerances.within_eager_error) as an assertion."""
    problems = within_eager_error(got, eager, want, factor, floor_share)
    assert not problems, "; ".join(problems)
