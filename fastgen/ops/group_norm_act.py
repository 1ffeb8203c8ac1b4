"""fastgen::group_norm_act: GroupNorm followed by an activation, fused.

Eager reads the activation map three times and writes it twice (statistics, normalize, activate);
the fused kernels read it twice and write it once. The same op serves instance norm (one channel
per group) and AdaIN (per-sample affine): see fastgen/ops/instance_norm_act.py. Kernels:
kernels/group_norm_act.py (Triton), csrc/group_norm_act.{cpp,cu} (C++ CPU and CUDA).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.activations import activation as activation_row, activation_backward, check_activation, torch_layer
from fastgen.dispatch import _EXT_WHY, _INTERPRET, select
from fastgen.ops._registry import (EAGER_IN_LOW_PRECISION, KERNELS_FIRST, NO_FLOAT64, Example, Impl, OpSpec, call,
                                   cpp_impls, define, on_device)
from fastgen.ops._util import as_ncl, check_affine, check_floating, check_tensor, memory_format, opmath_dtype


def group_norm_act(x: Tensor, num_groups: int, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, activation: str = "silu",
                   negative_slope: float = 0.01, *, backend: Optional[str] = None) -> Tensor:
    """activation(group_norm(x, num_groups, weight, bias, eps)) in two reads and one write of x.
    weight and bias are (C,), or (N, C) for a per-sample affine (AdaIN). See group_norm_act_ref."""
    _check_group_norm_act(x, num_groups, weight, bias, eps, activation, negative_slope)
    name = select(SPEC, x, backend)
    if name == "reference":
        return group_norm_act_ref(x, num_groups, weight, bias, eps, activation, negative_slope)
    return call(SPEC, x, num_groups, weight, bias, float(eps), activation_row(activation).name,
                float(negative_slope), name)[0]


def group_norm_act_ref(x: Tensor, num_groups: int, weight: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None, eps: float = 1e-5, activation: str = "silu",
                       negative_slope: float = 0.01) -> Tensor:
    """GroupNorm then an activation, the way a user writes the unfused layers.

    1. y = F.group_norm(x, num_groups, weight, bias, eps)      (nn.GroupNorm)
       per-sample affine: y = F.group_norm(x, num_groups, eps=eps) * weight[n, c] + bias[n, c]
    2. return act(y)                  (the torch layer of fastgen.activations: nn.SiLU(), nn.ReLU(), ...)

    Args:
        x:              (N, C, *) floating point, NCHW or channels_last.
        num_groups:     G, dividing C; statistics over each sample's C/G channels and all positions.
        weight, bias:   (C,) or (N, C) or None; x's dtype and device.
        eps:            added to the (biased) variance.
        activation:     a name in fastgen.activations (identity, relu, leaky_relu, silu, gelu, ...).
        negative_slope: for leaky_relu.
    Returns:
        x's shape, dtype and memory format.
    """
    _check_group_norm_act(x, num_groups, weight, bias, eps, activation, negative_slope)
    if (weight is None or weight.dim() == 1) and (bias is None or bias.dim() == 1):
        y = F.group_norm(x, num_groups, weight, bias, eps)
    else:  # per-sample affine
        y = F.group_norm(x, num_groups, eps=eps)
        spatial = (1,) * (x.dim() - 2)
        if weight is not None:
            y = y * weight.reshape(*weight.shape, *spatial)
        if bias is not None:
            y = y + bias.reshape(*bias.shape, *spatial)
    return torch_layer(activation, negative_slope)(y)


def _check_group_norm_act(x, num_groups, weight, bias, eps, act, negative_slope) -> None:
    check_tensor("x", x)
    check_floating("x", x)
    if x.dim() < 2:
        raise RuntimeError(f"x must be (N, C, *), got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        raise ValueError(f"num_groups must be a positive int dividing the {c} channels, got {num_groups!r}")
    if x.numel() and n * (x.numel() // (n * num_groups)) == 1:  # F.group_norm's own rule (it counts the batch)
        raise ValueError(f"Expected more than 1 value per channel when training, got x of shape {tuple(x.shape)} "
                         f"and num_groups={num_groups}")
    for name, t in (("weight", weight), ("bias", bias)):
        check_affine(name, t, x, ((c,), (n, c)))
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    check_activation(act, negative_slope)


# ---------------------------------------------------------------------------------------------
# composite: statistics in fp32, then one fused multiply-add per element (XLA fuses it with the
# activation into one loop).

def _affine_view(t: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """weight or bias, (C,) or (N, C), broadcastable against x."""
    if t is None:
        return None
    spatial = (1,) * (x.dim() - 2)
    return t.view(-1, *spatial) if t.dim() == 1 else t.view(*t.shape, *spatial)


def _statistics(x: Tensor, num_groups: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """x - mean as (N, G, C/G, *) in opmath, and mean and rstd per (sample, group) as (N, G, 1, ...):
    two passes (on the CPU 7x faster than torch.var_mean's Welford reduction); differentiable in x."""
    xs = x.to(opmath_dtype(x.dtype)).unflatten(1, (num_groups, -1))
    dims = tuple(range(2, xs.dim()))
    # shifted by a sample K of each group: mean = K + mean(x - K) is exact for a constant group (where
    # rstd ~ 1/sqrt(eps) magnifies any error of the mean) and loses nothing to a large offset
    k = xs.flatten(2)[:, :, :1].view(*xs.shape[:2], *(1,) * len(dims))
    mean = k + (xs - k).mean(dims, keepdim=True)
    centered = xs - mean
    return centered, mean, torch.rsqrt((centered * centered).mean(dims, keepdim=True) + eps)


def _normalized(x: Tensor, num_groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """(x - mean) * rstd as (N, G, C/G, *), and rstd."""
    centered, _, rstd = _statistics(x, num_groups, eps)
    return centered * rstd, rstd


def _pre_activation(xhat: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """xhat (N, C, *) times weight plus bias."""
    z = xhat
    if weight is not None:
        z = z * _affine_view(weight, x).to(z.dtype)
    if bias is not None:
        z = z + _affine_view(bias, x).to(z.dtype)
    return z


def _group_norm_act_composite(x, num_groups, weight, bias, eps, act, slope):
    # statistics, then act((x - mean) * a + bias) with a = rstd * weight per (n, c). Not the folded
    # x * a + (bias - mean * a): where a group is (nearly) constant, rstd ~ 1/sqrt(eps) is large and
    # x * a - mean * a cancels badly in fp32 (1e-4 off for a constant group; hypothesis found it)
    _, mean, rstd = _statistics(x, num_groups, eps)
    n, c = x.shape[:2]
    per_channel = lambda t: t.reshape(n, num_groups, 1).expand(n, num_groups, c // num_groups).reshape(n, c)  # noqa: E731
    spatial = (1,) * (x.dim() - 2)
    a = per_channel(rstd)
    if weight is not None:
        a = a * weight.to(a.dtype)
    centred = x.to(a.dtype) - per_channel(mean).view(n, c, *spatial)
    b = torch.zeros((), dtype=a.dtype, device=a.device) if bias is None else bias.to(a.dtype).view(-1, c, *spatial)
    z = torch.addcmul(b, centred, a.view(n, c, *spatial))
    out = activation_row(act).value(z, slope).to(x.dtype).contiguous(memory_format=memory_format(x))
    return out, mean.reshape(n, num_groups), rstd.reshape(n, num_groups)


# ---------------------------------------------------------------------------------------------
# kernel launchers

def _group_norm_act_triton(x, num_groups, weight, bias, eps, act, slope):
    import triton

    from fastgen.kernels.group_norm_act import _group_norm_act_fwd_kernel, _group_norm_stats_kernel

    out = torch.empty_like(x, memory_format=memory_format(x))
    xv, ov = as_ncl(x), as_ncl(out)
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    n, c, length = xv.shape
    block_c, block_l, chunk, split = _tiling(n, c, length, num_groups)
    means = torch.empty((n * num_groups, split), device=x.device, dtype=torch.float32)
    m2s = torch.empty_like(means)
    mean, rstd = (torch.empty((n, num_groups), device=x.device, dtype=torch.float32) for _ in range(2))
    common = dict(BLOCK_C=block_c, BLOCK_L=block_l, CHUNKED=c // num_groups > block_c)
    _group_norm_stats_kernel[(n * num_groups, split)](
        xv, means, m2s, c, length, c // num_groups, chunk, *xv.stride(), **common)
    _group_norm_act_fwd_kernel[(n * num_groups, split)](
        xv, ov, weight if weight is not None else xv, bias if bias is not None else xv, means, m2s, mean, rstd,
        c, length, c // num_groups, chunk, split, *xv.stride(), *ov.stride(),
        _sample_stride(weight), _sample_stride(bias), eps, slope,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=activation_row(act).code, EMULATE_BF16=x.dtype == torch.bfloat16 and _INTERPRET,
        # a tile of up to 4096 values: with 4 warps (32 a thread) a few activations spilled (tools/triton_aot.py)
        SPLIT_P2=triton.next_power_of_2(split), num_warps=8, **common)
    return out, mean, rstd


MAX_BLOCK_C = 64  # channels per tile; a group of more is walked in chunks (512 at once spilled)


def _tiling(n: int, c: int, length: int, num_groups: int, tile: int = 4096) -> tuple[int, int, int, int]:
    """The Triton kernels' tile (channels x positions, about `tile` values) and how each group's
    positions are split into chunks, one program each, so that a GPU has enough programs:
    (BLOCK_C, BLOCK_L, chunk, split)."""
    import triton

    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(c // num_groups))  # more channels: the kernels loop
    block_l = max(16, min(1024, tile // block_c))
    blocks = triton.cdiv(length, block_l)
    per_chunk = max(1, triton.cdiv(blocks, max(1, triton.cdiv(1024, n * num_groups))))
    chunk = per_chunk * block_l
    return block_c, block_l, chunk, triton.cdiv(length, chunk)


def _group_norm_act_backward_triton(grad, x, mean, rstd, weight, bias, act_code, slope, need_x):
    from fastgen.kernels.group_norm_act import _group_norm_bwd_dx_kernel, _group_norm_bwd_sums_kernel

    x = x.contiguous(memory_format=memory_format(x))
    dy = grad.contiguous(memory_format=memory_format(x))
    xv, dv = as_ncl(x), as_ncl(dy)
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    n, c, length = xv.shape
    num_groups = mean.shape[1]
    # a quarter of the forward's tile: x, dy and the derivative live at once (half spilled 4 B at 3
    # channels per group, fp32 NCHW, with Triton 3.6: tools/triton_aot.py)
    block_c, block_l, chunk, split = _tiling(n, c, length, num_groups, tile=1024)
    sums, sumds = (torch.empty((n, c, split), device=x.device, dtype=torch.float32) for _ in range(2))
    mean, rstd = mean.float().contiguous(), rstd.float().contiguous()
    common = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=act_code, BLOCK_C=block_c,
                  BLOCK_L=block_l, CHUNKED=c // num_groups > block_c, num_warps=8)
    args = (weight if weight is not None else xv, bias if bias is not None else xv, mean, rstd)
    sizes = (c, length, c // num_groups, chunk, *xv.stride(), *dv.stride(), _sample_stride(weight),
             _sample_stride(bias), slope)
    _group_norm_bwd_sums_kernel[(n * num_groups, split)](dv, xv, *args, sums, sumds, *sizes, **common)
    dbeta, sumd = sums.sum(2), sumds.sum(2)
    dx = x.new_empty((0,))
    if need_x:
        dx = torch.empty_like(dy)
        _group_norm_bwd_dx_kernel[(n * num_groups, split)](
            dv, xv, as_ncl(dx), *args, dbeta, sumd, *sizes, 1.0 / (c // num_groups * length),
            EMULATE_BF16=x.dtype == torch.bfloat16 and _INTERPRET, **common)
    return dx, sumd * rstd.repeat_interleave(c // num_groups, dim=1), dbeta


def _sample_stride(t: Optional[Tensor]) -> int:
    """Stride of a weight or bias along the batch: 0 for (C,), C for (N, C)."""
    return 0 if t is None or t.dim() == 1 else t.stride(0)


def _group_norm_act_fused(x, num_groups, weight, bias, eps, act, slope):
    """The C++ kernels: CPU ("cpu" backend) or CUDA ("cuda" backend), by x's device."""
    return torch.ops.fastgen._group_norm_act_fused(x, num_groups, weight, bias, eps, activation_row(act).code, slope)


# ---------------------------------------------------------------------------------------------
# registration

# The op returns y and each (sample, group)'s mean and rstd (N, G) in opmath: the first-order
# backward kernels read them instead of recomputing the forward's statistics.

def _fake_group_norm_act(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                         activation: str, negative_slope: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    _check_group_norm_act(x, num_groups, weight, bias, eps, activation, negative_slope)
    stat = x.new_empty((x.shape[0], num_groups), dtype=opmath_dtype(x.dtype))
    return torch.empty_like(x, memory_format=memory_format(x)), stat, torch.empty_like(stat)


def _setup_context_group_norm_act(ctx, inputs, output):
    x, num_groups, weight, bias, eps, act, slope, backend = inputs
    ctx.save_for_backward(x, weight, bias, output[1], output[2])
    ctx.args = (num_groups, eps, act, slope, backend)


def _backward_group_norm_act(ctx, grad: Tensor, _grad_mean, _grad_rstd):
    """A plain first-order backward on CPU or CUDA (grad mode is off here without create_graph) of
    the cpu, cuda and triton backends runs their fused backward kernels from the saved statistics
    (two passes: see _backward_fused); of the composite, aten's fused kernels (_backward_aten). A
    backward that must itself be differentiable (create_graph), runs on XLA or is traced with
    symbolic sizes is aten math with the statistics recomputed from x: double backward works and
    XLA lowers it."""
    x, weight, bias, mean, rstd = ctx.saved_tensors
    num_groups, eps, act, slope, backend = ctx.args
    need = ctx.needs_input_grad
    need_x, need_w, need_b = need[0], need[2] and weight is not None, need[3] and bias is not None
    # symbolic sizes (torch.compile with dynamic shapes): the math route, which inductor fuses anyway;
    # torch 2.9's decomposition of native_group_norm_backward fails there (divmod of a SymInt)
    concrete = not any(isinstance(s, torch.SymInt) for s in x.shape)
    if not torch.is_grad_enabled() and x.device.type in ("cpu", "cuda") and concrete:
        if x.dtype != torch.float64 and x[0].numel() <= _SMALL_GROUP * num_groups:
            # a few values per group: dx is a small difference of large terms, and the statistics
            # saved in float32 lose it (2 values per group: 2e-4 off where eager is 4e-5); in float64
            # from x, as cheap as it is small
            f64 = [None if t is None else t.double() for t in (grad, x, weight, bias)]
            gx, gw, gb = _backward_math(*f64, num_groups, eps, act, slope, need_x, need_w, need_b)
            return (None if gx is None else gx.to(x.dtype), None, None if gw is None else gw.to(weight.dtype),
                    None if gb is None else gb.to(bias.dtype), None, None, None, None)
        if backend in ("cpu", "cuda", "triton"):
            gx, gw, gb = _backward_fused(grad, x, weight, bias, mean, rstd, act, slope, need_x, backend)
            return gx, None, gw if need_w else None, gb if need_b else None, None, None, None, None
        gx, gw, gb = _backward_aten(grad, x, weight, bias, num_groups, eps, act, slope, (need_x, need_w, need_b))
        return gx, None, gw, gb, None, None, None, None
    gx, gw, gb = _backward_math(grad, x, weight, bias, num_groups, eps, act, slope, need_x, need_w, need_b)
    return gx, None, gw, gb, None, None, None, None


_SMALL_GROUP = 32  # values per group (and sample) up to which the first-order backward runs in float64


def _backward_math(grad, x, weight, bias, num_groups, eps, act, slope, need_x, need_w, need_b):
    """The gradients in differentiable aten math, the statistics recomputed from x."""
    xhat5, rstd = _normalized(x, num_groups, eps)
    xhat = xhat5.flatten(1, 2)
    gz = grad.to(xhat.dtype) * activation_row(act).grad(_pre_activation(xhat, x, weight, bias), slope)
    gw = _sum_to(gz * xhat, weight) if need_w else None
    gb = _sum_to(gz, bias) if need_b else None
    gx = None
    if need_x:
        gxhat = gz if weight is None else gz * _affine_view(weight, x).to(gz.dtype)
        gxhat, xh = gxhat.unflatten(1, (num_groups, -1)), xhat5
        dims = tuple(range(2, xh.dim()))
        gx = rstd * (gxhat - gxhat.mean(dims, keepdim=True) - xh * (gxhat * xh).mean(dims, keepdim=True))
        gx = gx.flatten(1, 2).to(x.dtype)
    return gx, gw, gb


def _backward_fused(grad, x, weight, bias, mean, rstd, act, slope, need_x, backend):
    """The fused kernels' first-order gradients: pass 1 reduces gz = dy * act'(z) and gz * xhat per
    (sample, channel), pass 2 writes dx; dgamma and dbeta are pass 1's sums (summed over the batch
    for a per-channel affine)."""
    code = activation_row(act).code
    if backend == "triton":
        gx, dgamma, dbeta = group_norm_act_backward_triton(grad, x, mean, rstd, weight, bias, code, slope, need_x)
    else:  # the C++ kernel op itself (17 us less per call than through a Python custom op)
        gx, dgamma, dbeta = torch.ops.fastgen._group_norm_act_backward(grad, x, mean, rstd, weight, bias, code, slope,
                                                                       need_x)
    gw = None if weight is None else (dgamma.sum(0) if weight.dim() == 1 else dgamma).to(weight.dtype)
    gb = None if bias is None else (dbeta.sum(0) if bias.dim() == 1 else dbeta).to(bias.dtype)
    return (gx if need_x else None), gw, gb


@torch.library.custom_op("fastgen::group_norm_act_backward_triton", mutates_args=())
def group_norm_act_backward_triton(grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                                   bias: Optional[Tensor], activation: int, negative_slope: float,
                                   need_x: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The triton backend's first-order backward kernels as one op that torch.compile's backward graph
    can hold (as fastgen::_group_norm_act_backward holds the C++ ones): dx (empty unless need_x), and per
    (sample, channel) sum(gz * xhat) and sum(gz) in opmath, gz = grad * act'(z)."""
    with on_device(x):
        return _group_norm_act_backward_triton(grad, x, mean, rstd, weight, bias, activation, negative_slope, need_x)


def _fake_backward(grad, x, mean, rstd, weight, bias, activation, negative_slope, need_x):
    dx = torch.empty_like(x, memory_format=memory_format(x)) if need_x else x.new_empty((0,))
    stat = x.new_empty(tuple(x.shape[:2]), dtype=opmath_dtype(x.dtype))
    return dx, stat, torch.empty_like(stat)


group_norm_act_backward_triton.register_fake(_fake_backward)
if not _EXT_WHY:  # the C++ backward kernel op, traced by torch.compile's backward graph: its shape rule
    torch.library.register_fake("fastgen::_group_norm_act_backward")(_fake_backward)


def _sum_to(t: Tensor, like: Tensor) -> Tensor:
    """t (N, C, *) summed over what `like` ((C,) or (N, C)) broadcasts over."""
    spatial = tuple(range(2, t.dim()))
    return t.sum((0, *spatial) if like.dim() == 1 else spatial).to(like.dtype)


def _backward_aten(grad, x, weight, bias, num_groups, eps, act, slope, need):
    """First-order gradients in eager's own kernels: the GroupNorm forward recomputed (it gives the
    pre-activation and the statistics), the activation's fused backward, GroupNorm's fused backward.
    Three passes with two temporaries, as eager's backward plus one forward; not differentiable."""
    aten = torch.ops.aten
    n, c = x.shape[:2]
    positions = x.numel() // max(1, n * c)
    grad = grad.contiguous(memory_format=memory_format(x))
    if all(t is None or t.dim() == 1 for t in (weight, bias)):  # per-channel affine: aten does it all
        z, mean, rstd = aten.native_group_norm(x, weight, bias, n, c, positions, num_groups, eps)
        gz = activation_backward(grad, z, act, slope)
        return aten.native_group_norm_backward(gz, x, mean, rstd, weight, n, c, positions, num_groups, list(need))
    # per-sample affine (AdaIN): the affine and its gradients here, the normalization in aten
    xhat, mean, rstd = aten.native_group_norm(x, None, None, n, c, positions, num_groups, eps)
    gz = activation_backward(grad, _pre_activation(xhat, x, weight, bias), act, slope)
    gw = _sum_to(gz * xhat, weight) if need[1] else None
    gb = _sum_to(gz, bias) if need[2] else None
    gx = None
    if need[0]:
        gxhat = gz if weight is None else gz * _affine_view(weight, x)
        gx = aten.native_group_norm_backward(gxhat, x, mean, rstd, None, n, c, positions, num_groups,
                                             [True, False, False])[0]
    return gx, gw, gb


SPEC = define(OpSpec(
    name="group_norm_act", public=group_norm_act,
    impls={"composite": Impl(_group_norm_act_composite), "triton": Impl(_group_norm_act_triton, NO_FLOAT64),
           **cpp_impls(_group_norm_act_fused, "_group_norm_act_fused", "_group_norm_act_backward")},
    custom_op=True,
    auto={**KERNELS_FIRST, **EAGER_IN_LOW_PRECISION},
    examples=(Example("group_norm_act", lambda: (torch.randn(2, 8, 5, 6), 4, torch.randn(8), torch.randn(8)),
                      grad_of=(0, 2, 3)),),
))
