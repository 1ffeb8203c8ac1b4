"""rms_norm_act: Wan's channel RMS norm (F.normalize(x, dim=1) * sqrt(C) * gamma + bias) + SiLU vs
fastgen (the suite interface: fastgen/bench/suite.py)."""

from fastgen.bench.suite import NormSuite, Shape, suite
from fastgen.ops.rms_norm_act import rms_norm_act, rms_norm_act_ref


def _wan_eps(s: Shape) -> float:
    return 1e-12 / s.c ** 0.5  # F.normalize's eps on the norm, as an eps on the RMS


@suite
class RMSNormAct(NormSuite):
    op = "rms_norm_act"
    # Wan 2.1 / 2.2 VAE decoder: 384 channels at 1/8 of 720p, 192 at full 480p resolution; clips of a
    # few latent frames (each decodes to 4 frames)
    gpu_shapes = [
        Shape("wan-384x9x90x160", 1, 384, 90, 160, t=9, quick=True),
        Shape("wan-192x9x480x832", 1, 192, 480, 832, t=9),
    ]
    cpu_shapes = [
        Shape("wan-96x5x64x64", 1, 96, 64, 64, t=5, quick=True),
        Shape("wan-384x3x32x32", 1, 384, 32, 32, t=3),
    ]

    @staticmethod
    def eager(x, w, b, s: Shape):
        return rms_norm_act_ref(x, w, b, _wan_eps(s), s.activation, clamp=True)

    @staticmethod
    def fused(backend):
        return lambda x, w, b, s: rms_norm_act(x, w, b, _wan_eps(s), s.activation, clamp=True, backend=backend)

    @staticmethod
    def work(s: Shape, itemsize: int) -> dict:
        # forward: read x (the second read of a tile hits the cache) and write y; backward as a norm's
        size = s.elements * itemsize
        return {"bytes": 2.0 * size, "bwd_bytes": 5.0 * size}
