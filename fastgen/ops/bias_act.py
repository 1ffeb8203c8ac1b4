"""fastgen::bias_act: StyleGAN2's fused bias + activation + gain + clamp, one read and one write.

Eager runs four elementwise kernels (add, activation, multiply, clamp) and allocates a full-size
temporary for each; the kernels do it in one pass. Gradients of any order: the backward is aten
math, so it is differentiable itself (path-length and R1 regularization need second order) and
lowers on XLA. Kernels: csrc/bias_act.{h,cpp,cu} (C++ CPU and CUDA), kernels/bias_act.py (Triton).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.dispatch import _EXT_WHY, _INTERPRET, select
from fastgen.ops._util import check_floating, check_tensor, memory_format, opmath_dtype

# name -> (default alpha, default gain), as StyleGAN2 defines them; the position is the kernels' code
BIAS_ACTS = {
    "linear": (0.0, 1.0),
    "relu": (0.0, math.sqrt(2)),
    "lrelu": (0.2, math.sqrt(2)),
    "tanh": (0.0, 1.0),
    "sigmoid": (0.0, 1.0),
    "elu": (0.0, 1.0),
    "selu": (0.0, 1.0),
    "softplus": (0.0, 1.0),
    "swish": (0.0, math.sqrt(2)),
}
_CODES = {name: i for i, name in enumerate(BIAS_ACTS)}
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
_SOFTPLUS_THRESHOLD = 20.0  # F.softplus's default: above it, softplus(z) = z

_KERNELS = frozenset({"reference", "composite", "cpu", "cuda", "triton"})
_AUTO = {"cpu": ("cpu", "composite"), "cuda": ("cuda", "triton", "composite")}


def bias_act(x: Tensor, b: Tensor | None = None, dim: int = 1, act: str = "linear", alpha: float | None = None,
             gain: float | None = None, clamp: float | None = None, *, backend: str | None = None) -> Tensor:
    """clamp(act(x + b) * gain, -clamp, clamp) in one pass over x. See bias_act_ref."""
    alpha, gain, clamp = _check_bias_act(x, b, dim, act, alpha, gain, clamp)
    name = select("bias_act", x.device, backend, _KERNELS, _AUTO)
    if name == "reference":
        return bias_act_ref(x, b, dim, act, alpha, gain, clamp)
    return torch.ops.fastgen.bias_act(x, b, dim % max(x.dim(), 1), act, alpha, gain, -1.0 if clamp is None else clamp,
                                      name)


def bias_act_ref(x: Tensor, b: Tensor | None = None, dim: int = 1, act: str = "linear", alpha: float | None = None,
                 gain: float | None = None, clamp: float | None = None) -> Tensor:
    """Bias, activation, gain and clamp as StyleGAN2 (torch_utils/ops/bias_act.py) writes them.

    1. x = x + b, b broadcast along dimension `dim`                  (if b is given)
    2. x = act(x, alpha):
         linear  x                      relu     F.relu(x)           lrelu    F.leaky_relu(x, alpha)
         tanh    torch.tanh(x)          sigmoid  torch.sigmoid(x)    elu      F.elu(x)
         selu    F.selu(x)              softplus F.softplus(x)       swish    torch.sigmoid(x) * x
    3. x = x * gain                                                  (if gain != 1)
    4. x = x.clamp(-clamp, clamp)                                    (if clamp is given)

    Args:
        x:     any shape, floating point (NCHW or channels_last for 4-D).
        b:     (x.shape[dim],) or None; x's dtype and device.
        dim:   the dimension b runs along (negative counts from the end).
        act:   one of BIAS_ACTS.
        alpha: lrelu's negative slope; None means the default (0.2). Ignored by the others.
        gain:  None means the activation's default: sqrt(2) for relu, lrelu and swish, else 1.
        clamp: None (no clamping) or >= 0.
    Returns:
        x's shape, dtype and memory format.
    """
    alpha, gain, clamp = _check_bias_act(x, b, dim, act, alpha, gain, clamp)
    if b is not None:
        x = x + b.reshape([-1 if i == dim % x.dim() else 1 for i in range(x.dim())])
    x = _activate(x, act, alpha)
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
    if act not in BIAS_ACTS:
        raise ValueError(f"act must be one of {tuple(BIAS_ACTS)}, got {act!r}")
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
    default_alpha, default_gain = BIAS_ACTS[act]
    return (float(default_alpha if alpha is None else alpha), float(default_gain if gain is None else gain),
            None if clamp is None else float(clamp))


# ---------------------------------------------------------------------------------------------
# the math shared by the composite (XLA) and the backward

def _with_bias(x: Tensor, b: Tensor | None, dim: int) -> Tensor:
    z = x.to(opmath_dtype(x.dtype))
    if b is not None:
        z = z + b.to(z.dtype).reshape([-1 if i == dim else 1 for i in range(x.dim())])
    return z


def _activate(z: Tensor, act: str, alpha: float) -> Tensor:
    if act == "linear":
        return z
    if act == "relu":
        return F.relu(z)
    if act == "lrelu":
        return F.leaky_relu(z, alpha)
    if act == "tanh":
        return torch.tanh(z)
    if act == "sigmoid":
        return torch.sigmoid(z)
    if act == "elu":
        return F.elu(z)
    if act == "selu":
        return F.selu(z)
    if act == "softplus":
        return F.softplus(z)
    return torch.sigmoid(z) * z  # swish


def _activation_grad(z: Tensor, act: str, alpha: float) -> Tensor:
    """d act(z) / dz in differentiable aten ops, with torch's conventions at the kinks (the
    derivative at 0 is the left one for relu, lrelu, elu, selu)."""
    if act == "linear":
        return torch.ones_like(z)
    if act == "relu":
        return (z > 0).to(z.dtype)
    if act == "lrelu":
        return torch.where(z > 0, 1.0, alpha).to(z.dtype)
    if act == "tanh":
        return 1 - torch.tanh(z) ** 2
    if act == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    if act == "elu":
        return torch.where(z > 0, torch.ones_like(z), torch.exp(torch.clamp_max(z, 0)))
    if act == "selu":
        return _SELU_SCALE * torch.where(z > 0, torch.ones_like(z), _SELU_ALPHA * torch.exp(torch.clamp_max(z, 0)))
    if act == "softplus":
        return torch.where(z > _SOFTPLUS_THRESHOLD, torch.ones_like(z), torch.sigmoid(z))
    s = torch.sigmoid(z)  # swish
    return s * (1 + z * (1 - s))


def _bias_act_composite(x, b, dim, act, alpha, gain, clamp):
    y = _activate(_with_bias(x, b, dim), act, alpha) * gain
    if clamp >= 0:
        y = y.clamp(-clamp, clamp)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# kernel launchers: x seen as (outer, C, inner) in memory order, b running along C

def _memory_order(x: Tensor) -> list[int]:
    """x's dimensions outermost first: (0, 2, 3, 1) for channels_last, else in order."""
    return [0, 2, 3, 1] if memory_format(x) == torch.channels_last else list(range(x.dim()))


def _dense(x: Tensor) -> Tensor:
    """x itself when contiguous or channels_last (the kernels walk memory), else a contiguous copy."""
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
    return torch.ops.fastgen._bias_act_fused(x, b, outer, c, inner, _CODES[act], alpha, gain, clamp)


def _bias_act_triton(x, b, dim, act, alpha, gain, clamp):
    import triton

    from fastgen.kernels.bias_act import _bias_act_fwd_kernel

    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise RuntimeError(f"bias_act: the triton backend takes float32/16 and bfloat16, got {x.dtype}")
    x = _dense(x)
    out = torch.empty_like(x)  # the same dense strides as x
    outer, c, inner = _outer_c_inner(x, b, dim)
    block = 1024
    _bias_act_fwd_kernel[(triton.cdiv(x.numel(), block),)](
        x, b if b is not None else x, out, x.numel(), c, inner, alpha, gain, clamp,
        HAS_BIAS=b is not None, ACT=_CODES[act], EMULATE_BF16=x.dtype == torch.bfloat16 and _INTERPRET,
        BLOCK=block)
    return out


_IMPLS = {"composite": _bias_act_composite, "cpu": _bias_act_fused, "cuda": _bias_act_fused,
          "triton": _bias_act_triton}


# ---------------------------------------------------------------------------------------------
# registration

@torch.library.custom_op("fastgen::bias_act", mutates_args=(), device_types=("cpu", "cuda"))
def _bias_act_op(x: Tensor, b: Tensor | None, dim: int, act: str, alpha: float, gain: float, clamp: float,
                 backend: str) -> Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)
    return _IMPLS[backend](x, b, dim, act, alpha, gain, clamp)


@_bias_act_op.register_kernel("xla")
def _bias_act_xla(x, b, dim, act, alpha, gain, clamp, backend):
    return _bias_act_composite(x, b, dim, act, alpha, gain, clamp)


@_bias_act_op.register_fake
def _fake_bias_act(x, b, dim, act, alpha, gain, clamp, backend):
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
        gz = torch.ops.fastgen._bias_act_grad_fused(g, xd, b, *_outer_c_inner(xd, b, dim), _CODES[act], alpha, gain,
                                                    clamp)
    else:
        z = _with_bias(x, b, dim)
        gz = grad.to(z.dtype) * (_activation_grad(z, act, alpha) * gain)
        if clamp >= 0:
            y = _activate(z, act, alpha) * gain
            gz = gz * ((y >= -clamp) & (y <= clamp)).to(gz.dtype)
    gx = gz.to(x.dtype) if ctx.needs_input_grad[0] else None
    gb = None
    if b is not None and ctx.needs_input_grad[1]:
        gb = gz.sum([d for d in range(x.dim()) if d != dim]).to(b.dtype)
    return gx, gb, None, None, None, None, None, None


_bias_act_op.register_autograd(_backward_bias_act, setup_context=_setup_context_bias_act)

if not _EXT_WHY:  # the backward's kernel op, traced by torch.compile's backward graph: its shape rule
    torch.library.register_fake("fastgen::_bias_act_grad_fused")(
        lambda grad, x, b, outer, c, inner, act, alpha, gain, clamp: torch.empty_like(x))
