"""The activations the fused normalization ops end with, in aten ops: value and derivative.

Both are differentiable compositions, so a backward written with `activation_grad` has a backward
itself. The kernels (csrc/, kernels/) implement the same list under the same codes.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("identity", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh")
CODES = {name: i for i, name in enumerate(ACTIVATIONS)}  # the kernels' ACT argument


def check_activation(activation, negative_slope) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise ValueError(f"negative_slope must be a number, got {negative_slope!r}")


def apply_activation(z: Tensor, name: str, negative_slope: float = 0.01) -> Tensor:
    """The torch layer each name stands for (nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.GELU)."""
    if name == "identity":
        return z
    if name == "relu":
        return F.relu(z)
    if name == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if name == "silu":
        return F.silu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_grad(z: Tensor, name: str, negative_slope: float = 0.01) -> Tensor:
    """d activation(z) / dz, elementwise."""
    if name == "identity":
        return torch.ones_like(z)
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "leaky_relu":
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, negative_slope))
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if name == "gelu":
        return 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2)))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    if name == "gelu_tanh":
        k = math.sqrt(2 / math.pi)
        t = torch.tanh(k * (z + 0.044715 * z ** 3))
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_backward(grad: Tensor, z: Tensor, name: str, negative_slope: float = 0.01) -> Tensor:
    """grad * activation'(z) through aten's fused backward kernels (one pass, no temporaries): the
    first-order fast path of the norm ops' backwards; activation_grad is the differentiable form."""
    aten = torch.ops.aten
    if name == "identity":
        return grad
    if name == "relu":
        return aten.threshold_backward(grad, z, 0)
    if name == "leaky_relu":
        return aten.leaky_relu_backward(grad, z, negative_slope, False)
    if name == "silu":
        return aten.silu_backward(grad, z)
    if name in ("gelu", "gelu_tanh"):
        return aten.gelu_backward(grad, z, approximate="tanh" if name == "gelu_tanh" else "none")
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_of(module) -> tuple[str, float]:
    """(name, negative_slope) of a torch activation layer, for fusing it into a norm layer."""
    from torch import nn

    if module is None or isinstance(module, nn.Identity):
        return "identity", 0.01
    if isinstance(module, nn.ReLU):
        return "relu", 0.01
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    if isinstance(module, nn.SiLU):
        return "silu", 0.01
    if isinstance(module, nn.GELU):
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), 0.01
    raise TypeError(f"cannot fuse activation {type(module).__name__}; supported: Identity, ReLU, LeakyReLU, SiLU, GELU")
