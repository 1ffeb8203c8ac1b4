"""The one activation table: every activation a fastgen op ends with, in one place.

Each row: the canonical name (torch's), the names StyleGAN2 uses for it, the numeric code the
kernels take (csrc/activation.h, kernels/activation.py; tests/test_activations.py pins every code
in all three against torch), the torch layer a user writes (the references use it and nothing
else), the value and derivative in differentiable aten math (the composites and the backwards),
aten's fused backward where it has one, and StyleGAN2's default alpha and gain (bias_act).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
_SOFTPLUS_THRESHOLD = 20.0  # F.softplus's default: above it, softplus(z) = z
_SQRT2 = math.sqrt(2)


@dataclass(frozen=True)
class Activation:
    name: str                                        # canonical: torch's name
    code: int                                        # the kernels' ACT argument
    aliases: tuple[str, ...]                         # StyleGAN2's names for it
    layer: Callable[[float], nn.Module]              # alpha -> the torch layer (the references' spec)
    value: Callable[[Tensor, float], Tensor]         # (z, alpha) -> act(z), aten math
    grad: Callable[[Tensor, float], Tensor]          # (z, alpha) -> act'(z), differentiable aten math
    fused_backward: Optional[Callable[[Tensor, Tensor, float], Tensor]]  # (grad, z, alpha): aten's kernel
    alpha: float = 0.0                               # StyleGAN2's default alpha (lrelu's slope)
    gain: float = 1.0                                # StyleGAN2's default gain


def _where_positive(z: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    return torch.where(z > 0, pos, neg)


def _sigmoid_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s)


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _gelu_grad(z: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(z * (1 / _SQRT2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _gelu_tanh_grad(z: Tensor) -> Tensor:
    k = math.sqrt(2 / math.pi)
    t = torch.tanh(k * (z + 0.044715 * z ** 3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z)


def _exp_negative(z: Tensor) -> Tensor:
    """exp(min(z, 0)): the negative branch of elu/selu's derivative, never overflowing."""
    return torch.exp(torch.clamp_max(z, 0))


_ROWS = [
    Activation("identity", 0, ("linear",), lambda a: nn.Identity(), lambda z, a: z,
               lambda z, a: torch.ones_like(z), lambda g, z, a: g),
    Activation("relu", 1, (), lambda a: nn.ReLU(), lambda z, a: F.relu(z),
               lambda z, a: (z > 0).to(z.dtype), lambda g, z, a: torch.ops.aten.threshold_backward(g, z, 0),
               gain=_SQRT2),
    Activation("leaky_relu", 2, ("lrelu",), lambda a: nn.LeakyReLU(a), lambda z, a: F.leaky_relu(z, a),
               lambda z, a: _where_positive(z, torch.ones_like(z), torch.full_like(z, a)),
               lambda g, z, a: torch.ops.aten.leaky_relu_backward(g, z, a, False), alpha=0.2, gain=_SQRT2),
    Activation("silu", 3, ("swish",), lambda a: nn.SiLU(), lambda z, a: F.silu(z), lambda z, a: _silu_grad(z),
               lambda g, z, a: torch.ops.aten.silu_backward(g, z), gain=_SQRT2),
    Activation("gelu", 4, (), lambda a: nn.GELU(), lambda z, a: F.gelu(z), lambda z, a: _gelu_grad(z),
               lambda g, z, a: torch.ops.aten.gelu_backward(g, z, approximate="none")),
    Activation("gelu_tanh", 5, (), lambda a: nn.GELU(approximate="tanh"), lambda z, a: F.gelu(z, approximate="tanh"),
               lambda z, a: _gelu_tanh_grad(z), lambda g, z, a: torch.ops.aten.gelu_backward(g, z, approximate="tanh")),
    Activation("tanh", 6, (), lambda a: nn.Tanh(), lambda z, a: torch.tanh(z),
               lambda z, a: 1 - torch.tanh(z) ** 2, None),
    Activation("sigmoid", 7, (), lambda a: nn.Sigmoid(), lambda z, a: torch.sigmoid(z),
               lambda z, a: _sigmoid_grad(z), None),
    Activation("elu", 8, (), lambda a: nn.ELU(), lambda z, a: F.elu(z),
               lambda z, a: _where_positive(z, torch.ones_like(z), _exp_negative(z)), None),
    Activation("selu", 9, (), lambda a: nn.SELU(), lambda z, a: F.selu(z),
               lambda z, a: _SELU_SCALE * _where_positive(z, torch.ones_like(z), _SELU_ALPHA * _exp_negative(z)),
               None),
    Activation("softplus", 10, (), lambda a: nn.Softplus(), lambda z, a: F.softplus(z),
               lambda z, a: _where_positive(z - _SOFTPLUS_THRESHOLD, torch.ones_like(z), torch.sigmoid(z)), None),
]

ACTIVATIONS: dict[str, Activation] = {row.name: row for row in _ROWS}
_BY_ANY_NAME = {name: row for row in _ROWS for name in (row.name, *row.aliases)}
NAMES = tuple(_BY_ANY_NAME)  # every accepted name, canonical ones first in code order, then aliases


def activation(name: str, argname: str = "activation") -> Activation:
    """The table's row for a canonical name or a StyleGAN2 alias; ValueError naming `argname` otherwise."""
    row = _BY_ANY_NAME.get(name) if isinstance(name, str) else None
    if row is None:
        raise ValueError(f"{argname} must be one of {NAMES}, got {name!r}")
    return row


def check_activation(name, alpha, argname: str = "activation", alphaname: str = "negative_slope") -> Activation:
    """Validates an activation name and its alpha (a finite number); returns its row."""
    row = activation(name, argname)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{alphaname} must be a finite number, got {alpha!r}")
    return row


def torch_layer(name: str, alpha: float = 0.01) -> nn.Module:
    """The torch layer a user writes for this activation (nn.SiLU(), nn.LeakyReLU(alpha), ...)."""
    return activation(name).layer(alpha)


def activation_backward(grad: Tensor, z: Tensor, name: str, alpha: float) -> Tensor:
    """grad * act'(z): aten's fused backward kernel where aten has one (one pass, no temporaries;
    not differentiable), else the aten math."""
    row = activation(name)
    if row.fused_backward is not None:
        return row.fused_backward(grad, z, alpha)
    return grad * row.grad(z, alpha)


def activation_of(module) -> tuple[str, float]:
    """(name, alpha) of a torch activation layer, for fusing it into a fastgen layer; TypeError when
    the layer is not in the table with its default arguments (the table's layer must rebuild it)."""
    if module is None:
        return "identity", 0.01
    for row in _ROWS:
        alpha = float(getattr(module, "negative_slope", 0.01))
        twin = row.layer(alpha)
        if type(module) is type(twin) and _same_arguments(module, twin):
            return row.name, alpha
    raise TypeError(f"cannot fuse activation {module!r}; supported: "
                    + ", ".join(repr(row.layer(0.01)) for row in _ROWS))


def _same_arguments(a: nn.Module, b: nn.Module) -> bool:
    """Two activation layers of one class compute the same function (their settings agree;
    `inplace` does not change the value)."""
    keys = {k for k in vars(a) if not k.startswith("_") and k not in ("training", "inplace")}
    return all(getattr(a, k) == getattr(b, k, None) for k in keys)
