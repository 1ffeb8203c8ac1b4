"""fastgen::pixel_norm: ProGAN / StyleGAN's pixelwise feature normalization, one read and one
write of x. Kernels: kernels/pixel_norm.py (Triton), csrc/pixel_norm.{cpp,cu} (schema, CUDA)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastgen.dispatch import _INTERPRET, select
from fastgen.ops._registry import NO_FLOAT64, Example, Impl, OpSpec, call, define
from fastgen.ops._util import check_floating, check_tensor, memory_format, opmath_dtype


def pixel_norm(x: Tensor, eps: float = 1e-8, *, backend: Optional[str] = None) -> Tensor:
    """x / sqrt(mean(x^2 over channels) + eps) at every position. See pixel_norm_ref."""
    _check_pixel_norm(x, eps)
    name = select(SPEC, x, backend)
    if name == "reference":
        return pixel_norm_ref(x, eps)
    return call(SPEC, x, float(eps), name)


def pixel_norm_ref(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Pixel norm as ProGAN and StyleGAN write it.

    1. return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + eps)

    Args:
        x:   (N, C, *) floating point, NCHW or channels_last.
        eps: added to the mean square.
    """
    _check_pixel_norm(x, eps)
    return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + eps)


def _check_pixel_norm(x, eps) -> None:
    check_tensor("x", x)
    check_floating("x", x)
    if x.dim() < 2:
        raise RuntimeError(f"x must be (N, C, *), got shape {tuple(x.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")


def _rms_inverse(x: Tensor, eps: float) -> Tensor:
    xf = x.to(opmath_dtype(x.dtype))
    return torch.rsqrt((xf * xf).mean(1, keepdim=True) + eps)


def _pixel_norm_composite(x, eps):
    return (x.to(opmath_dtype(x.dtype)) * _rms_inverse(x, eps)).to(x.dtype).contiguous(memory_format=memory_format(x))


def _as_nlc(x: Tensor) -> Tensor:
    """x as (N, L, C) with unit stride along L (NCHW) or C (channels_last)."""
    n, c = x.shape[:2]
    if memory_format(x) != torch.contiguous_format:
        return x.movedim(1, -1).reshape(n, -1, c)  # a view
    return x.contiguous().view(n, c, -1).transpose(1, 2)


def _pixel_norm_triton(x, eps):
    import triton

    from fastgen.kernels.pixel_norm import _pixel_norm_fwd_kernel

    out = torch.empty_like(x, memory_format=memory_format(x))
    xv, ov = _as_nlc(x), _as_nlc(out)
    n, length, c = xv.shape
    block_c = triton.next_power_of_2(c)
    block_l = max(1, min(256, 8192 // block_c))
    grid = (n * triton.cdiv(length, block_l),)  # one dimension: y and z stop at 65535
    _pixel_norm_fwd_kernel[grid](xv, ov, length, c, *xv.stride(), *ov.stride(), eps,
                                 EMULATE_BF16=x.dtype == torch.bfloat16 and _INTERPRET,
                                 BLOCK_L=block_l, BLOCK_C=block_c)
    return out


def _pixel_norm_cuda(x, eps):
    return torch.ops.fastgen._pixel_norm_fused(x, eps)


def _fake_pixel_norm(x: Tensor, eps: float, backend: str) -> Tensor:
    _check_pixel_norm(x, eps)
    return torch.empty_like(x, memory_format=memory_format(x))


def _setup_context_pixel_norm(ctx, inputs, output):
    x, eps, _ = inputs
    ctx.save_for_backward(x)
    ctx.eps = eps


def _backward_pixel_norm(ctx, grad: Tensor):
    """y = x r, r = (mean_c x^2 + eps)^(-1/2): dx = r g - x r^3 mean_c(g x). Aten math, so it is
    differentiable itself and lowers on XLA."""
    (x,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None
    r = _rms_inverse(x, ctx.eps)
    xf, g = x.to(r.dtype), grad.to(r.dtype)
    gx = r * g - xf * r ** 3 * (g * xf).mean(1, keepdim=True)
    return gx.to(x.dtype), None, None


SPEC = define(OpSpec(
    name="pixel_norm", public=pixel_norm,
    impls={"composite": Impl(_pixel_norm_composite),
           "triton": Impl(_pixel_norm_triton, NO_FLOAT64),
           "cuda": Impl(_pixel_norm_cuda, kernels=("_pixel_norm_fused",))},
    custom_op=True,
    # On the CPU the composite is the reference's own arithmetic behind a custom op; measured
    # (benchmarks/results/bench-cpu.json), eager is as fast or faster in NCHW, so auto runs it there;
    # channels_last with a backward the composite's own backward takes 4.7 ms where eager's takes 9.6
    # (forward alone: 0.50 vs 0.45 ms)
    auto={"cpu": ("reference", "composite"), "cpu/nhwc": ("composite",)},
    examples=(Example("pixel_norm", lambda: (torch.randn(2, 8, 5, 6),)),),
))
