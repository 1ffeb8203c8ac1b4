"""Normalization + activation layers: drop-in for the torch norm layer followed by the activation."""

from __future__ import annotations

import torch
from torch import nn

from fastgen.activations import activation_of, check_activation
from fastgen.ops.batch_norm_act import batch_norm_act, update_running_stats
from fastgen.ops.group_norm_act import group_norm_act
from fastgen.ops.instance_norm_act import adaptive_instance_norm, instance_norm_act
from fastgen.ops.pixel_norm import pixel_norm
from fastgen.ops.rms_norm_act import rms_norm_act


class GroupNormAct(nn.GroupNorm):
    """nn.GroupNorm(num_groups, num_channels, eps, affine) then the activation, fused. It is an
    nn.GroupNorm: same arguments first, same parameters and state_dict keys."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: str = "silu", negative_slope: float = 0.01, device=None, dtype=None):
        check_activation(activation, negative_slope)
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = negative_slope

    @classmethod
    def from_modules(cls, norm: nn.GroupNorm, act: nn.Module | None = None) -> "GroupNormAct":
        """Fuse an nn.GroupNorm and the activation layer after it; shares norm's parameters."""
        if not isinstance(norm, nn.GroupNorm):
            raise TypeError(f"norm must be an nn.GroupNorm, got {type(norm).__name__}")
        name, slope = activation_of(act)
        layer = cls(norm.num_groups, norm.num_channels, norm.eps, False, name, slope)
        layer.affine = norm.affine
        layer.weight, layer.bias = norm.weight, norm.bias
        return layer.train(norm.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, self.activation,
                              self.negative_slope)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return f"{super().extra_repr()}, activation={self.activation!r}{slope}"


class InstanceNormAct2d(nn.InstanceNorm2d):
    """nn.InstanceNorm2d(num_features, eps, momentum, affine) then the activation, fused; same
    parameters and state_dict keys. Batch statistics only (track_running_stats=False, torch's
    default)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = False,
                 track_running_stats: bool = False, activation: str = "relu", negative_slope: float = 0.01,
                 device=None, dtype=None):
        if track_running_stats:
            raise NotImplementedError("InstanceNormAct2d uses batch statistics only (track_running_stats=False)")
        check_activation(activation, negative_slope)
        super().__init__(num_features, eps, momentum, affine, False, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        y = instance_norm_act(x.unsqueeze(0) if unbatched else x, self.weight, self.bias, self.eps,
                              self.activation, self.negative_slope)
        return y.squeeze(0) if unbatched else y


class AdaIN(nn.Module):
    """StyleGAN-style adaptive instance norm: a style vector w (N, style_dim) goes through a linear
    layer to a per-channel scale and bias (its bias starts at scale 1, bias 0), which modulate the
    instance-normalized x; then the activation. Fused in one op."""

    def __init__(self, num_features: int, style_dim: int, eps: float = 1e-5, activation: str = "identity",
                 negative_slope: float = 0.01, device=None, dtype=None):
        super().__init__()
        check_activation(activation, negative_slope)
        self.num_features, self.eps = num_features, eps
        self.activation, self.negative_slope = activation, negative_slope
        self.style = nn.Linear(style_dim, 2 * num_features, device=device, dtype=dtype)
        with torch.no_grad():
            self.style.bias[:num_features].fill_(1.0)
            self.style.bias[num_features:].zero_()

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        scale, bias = self.style(w).chunk(2, dim=1)
        return adaptive_instance_norm(x, scale, bias, self.eps, self.activation, self.negative_slope)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, activation={self.activation!r}"


class PixelNorm(nn.Module):
    """ProGAN / StyleGAN pixelwise feature normalization over channels (no parameters)."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_norm(x, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class BatchNormAct2d(nn.BatchNorm2d):
    """nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats) then the activation,
    fused; same parameters, buffers and state_dict keys, the same running-statistics updates
    (momentum=None: cumulative average; num_batches_tracked). sync=True synchronizes the training
    statistics across a torch.distributed process group (default: the world), as nn.SyncBatchNorm."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: str = "relu", negative_slope: float = 0.01,
                 sync: bool = False, process_group=None, device=None, dtype=None):
        check_activation(activation, negative_slope)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.activation, self.negative_slope = activation, negative_slope
        self.sync, self.process_group = sync, process_group

    @classmethod
    def from_modules(cls, norm: nn.BatchNorm2d, act: nn.Module | None = None) -> "BatchNormAct2d":
        """Fuse an nn.BatchNorm2d and the activation layer after it; shares norm's parameters and
        running statistics (and its training mode)."""
        if not isinstance(norm, nn.BatchNorm2d):
            raise TypeError(f"norm must be an nn.BatchNorm2d, got {type(norm).__name__}")
        name, slope = activation_of(act)
        layer = cls(norm.num_features, norm.eps, norm.momentum, False, False, name, slope)
        layer.affine, layer.track_running_stats = norm.affine, norm.track_running_stats
        layer.weight, layer.bias = norm.weight, norm.bias
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            layer._buffers[buffer] = norm._buffers.get(buffer)
        return layer.train(norm.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sync and self.training and _world_size(self.process_group) > 1:
            running_mean, running_var, factor = _bookkeeping(self)
            return self._synchronized(x, running_mean, running_var, factor)
        return batch_norm_act_module(self, x, self.activation, self.negative_slope)

    def _synchronized(self, x, running_mean, running_var, factor):
        """Statistics over the whole group's batch: all-reduced sums, two passes (exact), through
        a differentiable all-reduce (_AllReduceSum) so that gradients see the whole batch."""
        all_reduce = _AllReduceSum.apply
        group = self.process_group or torch.distributed.group.WORLD
        dims = (0, *range(2, x.dim()))
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        sums = all_reduce(torch.cat([xf.sum(dims), xf.new_full((1,), x.numel() // x.shape[1])]), group)
        count, mean = sums[-1], sums[:-1] / sums[-1]
        centered = xf - mean.view(1, -1, *((1,) * (x.dim() - 2)))
        var = all_reduce((centered * centered).sum(dims), group) / count
        if running_mean is not None:
            update_running_stats(running_mean, running_var, mean.detach(), var.detach(), int(count.item()), factor)
        return batch_norm_act(x, mean, var, self.weight, self.bias, False, 0.0, self.eps, self.activation,
                              self.negative_slope)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}, sync={self.sync}"


class _AllReduceSum(torch.autograd.Function):
    """Sum over the process group, differentiable: the gradient of every rank's input is the sum of
    all ranks' output gradients. (torch.distributed.nn.functional.all_reduce did this; torch 2.14
    deprecates it, and the functional collectives it points to have no autograd on torch 2.9.)"""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone()
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _bookkeeping(bn: nn.BatchNorm2d) -> tuple:
    """nn.BatchNorm2d's own bookkeeping, unchanged: counts the batch in training and returns the
    running statistics to read or update (None, None for batch statistics alone) and the factor."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    keep = not bn.training or bn.track_running_stats
    return (bn.running_mean, bn.running_var, factor) if keep else (None, None, factor)


def batch_norm_act_module(bn: nn.BatchNorm2d, x: torch.Tensor, activation: str, negative_slope: float = 0.01):
    """What `activation(bn(x))` computes for an nn.BatchNorm2d `bn` (its modes, running statistics
    and momentum), fused: BatchNormAct2d's forward, and fastgen.convert's for a BatchNorm2d followed
    by an activation."""
    running_mean, running_var, factor = _bookkeeping(bn)
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    return batch_norm_act(x, running_mean, running_var, bn.weight, bn.bias, batch_stats, factor, bn.eps,
                          activation, negative_slope)


def _world_size(group) -> int:
    dist = torch.distributed
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class RMSNormAct(nn.Module):
    """An RMS norm over the channels of an (N, C, *) map, its affine, then the activation, fused
    (fastgen.ops.rms_norm_act). Arguments and state_dict keys (`weight`, `bias`) of diffusers'
    RMSNorm(dim, eps, elementwise_affine, bias), applied over dimension 1 as the video VAEs do;
    clamp=True is F.normalize's form of eps (Wan, QwenImage)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, elementwise_affine: bool = True, bias: bool = False,
                 activation: str = "silu", negative_slope: float = 0.01, clamp: bool = False, device=None,
                 dtype=None):
        super().__init__()
        check_activation(activation, negative_slope)
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        factory = dict(device=device, dtype=dtype)
        self.num_channels, self.eps, self.clamp = num_channels, eps, clamp
        self.elementwise_affine = elementwise_affine
        self.weight = nn.Parameter(torch.ones(num_channels, **factory)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels, **factory)) if elementwise_affine and bias else None
        self.activation, self.negative_slope = activation, negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_act(x, self.weight, self.bias, self.eps, self.activation, self.negative_slope,
                            clamp=self.clamp)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return (f"{self.num_channels}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None}, activation={self.activation!r}{slope}, clamp={self.clamp}")
