"""modulated_conv2d: StyleGAN2's modulated convolution vs fastgen (the suite interface: fastgen/bench/suite.py)."""

import torch

from fastgen.bench.suite import Shape, fir_filter, generator, suite
from fastgen.ops.modulated_conv2d import _modulated_conv2d, modulated_conv2d, modulated_conv2d_ref
from fastgen.ops.upfirdn2d import upfirdn2d_ref


@suite
class ModulatedConv2d:
    op = "modulated_conv2d"
    # StyleGAN2 synthesis conv0 (3x3, up 2, fused modconv) and conv1 (3x3) layers. `stylegan2` is
    # StyleGAN2's own formulation: the same fast paths with its plain-torch upfirdn2d
    gpu_shapes = [Shape("sg1024-up-512x64", 16, 512, 64, 64, co=256, up=2, quick=True),
                  Shape("sg1024-up-256x128", 16, 256, 128, 128, co=128, up=2),
                  Shape("sg1024-conv-128x256", 16, 128, 256, 256, co=128)]
    cpu_shapes = [Shape("sg256-up-256x32", 2, 256, 32, 32, co=256, up=2, quick=True),
                  Shape("sg256-up-256x64", 4, 256, 64, 64, co=128, up=2),
                  Shape("sg256-conv-128x128", 4, 128, 128, 128, co=128)]
    names = ("x", "weight", "styles", "filter")
    grad_of = (0, 1, 2)

    @staticmethod
    def inputs(s: Shape):
        g = generator()
        return (torch.randn(s.n, s.c, s.h, s.w, generator=g), torch.randn(s.co, s.c, s.k, s.k, generator=g),
                1 + 0.2 * torch.randn(s.n, s.c, generator=g), fir_filter())

    @staticmethod
    def eager(x, w, styles, f, s: Shape):
        return modulated_conv2d_ref(x, w, styles, True, s.up, s.down, f, s.k // 2, flip_weight=s.up == 1)

    @staticmethod
    def fused(backend):
        return lambda x, w, styles, f, s: modulated_conv2d(x, w, styles, True, s.up, s.down, f, s.k // 2,
                                                           flip_weight=s.up == 1, backend=backend)

    @staticmethod
    def stylegan2(x, w, styles, f, s: Shape):
        return _modulated_conv2d(x, w, styles, True, s.up, s.down, f, (s.k // 2,) * 4, True, s.up == 1,
                                 upfirdn2d_ref)

    baselines = ("stylegan2",)

    @staticmethod
    def backends(s: Shape):
        # without resampling no FIR runs: every backend is the same grouped aten convolution
        return None if s.up > 1 or s.down > 1 else ("composite",)

    @staticmethod
    def work(s: Shape, itemsize: int) -> dict:
        return {"flops": 2.0 * s.n * s.co * s.c * s.k ** 2 * s.h * s.w}
