"""bias_act: StyleGAN2's bias + activation + gain + clamp vs fastgen (the suite interface: fastgen/bench/suite.py)."""

import torch

from fastgen.bench.suite import Shape, generator, suite
from fastgen.ops.bias_act import bias_act, bias_act_ref


@suite
class BiasAct:
    op = "bias_act"
    # StyleGAN2 synthesis layers (bias + lrelu * sqrt 2, conv_clamp 256): 1024x1024 and 256x256 configs
    gpu_shapes = [Shape("sg1024-128x256", 16, 128, 256, 256, activation="lrelu", quick=True),
                  Shape("sg1024-32x1024", 16, 32, 1024, 1024, activation="lrelu"),
                  Shape("sg256-64x256", 32, 64, 256, 256, activation="lrelu")]
    cpu_shapes = [Shape("sg256-512x64", 1, 512, 64, 64, activation="lrelu", quick=True),
                  Shape("sg256-128x128", 4, 128, 128, 128, activation="lrelu"),
                  Shape("sg256-64x256", 4, 64, 256, 256, activation="lrelu")]
    names = ("x", "bias")
    grad_of = (0, 1)

    @staticmethod
    def inputs(s: Shape):
        g = generator()
        return torch.randn(s.n, s.c, s.h, s.w, generator=g), 0.1 * torch.randn(s.c, generator=g)

    @staticmethod
    def eager(x, b, s: Shape):
        return bias_act_ref(x, b, act=s.activation, clamp=256.0)

    @staticmethod
    def fused(backend):
        return lambda x, b, s: bias_act(x, b, act=s.activation, clamp=256.0, backend=backend)

    @staticmethod
    def work(s: Shape, itemsize: int) -> dict:
        # forward: read x, write y; backward: read y (or x) and dy, write dx
        return {"bytes": 2.0 * s.elements * itemsize, "bwd_bytes": 3.0 * s.elements * itemsize}
