"""The package's judge (fastgen.tolerances: bench's and verify's correctness column) fails each
planted error: a float32 result under a float64 check, a dx 0.1% off beside a large dweight."""

import torch

from fastgen import ops
from fastgen.tolerances import judge


def norm_results(dtype, backend="reference", dx_error=0.0, wscale=1.0):
    """group_norm_act at the SD-VAE decode's proportions: [output, dx, dweight, dbias]; dweight is
    tens of times larger than dx (wscale scales it further)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 16, 16, generator=g, dtype=torch.float64)
    w = 0.05 * (torch.rand(32, generator=g, dtype=torch.float64) + 1)  # a small gain: dx small, dweight not
    b = torch.randn(32, generator=g, dtype=torch.float64)
    cot = torch.randn(2, 32, 16, 16, generator=g, dtype=torch.float64) * wscale
    leaves = [t.to(dtype).requires_grad_(True) for t in (x, w, b)]
    out = ops.group_norm_act(*leaves[:1], 8, *leaves[1:], backend=backend)
    grads = list(torch.autograd.grad(out, leaves, cot.to(dtype)))
    grads[0] = grads[0] * (1 + dx_error)
    return [out.detach(), *grads]


def test_a_correct_result_passes_in_its_dtype():
    want = norm_results(torch.float64)
    for dtype in (torch.float32, torch.float64):
        assert judge(norm_results(dtype, "cpu"), norm_results(dtype), want, dtype) == []


def test_a_float32_result_fails_a_float64_check():
    want = norm_results(torch.float64)
    got = [t.double() for t in norm_results(torch.float32)]
    assert judge(got, norm_results(torch.float64), want, torch.float64)


def test_a_dx_off_by_a_thousandth_fails_beside_a_large_dweight():
    want = norm_results(torch.float64, wscale=10.0)
    assert max(t.abs().max().item() for t in want[2:]) > 20 * want[1].abs().max().item()
    got = norm_results(torch.float32, "cpu", dx_error=1e-3, wscale=10.0)
    problems = judge(got, norm_results(torch.float32, wscale=10.0), want, torch.float32)
    assert problems and all(p.startswith("gradients") for p in problems), problems
