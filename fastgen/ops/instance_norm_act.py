"""Instance norm + activation and AdaIN: GroupNorm with one channel per group, so both run on
fastgen::group_norm_act (its per-sample affine is AdaIN's style)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.activations import torch_layer
from fastgen.ops._registry import Example, OpSpec, define
from fastgen.ops._util import check_tensor
from fastgen.ops.group_norm_act import SPEC as GROUP_NORM_ACT
from fastgen.ops.group_norm_act import group_norm_act


def instance_norm_act(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                      eps: float = 1e-5, activation: str = "relu", negative_slope: float = 0.01, *,
                      backend: Optional[str] = None) -> Tensor:
    """activation(instance_norm(x, weight, bias, eps)), fused. See instance_norm_act_ref."""
    _check_one_pixel(x)
    return group_norm_act(x, x.shape[1] if x.dim() > 1 else 1, weight, bias, eps, activation, negative_slope,
                          backend=backend)


def _check_one_pixel(x) -> None:
    check_tensor("x", x)
    if x.dim() > 2 and x.numel() and x[0, 0].numel() == 1:  # F.instance_norm's rule
        raise ValueError(f"Expected more than 1 spatial element when training, got x of shape {tuple(x.shape)}")


def instance_norm_act_ref(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                          eps: float = 1e-5, activation: str = "relu", negative_slope: float = 0.01) -> Tensor:
    """nn.InstanceNorm2d (batch statistics, no running statistics) then the activation.

    1. y = F.instance_norm(x, weight=weight, bias=bias, eps=eps)
    2. return act(y)

    Args:
        x:            (N, C, *) floating point.
        weight, bias: (C,) or None.
    """
    return torch_layer(activation, negative_slope)(F.instance_norm(x, weight=weight, bias=bias, eps=eps))


def adaptive_instance_norm(x: Tensor, style_scale: Tensor, style_bias: Tensor, eps: float = 1e-5,
                           activation: str = "identity", negative_slope: float = 0.01, *,
                           backend: Optional[str] = None) -> Tensor:
    """AdaIN: instance-normalize x, then a per-sample, per-channel affine from the style, then the
    activation, fused. See adaptive_instance_norm_ref."""
    _check_one_pixel(x)
    for name, t in (("style_scale", style_scale), ("style_bias", style_bias)):
        check_tensor(name, t, 2)
        if x.dim() >= 2 and tuple(t.shape) != tuple(x.shape[:2]):
            raise RuntimeError(f"{name} must be (N, C) = {tuple(x.shape[:2])}, got {tuple(t.shape)}")
    return group_norm_act(x, x.shape[1] if x.dim() > 1 else 1, style_scale, style_bias, eps, activation,
                          negative_slope, backend=backend)


def adaptive_instance_norm_ref(x: Tensor, style_scale: Tensor, style_bias: Tensor, eps: float = 1e-5,
                               activation: str = "identity", negative_slope: float = 0.01) -> Tensor:
    """AdaIN (Huang & Belongie 2017; StyleGAN's per-layer style).

    1. y = F.instance_norm(x, eps=eps)
    2. y = y * style_scale[:, :, None, None] + style_bias[:, :, None, None]
    3. return act(y)

    Args:
        x:                       (N, C, *) floating point.
        style_scale, style_bias: (N, C).
    """
    spatial = (1,) * (x.dim() - 2)
    y = F.instance_norm(x, eps=eps) * style_scale.view(*style_scale.shape, *spatial) \
        + style_bias.view(*style_bias.shape, *spatial)
    return torch_layer(activation, negative_slope)(y)


# Compositions on fastgen::group_norm_act: its backends, selected under its name.
define(OpSpec(
    name="instance_norm_act", public=instance_norm_act, impls=GROUP_NORM_ACT.impls,
    auto=GROUP_NORM_ACT.auto,
    examples=(Example("instance_norm_act", lambda: (torch.randn(2, 6, 5, 4), torch.randn(6), torch.randn(6)),
                      grad_of=(0, 1, 2)),),
))
define(OpSpec(
    name="adaptive_instance_norm", public=adaptive_instance_norm, impls=GROUP_NORM_ACT.impls, auto=GROUP_NORM_ACT.auto,
    examples=(Example("adaptive_instance_norm", lambda: (torch.randn(2, 6, 5, 4), torch.randn(2, 6), torch.randn(2, 6)),
                      {"activation": "silu"}, (0, 1, 2)),),
))
