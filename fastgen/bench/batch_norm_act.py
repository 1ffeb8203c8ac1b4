"""batch_norm_act: nn.BatchNorm2d + activation vs fastgen (the suite interface: fastgen/bench/suite.py)."""

from fastgen.bench.suite import NormSuite, Shape, suite
from fastgen.ops.batch_norm_act import batch_norm_act, batch_norm_act_ref


@suite
class BatchNormAct2d(NormSuite):
    op = "batch_norm_act"
    # DCGAN generator BatchNorm + ReLU layers, training mode (batch statistics)
    gpu_shapes = [Shape("dcgan-256x16", 128, 256, 16, 16, activation="relu", quick=True),
                  Shape("dcgan-128x32", 128, 128, 32, 32, activation="relu"),
                  Shape("dcgan-64x64", 128, 64, 64, 64, activation="relu")]
    cpu_shapes = [Shape("dcgan-128x16", 16, 128, 16, 16, activation="relu", quick=True),
                  Shape("dcgan-64x32", 16, 64, 32, 32, activation="relu")]

    @staticmethod
    def eager(x, w, b, s: Shape):
        return batch_norm_act_ref(x, None, None, w, b, True, activation=s.activation)

    @staticmethod
    def fused(backend):
        return lambda x, w, b, s: batch_norm_act(x, None, None, w, b, True, activation=s.activation, backend=backend)
