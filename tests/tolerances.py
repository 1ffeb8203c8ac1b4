"""The one tolerance table: per dtype (atol, rtol) against a float64 oracle, for outputs of order 1
(tests scale weights by 1/sqrt(fan_in)). A test may pass a documented `scale`, never its own numbers."""

import torch

TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


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


def assert_within_eager_error(got, eager, want, factor: float = 3.0):
    """The flash-attention rule, per tensor of a list: against the float64 oracle `want`, the fused
    result errs by at most `factor` times what the unfused layers err in the same dtype (`eager`),
    plus a floor of 1e-6 of the list's largest magnitude (some values are 0 in exact arithmetic,
    e.g. the gradient of a bias just before a normalization)."""
    floor = 1e-6 * max(w.abs().max().item() for w in want)
    for i, (g, e, w) in enumerate(zip(got, eager, want, strict=True)):
        assert not g.isnan().any(), f"NaN in result {i}"
        err, base = (g.double() - w).abs().max().item(), (e.double() - w).abs().max().item()
        assert err <= factor * base + floor, f"result {i}: error {err:.3g} > {factor} x eager's {base:.3g} + {floor:.3g}"
