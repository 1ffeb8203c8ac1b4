"""pixel_norm: ProGAN's x * rsqrt(mean(x^2) + eps) vs fastgen (the suite interface: fastgen/bench/suite.py)."""

import torch

from fastgen.bench.suite import Shape, generator, suite
from fastgen.ops.pixel_norm import pixel_norm, pixel_norm_ref


@suite
class PixelNorm:
    op = "pixel_norm"
    # 512- and 256-channel maps, as in the synthesis networks of ProGAN and StyleGAN1
    gpu_shapes = [Shape("stylegan-512x64", 16, 512, 64, 64, quick=True), Shape("stylegan-256x256", 16, 256, 256, 256)]
    cpu_shapes = [Shape("c512-32x32", 4, 512, 32, 32, quick=True)]
    names = ("x",)
    grad_of = (0,)

    @staticmethod
    def inputs(s: Shape):
        return (torch.randn(s.n, s.c, s.h, s.w, generator=generator()),)

    @staticmethod
    def eager(x, s: Shape):
        return pixel_norm_ref(x)

    @staticmethod
    def fused(backend):
        return lambda x, s: pixel_norm(x, backend=backend)

    @staticmethod
    def work(s: Shape, itemsize: int) -> dict:
        # forward: read x, write y (the per-pixel sum stays in registers); backward: read x and dy, write dx
        return {"bytes": 2.0 * s.elements * itemsize, "bwd_bytes": 3.0 * s.elements * itemsize}
