"""group_norm_act: nn.GroupNorm + activation vs fastgen (the suite interface: fastgen/bench/suite.py)."""

from fastgen.bench.suite import NormSuite, Shape, suite
from fastgen.ops.group_norm_act import group_norm_act, group_norm_act_ref


@suite
class GroupNormAct(NormSuite):
    op = "group_norm_act"
    # SD-VAE decoder GroupNorm(32) + SiLU at its largest maps; a batch; instance norm + ReLU
    # (style transfer), which runs on the same op with one channel per group; a video clip
    gpu_shapes = [
        Shape("sdvae-512x128", 1, 512, 128, 128, quick=True),
        Shape("sdvae-512x256", 1, 512, 256, 256),
        Shape("sdvae-256x512", 1, 256, 512, 512),
        Shape("batch-64x64x64", 32, 64, 64, 64),
        Shape("instance-norm-256x128", 8, 256, 128, 128, groups=256, activation="relu"),  # G = C
        Shape("video-512x16x180x320", 1, 512, 180, 320, t=16),  # a video VAE's decoder (HunyuanVideo, CogVideoX)
    ]
    cpu_shapes = [
        Shape("c256-64x64", 1, 256, 64, 64, quick=True),
        Shape("c128-128x128", 1, 128, 128, 128),
        Shape("batch-8x64x32", 8, 64, 32, 32),
        Shape("batch-8x128x32", 8, 128, 32, 32),
        Shape("instance-norm-64x32", 8, 64, 32, 32, groups=64, activation="relu"),  # G = C
        Shape("video-128x5x32x32", 1, 128, 32, 32, t=5),  # a video VAE's decoder, reduced
    ]

    @staticmethod
    def eager(x, w, b, s: Shape):
        return group_norm_act_ref(x, s.groups, w, b, activation=s.activation)

    @staticmethod
    def fused(backend):
        return lambda x, w, b, s: group_norm_act(x, s.groups, w, b, activation=s.activation, backend=backend)
