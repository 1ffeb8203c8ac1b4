"""upsample_conv3d: the video VAEs' (upsampling +) causal 3-D convolution vs fastgen (the suite
interface: fastgen/bench/suite.py). `scale` upsamples every axis (1: Wan's causal convolutions);
`padding` is F.pad's six (causal: time at the front only)."""

import math

import torch

from fastgen.bench.suite import Shape, generator, suite
from fastgen.ops.upsample_conv3d import upsample_conv3d, upsample_conv3d_ref

CAUSAL = (1, 1, 1, 1, 2, 0)


@suite
class UpsampleConv3d:
    op = "upsample_conv3d"
    # Wan 2.1 decoder: causal 3x3x3 convolutions at 384 channels (1/8 of 480p) and 96 (full size);
    # HunyuanVideo's 2x2x2 upsampler at 512 channels
    gpu_shapes = [
        Shape("wan-causal-384x6x60x104", 1, 384, 60, 104, t=6, co=384, scale=1, padding=CAUSAL, quick=True),
        Shape("wan-causal-96x9x480x832", 1, 96, 480, 832, t=9, co=96, scale=1, padding=CAUSAL),
        Shape("hunyuan-up2-512x5x45x80", 1, 512, 45, 80, t=5, co=512, scale=2, padding=CAUSAL),
    ]
    cpu_shapes = [
        Shape("wan-causal-64x3x32x32", 1, 64, 32, 32, t=3, co=64, scale=1, padding=CAUSAL, quick=True),
        Shape("hunyuan-up2-64x3x16x16", 1, 64, 16, 16, t=3, co=64, scale=2, padding=CAUSAL),
    ]
    names = ("x", "weight", "bias")
    grad_of = (0, 1, 2)

    @staticmethod
    def inputs(s: Shape):
        g = generator()
        return (torch.randn(s.dims, generator=g),
                torch.randn(s.co, s.c, s.k, s.k, s.k, generator=g) / math.sqrt(s.c * s.k ** 3),
                torch.randn(s.co, generator=g))

    @staticmethod
    def eager(x, w, b, s: Shape):
        return upsample_conv3d_ref(x, w, b, s.scale, s.padding)

    @staticmethod
    def fused(backend):
        return lambda x, w, b, s: upsample_conv3d(x, w, b, s.scale, s.padding, backend=backend)

    @staticmethod
    def work(s: Shape, itemsize: int) -> dict:
        return {"flops": 2.0 * s.n * s.co * s.c * s.k ** 3 * s.t * s.h * s.w * s.scale ** 3}
