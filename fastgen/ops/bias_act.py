"""fastgen::bias_act: StyleGAN2's fused bias + activation + gain + clamp, one read and one write.

Eager runs four elementwise kernels (add, activation, multiply, clamp) and allocates a full-size
temporary for each; the kernels do it in one pass. Gradients of any order: the backward is aten
math, so it is differentiable itself (path-length and R1 regularization need second order) and
lowers on XLA. Kernels: csrc/bias_act.{h,cpp,cu} (C++ CPU and CUDA), kernels/bias_act.py (Triton).
"""

from __future__ import annotations

import math

from typing import Optional

import torch
from torch import Tensor

from fastgen.activations import activation, torch_layer
from fastgen.dispatch import _EXT_WHY, _INTERPRET, select
from fastgen.ops._registry import (EAGER_IN_LOW_PRECISION, KERNELS_FIRST, NO_FLOAT64, Example, Impl, OpSpec, call,
                                   cpp_impls, define)
from fastgen.ops._util import check_floating, check_tensor, memory_format, opmath_dtype


def bias_act(x: Tensor, b: Tensor | None = None, dim: int = 1, act: str = "linear", alpha: float | None = None,
             gain: float | None = None, clamp: float | None = None, *, backend: str | None = None) -> Tensor:
    """clamp(act(x + b) * gain, -clamp, clamp) in one pass over x. See bias_act_ref."""
    alpha, gain, clamp = _check_bias_act(x, b, dim, act, alpha, gain, clamp)
    name = select(SPEC, x, backend)
    if name == "reference":
        return bias_act_ref(x, b, dim, act, alpha, gain, clamp)
    return call(SPEC, x, b, dim % max(x.dim(), 1), activation(act, "act").name, alpha, gain,
                -1.0 if clamp is None else clamp, name)


def bias_act_ref(x: Tensor, b: Tensor | None = None, dim: int = 1, act: str = "linear", alpha: float | None = None,
                 gain: float | None = None, clamp: float | None = None) -> Tensor:
    """Bias, activation, gain and clamp as StyleGAN2 (torch_utils/ops/bias_act.py) writes them.

    1. x = x + b, b broadcast along dimension `dim`                  (if b is given)
    2. x = act(x, alpha), the torch layer of fastgen.activations (StyleGAN2's names are aliases):
         linear   nn.Identity()         relu     nn.ReLU()            lrelu    nn.LeakyReLU(alpha)
         tanh     nn.Tanh()             sigmoid  nn.Sigmoid()         elu      nn.ELU()
         selu     nn.SELU()             softplus nn.Softplus()        swish    nn.SiLU()
         gelu     nn.GELU()             gelu_tanh nn.GELU(approximate="tanh")
    3. x = x * gain                                                  (if gain != 1)
    4. x = x.clamp(-clamp, clamp)                                    (if clamp is given)

    Args:
        x:     any shape, floating point (NCHW or channels_last for 4-D).
        b:     (x.shape[dim],) or None; x's dtype and device.
        dim:   the dimension b runs along (negative counts from the end).
        act:   a name or StyleGAN2 alias in fastgen.activations.
        alpha: lrelu's negative slope; None means the default (0.2). Ignored by the others.
        gain:  None means StyleGAN2's default: sqrt(2) for relu, lrelu and swish, else 1.
        clamp: None (no clamping) or >= 0.
    Returns:
        x's shape, dtype and memory format.
    """
    _check_bias_act(x, b, dim, act, alpha, gain, clamp)
    stylegan2_lrelu = act in ("lrelu", "leaky_relu")  # StyleGAN2's defaults, written out here (the spec)
    alpha = (0.2 if stylegan2_lrelu else 0.0) if alpha is None else alpha
    gain = (math.sqrt(2) if stylegan2_lrelu or act in ("relu", "swish", "silu") else 1.0) if gain is None else gain
    if b is not None:
        x = x + b.reshape([-1 if i == dim % x.dim() else 1 for i in range(x.dim())])
    x = torch_layer(act, alpha)(x)
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def _check_bias_act(x, b, dim, act, alpha, gain, clamp) -> tuple[float, float, float | None]:
    """Validates the arguments; returns (alpha, gain, clamp) with the defaults filled in."""
    check_tensor("x", x)
    check_floating("x", x)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {dim!r}")
    if b is not None and not -x.dim() <= dim < x.dim():  # dim only places b (StyleGAN2 checks it then)
        raise IndexError(f"dim must be in [{-x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, got {dim}")
    row = activation(act, "act")
    if b is not None:
        check_tensor("b", b)
        if b.dim() != 1 or x.dim() == 0 or b.shape[0] != x.shape[dim]:
            raise RuntimeError(f"b must be ({x.shape[dim] if x.dim() else '?'},) for dim={dim}, got {tuple(b.shape)}")
        if b.dtype != x.dtype or b.device != x.device:
            raise RuntimeError(f"b must have x's dtype and device ({x.dtype}, {x.device}), got {b.dtype}, {b.device}")
    for name, v in (("alpha", alpha), ("gain", gain), ("clamp", clamp)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"{name} must be a finite number or None, got {v!r}")
    if clamp is not None and clamp < 0:
        raise ValueError(f"clamp must be >= 0 or None, got {clamp!r}")
    return (float(row.alpha if alpha is None else alpha), float(row.gain if gain is None else gain),
            None if clamp is None else float(clamp))


# ---------------------------------------------------------------------------------------------
# the math shared by the composite (XLA) and the backward

def _with_bias(x: Tensor, b: Tensor | None, dim: int) -> Tensor:
    z = x.to(opmath_dtype(x.dtype))
    if b is not None:
        z = z + b.to(z.dtype).reshape([-1 if i == dim else 1 for i in range(x.dim())])
    return z


def _bias_act_composite(x, b, dim, act, alpha, gain, clamp):
    y = activation(act).value(_with_bias(x, b, dim), alpha) * gain
    if clamp >= 0:
        y = y.clamp(-clamp, clamp)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# kernel launchers: x seen as (outer, C, inner) in memory order, b running along C

def _memory_order(x: Tensor) -> list[int]:
    """x's dimensions outermost first: (0, 2, 3, 1) for channels_last ((0, 2, 3, 4, 1) for
    channels_last_3d), else in order."""
    if memory_format(x) != torch.contiguous_format:
        return [0, *range(2, x.dim()), 1]
    return list(range(x.dim()))


def _dense(x: Tensor) -> Tensor:
    """x itself when contiguous or channels-last (the kernels walk memory), else a contiguous copy."""
    return x.contiguous(memory_format=memory_format(x))


def _outer_c_inner(x: Tensor, b: Tensor | None, dim: int) -> tuple[int, int, int]:
    if b is None or x.dim() == 0:
        return x.numel(), 1, 1
    order = _memory_order(x)
    p = order.index(dim)
    return math.prod(x.shape[d] for d in order[:p]), x.shape[dim], math.prod(x.shape[d] for d in order[p + 1:])


def _bias_act_fused(x, b, dim, act, alpha, gain, clamp):
    """The C++ kernels: CPU ("cpu" backend) or CUDA ("cuda" backend), by x's device."""
    x = _dense(x)
    outer, c, inner = _outer_c_inner(x, b, dim)
    return torch.ops.fastgen._bias_act_fused(x, b, outer, c, inner, activation(act).code, alpha, gain, clamp)


def _bias_act_triton(x, b, dim, act, alpha, gain, clamp):
    import triton

    from fastgen.kernels.bias_act import _bias_act_fwd_kernel

    x = _dense(x)
    out = torch.empty_like(x)  # the same dense strides as x
    outer, c, inner = _outer_c_inner(x, b, dim)
    block = 1024
    _bias_act_fwd_kernel[(triton.cdiv(x.numel(), block),)](
        # b as the kernel indexes it: contiguous
        x, b.contiguous() if b is not None else x, out, x.numel(), c, inner, alpha, gain, clamp,
        HAS_BIAS=b is not None, ACT=activation(act).code, EMULATE_BF16=x.dtype == torch.bfloat16 and _INTERPRET,
        BLOCK=block)
    return out


# ---------------------------------------------------------------------------------------------
# registration (act: the canonical name)

def _fake_bias_act(x: Tensor, b: Optional[Tensor], dim: int, act: str, alpha: float, gain: float, clamp: float,
                   backend: str) -> Tensor:
    _check_bias_act(x, b, dim, act, alpha, gain, None if clamp < 0 else clamp)
    return torch.empty_like(x)


def _setup_context_bias_act(ctx, inputs, output):
    x, b, dim, act, alpha, gain, clamp, backend = inputs
    ctx.save_for_backward(x, b)
    ctx.args = (dim, act, alpha, gain, clamp, backend)


def _backward_bias_act(ctx, grad: Tensor):
    """dy/dz = gain * act'(z) where |y| is inside the clamp (torch.clamp's gradient), z = x + b
    recomputed; db sums dz over every dimension but `dim`. A first-order backward (grad mode off
    here without create_graph) of the cpu and cuda backends is one fused pass (C++); otherwise aten
    math, differentiable to any order and XLA-lowerable."""
    x, b = ctx.saved_tensors
    dim, act, alpha, gain, clamp, backend = ctx.args
    if not torch.is_grad_enabled() and backend in ("cpu", "cuda"):
        xd = _dense(x)
        g = grad if grad.stride() == xd.stride() else torch.empty_like(xd).copy_(grad)  # x's memory order
        gz = torch.ops.fastgen._bias_act_grad_fused(g, xd, b, *_outer_c_inner(xd, b, dim), activation(act).code, alpha,
                                                    gain, clamp)
    else:
        z = _with_bias(x, b, dim)
        row = activation(act)
        gz = grad.to(z.dtype) * (row.grad(z, alpha) * gain)
        if clamp >= 0:
            y = row.value(z, alpha) * gain
            gz = gz * ((y >= -clamp) & (y <= clamp)).to(gz.dtype)
    gx = gz.to(x.dtype) if ctx.needs_input_grad[0] else None
    gb = None
    if b is not None and ctx.needs_input_grad[1]:
        gb = gz.sum([d for d in range(x.dim()) if d != dim]).to(b.dtype)
    return gx, gb, None, None, None, None, None, None


SPEC = define(OpSpec(
    name="bias_act", public=bias_act,
    impls={"composite": Impl(_bias_act_composite), "triton": Impl(_bias_act_triton, NO_FLOAT64),
           **cpp_impls(_bias_act_fused, "_bias_act_fused", "_bias_act_grad_fused")},  # the backward's pass too
    custom_op=True,
    auto={**KERNELS_FIRST, **EAGER_IN_LOW_PRECISION},
    examples=(Example("bias_act_lrelu_clamp", lambda: (torch.randn(2, 8, 5, 6), torch.randn(8)),
                      {"act": "lrelu", "clamp": 1.5}, (0, 1)),
              Example("bias_act_swish", lambda: (torch.randn(2, 8, 5, 6), torch.randn(8)), {"act": "swish"}, (0, 1))),
))

if not _EXT_WHY:  # the backward's kernel op, traced by torch.compile's backward graph: its shape rule
    torch.library.register_fake("fastgen::_bias_act_grad_fused")(
        lambda grad, x, b, outer, c, inner, act, alpha, gain, clamp: torch.empty_like(x))
