"""The benchmark suite interface: one class per op, in fastgen/bench/<op>.py, registered by @suite.

A suite is a class with these attributes (static methods where callable):

    op          the op's name in fastgen.ops.REGISTRY; the fastgen backends timed are its spec's
    cpu_shapes  list[Shape]: real generator layers sized for a 2-core CPU
    gpu_shapes  list[Shape]: the same layers at the sizes GPUs run
                (a Shape with quick=True is in the default run of `python -m fastgen bench`;
                every suite marks exactly one per device)
    names       the names of inputs(shape), in order ("x", "weight", ...)
    grad_of     the positions of the inputs whose gradients fwd+bwd rows compute and check
    inputs(shape)               fresh float32 CPU tensors, x first (the harness casts, lays out and
                                moves them)
    eager(*inputs, shape)       the unfused torch layers: the op's reference, the baseline
    fused(backend)              -> f(*inputs, shape) through the public op with backend= (None: auto)
    work(shape, itemsize)       the least work any implementation must do, forward:
                                {"flops": F} (convolutions, counting the unfused convolution's
                                multiply-adds) or {"bytes": B, "bwd_bytes": B'} (memory-bound ops:
                                the fused minimum of reads and writes, forward and backward)
optional:
    baselines   names of extra static methods (*inputs, shape) timed as providers (e.g. StyleGAN2's
                own formulation)
    backends(shape)             the fastgen backends worth timing at this shape (default: all the
                                spec has); a backend that runs the very same code as another at
                                this shape is left out, so that noise between identical code paths
                                is not read as a difference
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_SUITES: list = []


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    c: int
    h: int
    w: int
    co: int = 0  # output channels (convolutions)
    k: int = 3  # kernel size (convolutions)
    mode: str = "nearest"  # upsampling mode
    scale: int = 2  # upsampling factor
    groups: int = 32  # GroupNorm groups
    activation: str = "silu"
    up: int = 1  # StyleGAN2 resampling
    down: int = 1
    padding: tuple = (0, 0, 0, 0)  # upfirdn2d's (px0, px1, py0, py1)
    gain: float = 1.0
    quick: bool = False  # in the default (quick) run
    t: int = 0  # frames: a video clip (N, C, T, H, W); 0: an image (N, C, H, W)

    @property
    def dims(self) -> tuple[int, ...]:
        return (self.n, self.c, self.t, self.h, self.w) if self.t else (self.n, self.c, self.h, self.w)

    @property
    def elements(self) -> int:
        return self.n * self.c * max(1, self.t) * self.h * self.w


def suite(cls):
    """Registers a benchmark suite (see the module docstring for what it must have)."""
    for attr in ("op", "cpu_shapes", "gpu_shapes", "names", "grad_of", "inputs", "eager", "fused", "work"):
        if not hasattr(cls, attr):
            raise TypeError(f"benchmark suite {cls.__name__} has no {attr!r}")
    for device in ("cpu", "gpu"):
        quick = [s.name for s in getattr(cls, f"{device}_shapes") if s.quick]
        if len(quick) != 1:
            raise TypeError(f"benchmark suite {cls.__name__} marks {quick} quick on {device}; it must mark one")
    _SUITES.append(cls)
    return cls


def generator() -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(0)


def norm_inputs(s: Shape):
    """x, and a per-channel weight near 1 and bias near 0, as trained norm layers have."""
    g = generator()
    return (torch.randn(s.dims, generator=g), 1 + 0.1 * torch.randn(s.c, generator=g),
            0.1 * torch.randn(s.c, generator=g))


def norm_work(s: Shape, itemsize: int) -> dict:
    """A normalization + activation: forward reads x twice (statistics, then normalize) and writes y;
    backward reads x and dy twice (the two per-group sums, then dx) and writes dx."""
    size = s.elements * itemsize
    return {"bytes": 3.0 * size, "bwd_bytes": 5.0 * size}


class NormSuite:
    """What the normalization suites share: x with a per-channel weight and bias, all with gradients."""
    names = ("x", "weight", "bias")
    grad_of = (0, 1, 2)
    inputs = staticmethod(norm_inputs)
    work = staticmethod(norm_work)


def fir_filter() -> torch.Tensor:
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    return torch.outer(f, f) / 64
