"""upsample_conv2d: nn.Upsample + nn.Conv2d vs fastgen (the suite interface: fastgen/bench/suite.py)."""

import math

import torch

from fastgen.bench.suite import Shape, generator, suite
from fastgen.ops.upsample_conv2d import upsample_conv2d, upsample_conv2d_ref


@suite
class UpsampleConv2d:
    op = "upsample_conv2d"
    # Real generator layers. SD-VAE decoder: Upsample2D (nearest 2x + 3x3 conv) at 64, 128, 256.
    gpu_shapes = [
        Shape("sdvae-up1", 1, 512, 64, 64, co=512, quick=True),
        Shape("sdvae-up2", 1, 512, 128, 128, co=512),
        Shape("sdvae-up3", 1, 256, 256, 256, co=256),
        Shape("dcgan-up", 64, 256, 16, 16, co=128),
        Shape("sdvae-up2-bilinear", 1, 512, 128, 128, co=512, mode="bilinear"),
    ]
    cpu_shapes = [
        Shape("c128-64x64", 1, 128, 64, 64, co=128),
        Shape("dcgan-up", 16, 256, 8, 8, co=128, quick=True),
        Shape("c64-32x32-bilinear", 1, 64, 32, 32, co=64, mode="bilinear"),
    ]
    names = ("x", "weight", "bias")
    grad_of = (0, 1, 2)

    @staticmethod
    def inputs(s: Shape):
        g = generator()
        return (torch.randn(s.n, s.c, s.h, s.w, generator=g),
                torch.randn(s.co, s.c, s.k, s.k, generator=g) / math.sqrt(s.c * s.k ** 2),
                torch.randn(s.co, generator=g))

    @staticmethod
    def eager(x, w, b, s: Shape):
        return upsample_conv2d_ref(x, w, b, scale_factor=s.scale, mode=s.mode)

    @staticmethod
    def fused(backend):
        return lambda x, w, b, s: upsample_conv2d(x, w, b, scale_factor=s.scale, mode=s.mode, backend=backend)

    @staticmethod
    def work(s: Shape, itemsize: int) -> dict:
        return {"flops": 2.0 * s.n * s.co * s.c * s.k ** 2 * s.h * s.w * s.scale ** 2}
