"""fastgen::rms_norm_act: a channel RMS norm, its affine and an activation, fused.

The norm of the video VAEs (Wan, QwenImage: `F.normalize(x, dim=1) * sqrt(C) * gamma + bias`; LTX,
HunyuanVideo 1.5: RMSNorm over channels) followed by SiLU. Eager runs it as five to seven passes
over the activation map (norm, clamp, divide, scale, gamma, bias, activation); the fused kernels
read x twice (once from cache) and write once. 4-D and 5-D, contiguous or channels-last. Kernels:
kernels/rms_norm_act.py (Triton), csrc/rms_norm_act.cpp (C++ CPU), csrc/rms_norm_act.cu (CUDA).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.activations import activation as activation_row, check_activation, torch_layer
from fastgen.dispatch import _EXT_WHY, _INTERPRET, select
from fastgen.ops._registry import (EAGER_IN_LOW_PRECISION, KERNELS_FIRST, NO_FLOAT64, Example, Impl, OpSpec, call,
                                   define, on_device)
from fastgen.ops._util import as_ncl, check_affine, check_floating, check_tensor, memory_format, opmath_dtype


def rms_norm_act(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-6,
                 activation: str = "silu", negative_slope: float = 0.01, *, clamp: bool = False,
                 backend: Optional[str] = None) -> Tensor:
    """activation(x / rms_c(x) * weight + bias) in two reads and one write of x. See rms_norm_act_ref."""
    _check_rms_norm_act(x, weight, bias, eps, clamp, activation, negative_slope)
    name = select(SPEC, x, backend)
    if name == "reference":
        return rms_norm_act_ref(x, weight, bias, eps, activation, negative_slope, clamp=clamp)
    return call(SPEC, x, weight, bias, float(eps), bool(clamp), activation_row(activation).name,
                float(negative_slope), name)[0]


def rms_norm_act_ref(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-6,
                     activation: str = "silu", negative_slope: float = 0.01, *, clamp: bool = False) -> Tensor:
    """An RMS norm over the channel dimension, its affine, then an activation, as torch's layers write it.

    1. y = F.rms_norm(x.movedim(1, -1), (C,), weight, eps).movedim(-1, 1)       (nn.RMSNorm over channels)
       clamp: y = F.normalize(x, dim=1, eps=eps * sqrt(C)) * sqrt(C) * weight   (x / max(rms(x), eps))
    2. y = y + bias
    3. return act(y)                 (the torch layer of fastgen.activations: nn.SiLU(), nn.ReLU(), ...)

    Wan's and QwenImage's norm, F.normalize(x, dim=1) * C ** 0.5 * gamma + bias, is clamp=True with
    eps = 1e-12 / C ** 0.5; LTX's RMSNorm over channels is clamp=False.

    Args:
        x:              (N, C, *) floating point; contiguous or channels-last (4-D or 5-D).
        weight, bias:   (C,) or None; x's dtype and device.
        eps:            added to the mean square (clamp: the smallest RMS divided by).
        activation:     a name in fastgen.activations (identity, relu, leaky_relu, silu, gelu, ...).
        negative_slope: for leaky_relu.
        clamp:          F.normalize's form of eps.
    Returns:
        x's shape, dtype and memory format.
    """
    _check_rms_norm_act(x, weight, bias, eps, clamp, activation, negative_slope)
    c = x.shape[1]
    if clamp:
        y = F.normalize(x, dim=1, eps=eps * math.sqrt(c)) * math.sqrt(c)
        if weight is not None:
            y = y * weight.view(-1, *(1,) * (x.dim() - 2))
    else:
        y = F.rms_norm(x.movedim(1, -1), (c,), weight, eps).movedim(-1, 1)
    if bias is not None:
        y = y + bias.view(-1, *(1,) * (x.dim() - 2))
    return torch_layer(activation, negative_slope)(y)


def _check_rms_norm_act(x, weight, bias, eps, clamp, act, negative_slope) -> None:
    check_tensor("x", x)
    check_floating("x", x)
    if x.dim() < 2:
        raise RuntimeError(f"x must be (N, C, *), got shape {tuple(x.shape)}")
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        check_affine(name, t, x, ((c,),))
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if not isinstance(clamp, bool):
        raise TypeError(f"clamp must be a bool, got {type(clamp).__name__}")
    check_activation(act, negative_slope)


def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    return t.view(-1, *(1,) * (x.dim() - 2))


def _inverse_rms(x: Tensor, eps: float, clamp: bool) -> Tensor:
    """r per sample and position, (N, 1, *) in opmath; differentiable in x."""
    xf = x.to(opmath_dtype(x.dtype))
    ms = (xf * xf).mean(1, keepdim=True)
    return 1 / ms.sqrt().clamp_min(eps) if clamp else torch.rsqrt(ms + eps)


def _pre_activation(x: Tensor, r: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """x * r (in r's dtype) and that times weight plus bias."""
    xhat = x.to(r.dtype) * r
    z = xhat if weight is None else xhat * _channel_view(weight, x).to(r.dtype)
    return xhat, (z if bias is None else z + _channel_view(bias, x).to(r.dtype))


def _rms_norm_act_composite(x, weight, bias, eps, clamp, act, slope):
    r = _inverse_rms(x, eps, clamp)
    _, z = _pre_activation(x, r, weight, bias)
    out = activation_row(act).value(z, slope).to(x.dtype).contiguous(memory_format=memory_format(x))
    return out, r.reshape(x.shape[0], -1)


def _rms_norm_act_triton(x, weight, bias, eps, clamp, act, slope):
    import triton

    from fastgen.kernels.rms_norm_act import _rms_norm_act_fwd_kernel

    out = torch.empty_like(x, memory_format=memory_format(x))
    xv, ov = as_ncl(x).transpose(1, 2), as_ncl(out).transpose(1, 2)  # (N, L, C)
    n, length, c = xv.shape
    r = torch.empty((n, length), device=x.device, dtype=torch.float32)
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    block_c = min(32, triton.next_power_of_2(c))
    block_l = max(16, min(128, 2048 // block_c))
    for n0 in range(0, n, _MAX_GRID_Y):  # the grid's y dimension (samples) stops at 65535
        xs, os_, rs = (t[n0:n0 + _MAX_GRID_Y] for t in (xv, ov, r))
        _rms_norm_act_fwd_kernel[(triton.cdiv(length, block_l), xs.shape[0])](
            xs, os_, weight if weight is not None else xs, bias if bias is not None else xs, rs, length, c,
            *xs.stride(), *os_.stride(), 1.0 / c, 0.0 if clamp else eps, eps * eps if clamp else 0.0, slope,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=activation_row(act).code,
            EMULATE_BF16=x.dtype == torch.bfloat16 and _INTERPRET,
            # tiles of up to 32 channels x 64 positions (128 x 8 for few channels), 8 warps: 64-channel
            # tiles spilled 4-16 B in a few fp16 / bf16 variants on sm_80 / sm_90 with 4 or 8 warps, and
            # 256 x 8 tiles 4 B in fp16 softplus with 5 channels on sm_90 (tools/triton_aot.py, cold)
            BLOCK_L=block_l, BLOCK_C=block_c, num_warps=8)
    return out, r


_MAX_GRID_Y = 65535


def _rms_norm_act_backward_triton(grad, x, r, weight, bias, eps, clamp, act_code, slope, need_x):
    import triton

    from fastgen.kernels.rms_norm_act import _rms_norm_act_bwd_kernel

    fmt = memory_format(x)
    dy = grad.contiguous(memory_format=fmt)
    xv, dv = (as_ncl(t).transpose(1, 2) for t in (x, dy))  # (N, L, C)
    n, length, c = xv.shape
    dx = torch.empty_like(x, memory_format=fmt) if need_x else x.new_empty((0,))
    gv = as_ncl(dx).transpose(1, 2) if need_x else xv
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    # half the forward's tile: x, dy and their derivatives live at once
    block_c = min(32, triton.next_power_of_2(c))
    block_l = max(16, min(64, 1024 // block_c))
    blocks = triton.cdiv(length, block_l)
    parts = torch.empty((2, n, blocks, c), device=x.device, dtype=torch.float32)
    r = r.float().contiguous()
    for n0 in range(0, n, _MAX_GRID_Y):
        rows = slice(n0, n0 + _MAX_GRID_Y)
        xs, ds, gs = xv[rows], dv[rows], gv[rows] if need_x else xv[rows]
        _rms_norm_act_bwd_kernel[(blocks, xs.shape[0])](
            ds, xs, gs, weight if weight is not None else xs, bias if bias is not None else xs, r[rows],
            parts[0, rows], parts[1, rows], length, c, *ds.stride(), *xs.stride(), *gs.stride(), 1.0 / c, eps, slope,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=act_code, CLAMP=clamp, NEED_X=need_x,
            EMULATE_BF16=x.dtype == torch.bfloat16 and _INTERPRET, BLOCK_L=block_l, BLOCK_C=block_c, num_warps=8)
    return dx, parts[0].sum((0, 1)), parts[1].sum((0, 1))


def _rms_norm_act_kernel(x, weight, bias, eps, clamp, act, slope):
    """The C++ kernel of x's device: csrc/rms_norm_act.cpp (CPU), csrc/rms_norm_act.cu (CUDA)."""
    return torch.ops.fastgen._rms_norm_act_fused(x, weight, bias, eps, clamp, activation_row(act).code, slope)


# ---------------------------------------------------------------------------------------------
# registration: the op returns y and r (N, L) in opmath, which the first-order backward reads

def _fake_rms_norm_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, clamp: bool,
                       activation: str, negative_slope: float, backend: str) -> tuple[Tensor, Tensor]:
    _check_rms_norm_act(x, weight, bias, eps, clamp, activation, negative_slope)
    n, c = x.shape[:2]
    length = x.numel() // (n * c) if n * c else 0
    return (torch.empty_like(x, memory_format=memory_format(x)),
            x.new_empty((n, length), dtype=opmath_dtype(x.dtype)))


def _setup_context_rms_norm_act(ctx, inputs, output):
    x, weight, bias, eps, clamp, act, slope, backend = inputs
    ctx.save_for_backward(x, weight, bias, output[1])
    ctx.args = (eps, clamp, act, slope, backend)


def _backward_rms_norm_act(ctx, grad: Tensor, _grad_r):
    """xhat = x r, z = xhat w + b, gz = dy act'(z): dw = sum gz xhat, db = sum gz, and with g = gz w,
    dx = r (g - xhat mean_c(g xhat)) where r depends on x (clamp: where rms > eps), else r g. The cpu,
    cuda and triton backends' first-order backward is their fused kernel (two passes, from the forward's
    r: csrc/rms_norm_act.cpp, .cu, kernels/rms_norm_act.py); the composite's is aten math, which lowers
    on XLA and is differentiable itself: under create_graph, r is recomputed from x."""
    x, weight, bias, r = ctx.saved_tensors
    eps, clamp, act, slope, backend = ctx.args
    need = ctx.needs_input_grad
    concrete = not any(isinstance(s, torch.SymInt) for s in x.shape)
    if not torch.is_grad_enabled() and concrete and (backend == "triton" or backend == x.device.type):  # cpu, cuda
        fused = rms_norm_act_backward_triton if backend == "triton" else torch.ops.fastgen._rms_norm_act_backward
        gx, gw, gb = fused(grad, x, r, weight, bias, eps, clamp, activation_row(act).code, slope, need[0])
        return (gx if need[0] else None, gw.to(weight.dtype) if need[1] and weight is not None else None,
                gb.to(bias.dtype) if need[2] and bias is not None else None, None, None, None, None, None)
    r = _inverse_rms(x, eps, clamp) if torch.is_grad_enabled() else r.view(x.shape[0], 1, *x.shape[2:])
    xhat, z = _pre_activation(x, r, weight, bias)
    gz = grad.to(r.dtype) * activation_row(act).grad(z, slope)
    dims = (0, *range(2, x.dim()))
    gw = (gz * xhat).sum(dims).to(weight.dtype) if need[1] and weight is not None else None
    gb = gz.sum(dims).to(bias.dtype) if need[2] and bias is not None else None
    gx = None
    if need[0]:
        g = gz if weight is None else gz * _channel_view(weight, x).to(gz.dtype)
        projection = (g * xhat).mean(1, keepdim=True)
        if clamp:  # r = 1 / eps is constant in x where rms <= eps
            projection = projection * (r * eps < 1)
        gx = (r * (g - xhat * projection)).to(x.dtype).contiguous(memory_format=memory_format(x))
    return gx, gw, gb, None, None, None, None, None


def _fake_backward(grad, x, r, weight, bias, eps, clamp, activation, negative_slope, need_x):
    dx = torch.empty_like(x, memory_format=memory_format(x)) if need_x else x.new_empty((0,))
    stat = x.new_empty((x.shape[1],), dtype=opmath_dtype(x.dtype))
    return dx, stat, torch.empty_like(stat)


@torch.library.custom_op("fastgen::rms_norm_act_backward_triton", mutates_args=())
def rms_norm_act_backward_triton(grad: Tensor, x: Tensor, r: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                                 eps: float, clamp: bool, activation: int, negative_slope: float,
                                 need_x: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The triton backend's first-order backward kernel as one op that torch.compile's backward graph can
    hold (as fastgen::_rms_norm_act_backward holds the C++ one): dx (empty unless need_x), and per channel
    sum(gz * xhat) and sum(gz) in fp32, gz = grad * act'(z)."""
    with on_device(x):
        return _rms_norm_act_backward_triton(grad, x, r, weight, bias, eps, clamp, activation, negative_slope, need_x)


rms_norm_act_backward_triton.register_fake(_fake_backward)
if not _EXT_WHY:  # the C++ backward kernel op, traced by torch.compile's backward graph: its shape rule
    torch.library.register_fake("fastgen::_rms_norm_act_backward")(_fake_backward)


SPEC = define(OpSpec(
    name="rms_norm_act", public=rms_norm_act,
    impls={"composite": Impl(_rms_norm_act_composite), "triton": Impl(_rms_norm_act_triton, NO_FLOAT64),
           "cpu": Impl(_rms_norm_act_kernel, kernels=("_rms_norm_act_fused", "_rms_norm_act_backward")),
           "cuda": Impl(_rms_norm_act_kernel, kernels=("_rms_norm_act_fused", "_rms_norm_act_backward"))},
    custom_op=True,
    auto={**KERNELS_FIRST, **EAGER_IN_LOW_PRECISION},
    examples=(Example("rms_norm_act", lambda: (torch.randn(2, 8, 5, 6), torch.randn(8), torch.randn(8)),
                      grad_of=(0, 1, 2)),
              Example("rms_norm_act_video_clamp", lambda: (torch.randn(1, 6, 3, 4, 5), torch.randn(6)),
                      kwargs={"eps": 1e-12 / 6 ** 0.5, "clamp": True}, grad_of=(0, 1))),
))
