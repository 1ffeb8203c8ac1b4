"""upfirdn2d: StyleGAN2's FIR resampling vs fastgen (the suite interface: fastgen/bench/suite.py)."""

import torch

from fastgen.bench.suite import Shape, fir_filter, generator, suite
from fastgen.ops.upfirdn2d import upfirdn2d, upfirdn2d_ref


@suite
class Upfirdn2d:
    op = "upfirdn2d"
    # StyleGAN2's three uses: the FIR after an upsampling (transposed) conv, the ToRGB skip
    # upsample of the image, the discriminator's downsample; 1024x1024 and 256x256 configs
    gpu_shapes = [Shape("sg1024-fir-after-up", 16, 128, 257, 257, padding=(1, 1, 1, 1), gain=4.0, quick=True),
                  Shape("sg1024-torgb-up", 16, 3, 512, 512, up=2, padding=(2, 1, 2, 1), gain=4.0),
                  Shape("sg1024-disc-down", 16, 64, 512, 512, down=2, padding=(1, 1, 1, 1))]
    cpu_shapes = [Shape("sg256-fir-after-up", 4, 128, 129, 129, padding=(1, 1, 1, 1), gain=4.0),
                  Shape("sg256-torgb-up", 4, 3, 128, 128, up=2, padding=(2, 1, 2, 1), gain=4.0),
                  Shape("sg256-disc-down", 4, 64, 128, 128, down=2, padding=(1, 1, 1, 1), quick=True)]
    names = ("x", "filter")
    grad_of = (0,)  # the filter is a constant (a buffer in StyleGAN2)

    @staticmethod
    def inputs(s: Shape):
        return torch.randn(s.n, s.c, s.h, s.w, generator=generator()), fir_filter()

    @staticmethod
    def eager(x, f, s: Shape):
        return upfirdn2d_ref(x, f, s.up, s.down, list(s.padding), gain=s.gain)

    @staticmethod
    def fused(backend):
        return lambda x, f, s: upfirdn2d(x, f, s.up, s.down, list(s.padding), gain=s.gain, backend=backend)

    @staticmethod
    def work(s: Shape, itemsize: int) -> dict:
        out = s.n * s.c * ((s.h * s.up + s.padding[2] + s.padding[3] - 3) // s.down) * (
            (s.w * s.up + s.padding[0] + s.padding[1] - 3) // s.down)
        # forward reads x and writes y; backward (upfirdn2d itself, adjoint) reads dy and writes dx
        moved = float(s.elements + out) * itemsize
        return {"bytes": moved, "bwd_bytes": moved}
