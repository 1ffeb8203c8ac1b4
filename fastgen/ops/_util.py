"""Small helpers shared by the op files."""

import torch

from fastgen.dispatch import CHANNELS_LAST, layout


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout an op's output keeps: channels_last (channels_last_3d for 5-D) when the input is
    (strictly) in it."""
    return CHANNELS_LAST[x.dim()] if layout(x) == "nhwc" else torch.contiguous_format


def check_tensor(name: str, t, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise RuntimeError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def check_affine(name: str, t, x: torch.Tensor, shapes: tuple) -> None:
    """A norm's weight or bias: None, or a tensor of x's dtype and device in one of `shapes`."""
    if t is None:
        return
    check_tensor(name, t)
    if t.dtype != x.dtype or t.device != x.device:
        raise RuntimeError(f"{name} must have x's dtype and device ({x.dtype}, {x.device}), got {t.dtype}, {t.device}")
    if tuple(t.shape) not in shapes:
        raise RuntimeError(f"{name} must be {' or '.join(map(str, shapes))}, got {tuple(t.shape)}")


def check_floating(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise RuntimeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: fp32 for fp16 and bf16 (as aten's opmath_type), else dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def as_ncl(x: torch.Tensor) -> torch.Tensor:
    """x as (N, C, L) with unit stride along C (channels_last) or L: a view, a copy only for
    other layouts. The normalization kernels read it through its strides."""
    n, c = x.shape[:2]
    if layout(x) == "nhwc":
        return x.movedim(1, -1).reshape(n, -1, c).transpose(1, 2)
    return x.contiguous().view(n, c, -1)
