"""The package's judge (fastgen.tolerances: bench's and verify's correctness column) fails each
planted error: a float32 result under a float64 check, a dx 0.1% off beside a large dweight."""

import torch

from fastgen import ops
from fastgen.tolerances import judge, within_eager_error


def norm_results(dtype, backend="reference", dx_error=0.0, wscale=1.0, size=16):
    """group_norm_act at the SD-VAE decode's proportions: [output, dx, dweight, dbias]; dweight is
    tens of times larger than dx (wscale scales it further)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, size, size, generator=g, dtype=torch.float64)
    w = 0.05 * (torch.rand(32, generator=g, dtype=torch.float64) + 1)  # a small gain: dx small, dweight not
    b = torch.randn(32, generator=g, dtype=torch.float64)
    cot = torch.randn(2, 32, size, size, generator=g, dtype=torch.float64) * wscale
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


def test_a_dx_off_by_a_thousandth_fails_beside_a_dbias_thousands_of_times_larger():
    """At the SD-VAE decode's map size (256x256) dbias sums 65536 positions: ~2000x dx. The floor is
    each tensor's own, not the list's largest (the list's floor let a dx 0.1% off pass)."""
    want = norm_results(torch.float64, size=256)
    assert want[3].abs().max().item() > 1000 * want[1].abs().max().item()
    eager = norm_results(torch.float32, size=256)
    assert judge(norm_results(torch.float32, "cpu", size=256), eager, want, torch.float32) == []
    problems = judge(norm_results(torch.float32, "cpu", dx_error=1e-3, size=256), eager, want, torch.float32)
    assert problems and all(p.startswith("gradients: result 0") for p in problems), problems


def test_a_tensor_that_cancels_down_is_judged_on_a_share_of_the_list_scale():
    """A running mean of centred data (0.125 beside gradients of 10): float32 rounding of its terms
    (1e-7 of the list's scale) passes where eager summed in float64; an error of 1e-5 of it does not."""
    want = [torch.tensor([10.0], dtype=torch.float64), torch.tensor([0.125], dtype=torch.float64)]
    eager = [torch.tensor([10.0]), torch.tensor([0.125])]
    assert within_eager_error([torch.tensor([10.0]), torch.tensor([0.125 + 1.5e-7])], eager, want) == []
    assert within_eager_error([torch.tensor([10.0]), torch.tensor([0.125 + 1e-5])], eager, want)
