"""fastgen::batch_norm_act: BatchNorm (training or eval) followed by an activation, fused.

Training statistics are returned by the op and folded into the running statistics here, exactly as
F.batch_norm does (momentum, unbiased variance); synchronized statistics across processes are
fastgen.nn.BatchNormAct2d(sync=True), which passes them in. Kernels: kernels/batch_norm_act.py
(Triton), csrc/batch_norm_act.{cpp,cu} (C++ CPU and CUDA).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.activations import activation as activation_row, activation_backward, check_activation, torch_layer
from fastgen.dispatch import _EXT_WHY, _INTERPRET, select
from fastgen.ops._registry import NO_FLOAT64, Example, Impl, OpSpec, call, cpp_impls, define, on_device
from fastgen.ops._util import check_floating, check_tensor, as_ncl, memory_format, opmath_dtype


def batch_norm_act(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                   momentum: float = 0.1, eps: float = 1e-5, activation: str = "relu",
                   negative_slope: float = 0.01, *, backend: Optional[str] = None) -> Tensor:
    """activation(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)),
    fused; in training the running statistics (when given) are updated in place as F.batch_norm
    does. See batch_norm_act_ref."""
    _check_batch_norm_act(x, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                          negative_slope)
    name = select(SPEC, x, backend)
    if name == "reference":
        return batch_norm_act_ref(x, running_mean, running_var, weight, bias, training, momentum, eps,
                                  activation, negative_slope)
    stats = (None, None) if training else (running_mean, running_var)
    out, mean, var = call(SPEC, x, weight, bias, *stats, training, float(eps), activation_row(activation).name,
                          float(negative_slope), name)
    if training and running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum)
    return out


def batch_norm_act_ref(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                       momentum: float = 0.1, eps: float = 1e-5, activation: str = "relu",
                       negative_slope: float = 0.01) -> Tensor:
    """BatchNorm then an activation, the way a user writes the unfused layers.

    1. y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
       training: batch statistics over (N, *) per channel; running_mean and running_var (if given)
       become (1 - momentum) * running + momentum * batch (the variance unbiased).
       eval: the running statistics.
    2. return act(y)                  (the torch layer of fastgen.activations: nn.ReLU(), nn.LeakyReLU(), ...)

    Args:
        x:                          (N, C, *) floating point, NCHW or channels_last.
        running_mean, running_var:  (C,) or None (None needs training=True).
        weight, bias:               (C,) or None.
    """
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return torch_layer(activation, negative_slope)(y)


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: int,
                         momentum: float) -> None:
    """running = (1 - momentum) * running + momentum * batch, the batch variance made unbiased."""
    with torch.no_grad():
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_((var * (count / max(count - 1, 1))).to(running_var.dtype), momentum)


def _check_batch_norm_act(x, running_mean, running_var, weight, bias, training, momentum, eps, act, slope):
    check_tensor("x", x)
    check_floating("x", x)
    if x.dim() < 2:
        raise RuntimeError(f"x must be (N, C, *), got shape {tuple(x.shape)}")
    c = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(name, t)
        if tuple(t.shape) != (c,) or t.device != x.device:
            raise RuntimeError(f"{name} must be a ({c},) tensor on {x.device}, got {tuple(t.shape)} on {t.device}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise RuntimeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are needed when training=False")
    if training and x.numel() // max(c, 1) <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise ValueError(f"momentum must be a number, got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    check_activation(act, slope)


# ---------------------------------------------------------------------------------------------
# composite

def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    return t.view(1, -1, *((1,) * (x.dim() - 2)))


def batch_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over (N, *), two passes in opmath; differentiable."""
    dims = (0, *range(2, x.dim()))
    xf = x.to(opmath_dtype(x.dtype))
    k = xf[0].reshape(x.shape[1], -1)[:, 0]  # each channel's first value: see group_norm_act's _statistics
    mean = k + (xf - _channel_view(k, x)).mean(dims)
    centered = xf - _channel_view(mean, x)
    return mean, (centered * centered).mean(dims)


def _batch_norm_act_composite(x, weight, bias, mean, var, training, eps, act, slope):
    if training:
        mean, var = batch_statistics(x)
    mean, var = mean.to(opmath_dtype(x.dtype)), var.to(opmath_dtype(x.dtype))
    a = torch.rsqrt(var + eps)
    if weight is not None:
        a = a * weight.to(a.dtype)
    # act((x - mean) * a + bias): the mean not folded into the bias (see group_norm_act's composite)
    b = torch.zeros_like(a) if bias is None else bias.to(a.dtype)
    z = torch.addcmul(_channel_view(b, x), x.to(a.dtype) - _channel_view(mean, x), _channel_view(a, x))
    return activation_row(act).value(z, slope).to(x.dtype).contiguous(memory_format=memory_format(x)), mean.clone(), var.clone()


def _batch_norm_act_fused(x, weight, bias, mean, var, training, eps, act, slope):
    """The C++ kernels: CPU ("cpu" backend) or CUDA ("cuda" backend), by x's device."""
    return torch.ops.fastgen._batch_norm_act_fused(x, weight, bias, mean, var, training, eps, activation_row(act).code, slope)


def _tiling(n: int, c: int, length: int, tile: int = 4096) -> tuple[int, int, int, int]:
    """The Triton kernels' tile (rows x channels, about `tile` values) and how the n * length rows are
    split into chunks, one program per chunk and channel block, so that a GPU has enough programs:
    (BLOCK_C, BLOCK_R, chunk, split)."""
    import triton

    block_c = max(2, min(64, triton.next_power_of_2(c)))
    block_r = max(16, min(256, tile // block_c))
    col_blocks = triton.cdiv(c, block_c)
    per_chunk = max(1, triton.cdiv(triton.cdiv(n * length, block_r), max(1, triton.cdiv(512, col_blocks))))
    chunk = per_chunk * block_r
    return block_c, block_r, chunk, triton.cdiv(n * length, chunk)


def _rows_fit_int32(split: int, chunk: int, block_r: int) -> bool:
    """Every row index a program forms (masked ones too) is below 2^31."""
    return split * chunk + block_r < 2 ** 31


def _batch_norm_act_backward_triton(grad, x, mean, var, weight, bias, training, eps, act_code, slope, need_x):
    import triton

    from fastgen.kernels.batch_norm_act import _batch_norm_bwd_dx_kernel, _batch_norm_bwd_sums_kernel

    x = x.contiguous(memory_format=memory_format(x))
    dy = grad.contiguous(memory_format=memory_format(x))
    xv, dv = as_ncl(x), as_ncl(dy)
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    n, c, length = xv.shape
    # half the forward's tile and 4 warps: x, dy and the derivative live at once; with 8 warps ptxas
    # capped a few gelu/softplus variants at 64-80 registers and spilled 4 B (tools/triton_aot.py)
    block_c, block_r, chunk, split = _tiling(n, c, length, tile=2048)
    grid = (split, triton.cdiv(c, block_c))
    sums, sumds = (torch.empty((split, c), device=x.device, dtype=torch.float32) for _ in range(2))
    mean, var = mean.float().contiguous(), var.float().contiguous()
    common = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=act_code, BLOCK_R=block_r,
                  BLOCK_C=block_c, ROWS_FIT_INT32=_rows_fit_int32(split, chunk, block_r), num_warps=4)
    args = (weight if weight is not None else xv, bias if bias is not None else xv, mean, var)
    sizes = (n, c, length, chunk, *xv.stride(), *dv.stride(), eps, slope)
    _batch_norm_bwd_sums_kernel[grid](dv, xv, *args, sums, sumds, *sizes, **common)
    dbeta, sumd = sums.sum(0), sumds.sum(0)
    dx = x.new_empty((0,))
    if need_x:
        dx = torch.empty_like(dy)
        # dx on its own grid (it reads only the totals), a quarter of the forward's tile: half spilled
        # 24-48 B at 32-64 channels NCHW with Triton 3.6, while the sums spilled 4 B at a quarter (3.8)
        block_c, block_r, chunk, split = _tiling(n, c, length, tile=1024)
        grid = (split, triton.cdiv(c, block_c))
        sizes = (n, c, length, chunk, *xv.stride(), *dv.stride(), eps, slope)
        common.update(BLOCK_R=block_r, BLOCK_C=block_c, ROWS_FIT_INT32=_rows_fit_int32(split, chunk, block_r))
        _batch_norm_bwd_dx_kernel[grid](dv, xv, as_ncl(dx), *args, dbeta, sumd, *sizes, 1.0 / (n * length),
                                        TRAINING=training,
                                        EMULATE_BF16=x.dtype == torch.bfloat16 and _INTERPRET, **common)
    return dx, sumd * torch.rsqrt(var + eps), dbeta


def _batch_norm_act_triton(x, weight, bias, mean, var, training, eps, act, slope):
    import triton

    from fastgen.kernels.batch_norm_act import _batch_norm_act_fwd_kernel, _batch_norm_stats_kernel

    out = torch.empty_like(x, memory_format=memory_format(x))
    xv, ov = as_ncl(x), as_ncl(out)
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))  # read as contiguous
    n, c, length = xv.shape
    block_c, block_r, chunk, split = _tiling(n, c, length)
    grid = (split, triton.cdiv(c, block_c))
    mean_out = torch.empty(c, device=x.device, dtype=torch.float32)
    var_out = torch.empty_like(mean_out)
    if training:
        # half the forward's row tile (a divisor of each chunk): at 64 channels NCHW the whole tile spilled
        # 252 B with Triton 3.6 (the GPU machine's; tools/triton_aot.py)
        mean = torch.empty((split, c), device=x.device, dtype=torch.float32)  # partial means, then M2s
        var = torch.empty_like(mean)
        _batch_norm_stats_kernel[grid](xv, mean, var, n, c, length, chunk, *xv.stride(), BLOCK_R=block_r // 2,
                                       BLOCK_C=block_c, ROWS_FIT_INT32=_rows_fit_int32(split, chunk, block_r),
                                       num_warps=4)
    else:
        mean, var = mean.float().contiguous(), var.float().contiguous()
    _batch_norm_act_fwd_kernel[grid](
        xv, ov, weight if weight is not None else xv, bias if bias is not None else xv, mean, var,
        mean_out, var_out, n, c, length, chunk, split, *xv.stride(), *ov.stride(), eps, slope,
        TRAINING=training, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=activation_row(act).code,
        EMULATE_BF16=x.dtype == torch.bfloat16 and _INTERPRET, SPLIT_BLOCK=min(32, triton.next_power_of_2(split)),
        # 8 warps: with 4, the training merge plus a heavy activation (selu, softplus) spilled in bf16
        # (tools/triton_aot.py); with 8 no variant does (128 registers at most)
        BLOCK_R=block_r, BLOCK_C=block_c, ROWS_FIT_INT32=_rows_fit_int32(split, chunk, block_r), num_warps=8)
    return out, mean_out, var_out


# ---------------------------------------------------------------------------------------------
# registration: out, and the statistics used (batch statistics when training), in opmath

def _fake_batch_norm_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Optional[Tensor],
                         var: Optional[Tensor], training: bool, eps: float, activation: str, negative_slope: float,
                         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    stat = x.new_empty((x.shape[1],), dtype=opmath_dtype(x.dtype))
    return torch.empty_like(x, memory_format=memory_format(x)), stat, torch.empty_like(stat)


def _setup_context_batch_norm_act(ctx, inputs, output):
    x, weight, bias, mean, var, training, eps, act, slope, backend = inputs
    if training:  # the batch statistics the op returned, for the first-order fast path
        mean, var = output[1], output[2]
    ctx.save_for_backward(x, weight, bias, mean, var)
    ctx.args = (training, eps, act, slope, backend)


def _backward_batch_norm_act(ctx, grad: Tensor, _grad_mean, _grad_var):
    """Aten math (differentiable, XLA-lowerable). Training: the statistics are recomputed from x and
    differentiated through; otherwise gradients also flow to the given mean and var (the
    synchronized path passes all-reduced statistics that depend on x). A plain first-order backward
    on CPU or CUDA (grad mode off here: no create_graph) that needs no gradient of a given mean or
    var takes the fused kernels of the cpu, cuda and triton backends (two passes from the forward's
    statistics: _backward_fused), or for the composite in training aten's fused BatchNorm kernels;
    neither has a derivative."""
    x, weight, bias, mean, var = ctx.saved_tensors
    training, eps, act, slope, backend = ctx.args
    need = ctx.needs_input_grad
    need_w, need_b = need[1] and weight is not None, need[2] and bias is not None
    first_order = not torch.is_grad_enabled() and x.device.type in ("cpu", "cuda") and not (need[3] or need[4])
    if first_order and backend in ("cpu", "cuda", "triton"):
        gx, gw, gb = _backward_fused(grad, x, weight, bias, mean, var, training, eps, act, slope, need[0], backend)
        return gx, gw if need_w else None, gb if need_b else None, None, None, None, None, None, None, None
    if first_order and training:
        gx, gw, gb = _backward_aten(grad, x, weight, bias, mean, var, eps, act, slope, [need[0], need_w, need_b])
        return gx, gw, gb, None, None, None, None, None, None, None
    op = opmath_dtype(x.dtype)
    dims = (0, *range(2, x.dim()))
    if training:
        mean, var = batch_statistics(x)
    centered = x.to(op) - _channel_view(mean.to(op), x)
    rstd = _channel_view(torch.rsqrt(var.to(op) + eps), x)
    xhat = centered * rstd
    w = None if weight is None else _channel_view(weight.to(op), x)
    z = xhat if w is None else xhat * w
    if bias is not None:
        z = z + _channel_view(bias.to(op), x)
    gz = grad.to(op) * activation_row(act).grad(z, slope)
    gw = (gz * xhat).sum(dims).to(weight.dtype) if need[1] and weight is not None else None
    gb = gz.sum(dims).to(bias.dtype) if need[2] and bias is not None else None
    gxhat = gz if w is None else gz * w
    gx = gmean = gvar = None
    if training:
        if need[0]:
            gx = rstd * (gxhat - gxhat.mean(dims, keepdim=True) - xhat * (gxhat * xhat).mean(dims, keepdim=True))
    else:
        if need[0]:
            gx = gxhat * rstd
        if need[3]:
            gmean = -(gxhat * rstd).sum(dims).to(mean.dtype)
        if need[4]:
            gvar = (-0.5 * gxhat * centered * rstd ** 3).sum(dims).to(var.dtype)
    return (None if gx is None else gx.to(x.dtype)), gw, gb, gmean, gvar, None, None, None, None, None


def _backward_fused(grad, x, weight, bias, mean, var, training, eps, act, slope, need_x, backend):
    """The fused kernels' first-order gradients: pass 1 reduces gz = dy * act'(z) and gz * xhat per
    channel (dbeta, dgamma), pass 2 writes dx (with the statistics' terms in training)."""
    code = activation_row(act).code
    if backend == "triton":
        gx, dgamma, dbeta = batch_norm_act_backward_triton(grad, x, mean, var, weight, bias, training, eps, code, slope,
                                                           need_x)
    else:  # the C++ kernel op itself (no Python custom op around it)
        gx, dgamma, dbeta = torch.ops.fastgen._batch_norm_act_backward(grad, x, mean, var, weight, bias, training, eps,
                                                                       code, slope, need_x)
    gw = None if weight is None else dgamma.to(weight.dtype)
    gb = None if bias is None else dbeta.to(bias.dtype)
    return (gx if need_x else None), gw, gb


@torch.library.custom_op("fastgen::batch_norm_act_backward_triton", mutates_args=())
def batch_norm_act_backward_triton(grad: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                                   bias: Optional[Tensor], training: bool, eps: float, activation: int,
                                   negative_slope: float, need_x: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The triton backend's first-order backward kernels as one op that torch.compile's backward graph
    can hold (as fastgen::_batch_norm_act_backward holds the C++ ones): dx (empty unless need_x), and per
    channel sum(gz * xhat) and sum(gz) in opmath, gz = grad * act'(z); mean and var the forward's."""
    with on_device(x):
        return _batch_norm_act_backward_triton(grad, x, mean, var, weight, bias, training, eps, activation,
                                               negative_slope, need_x)


def _fake_backward(grad, x, mean, var, weight, bias, training, eps, activation, negative_slope, need_x):
    dx = torch.empty_like(x, memory_format=memory_format(x)) if need_x else x.new_empty((0,))
    stat = x.new_empty((x.shape[1],), dtype=opmath_dtype(x.dtype))
    return dx, stat, torch.empty_like(stat)


batch_norm_act_backward_triton.register_fake(_fake_backward)
if not _EXT_WHY:  # the C++ backward kernel op, traced by torch.compile's backward graph: its shape rule
    torch.library.register_fake("fastgen::_batch_norm_act_backward")(_fake_backward)


def _backward_aten(grad, x, weight, bias, mean, var, eps, act, slope, need):
    """First-order training gradients in eager's own kernels, from the forward's batch statistics:
    the pre-activation recomputed in one elementwise pass, the activation's fused backward,
    BatchNorm's fused backward. Eager's backward plus one elementwise pass; not differentiable."""
    aten = torch.ops.aten
    grad = grad.contiguous(memory_format=memory_format(x))
    invstd = torch.rsqrt(var + eps)
    a = invstd if weight is None else invstd * weight
    b = torch.zeros_like(a) if bias is None else bias
    z = torch.addcmul(_channel_view(b, x), x - _channel_view(mean, x), _channel_view(a, x)).to(x.dtype)
    gz = activation_backward(grad, z, act, slope)
    # the statistics are in opmath: the weight joins them (aten's mixed-precision BatchNorm)
    w = None if weight is None else weight.to(mean.dtype)
    gx, gw, gb = aten.native_batch_norm_backward(gz, x, w, None, None, mean, invstd, True, eps, need)
    return gx, (None if gw is None else gw.to(weight.dtype)), (None if gb is None else gb.to(bias.dtype))


SPEC = define(OpSpec(
    name="batch_norm_act", public=batch_norm_act,
    impls={"composite": Impl(_batch_norm_act_composite), "triton": Impl(_batch_norm_act_triton, NO_FLOAT64),
           **cpp_impls(_batch_norm_act_fused, "_batch_norm_act_fused", "_batch_norm_act_backward")},
    custom_op=True,
    launch_empty=True,  # the kernels return NaN statistics for an empty batch
    examples=(Example("batch_norm_act_train", lambda: (torch.randn(4, 6, 5, 4), None, None, torch.randn(6),
                                                       torch.randn(6), True), grad_of=(0, 3, 4)),
              Example("batch_norm_act_eval", lambda: (torch.randn(4, 6, 5, 4), torch.randn(6), torch.rand(6) + 0.5,
                                                      torch.randn(6), torch.randn(6), False), grad_of=(0, 3, 4))),
))
