"""Drop-in layers: the constructor arguments and state_dict keys of the torch layers they replace."""

from fastgen.nn.norm_act import AdaIN, BatchNormAct2d, GroupNormAct, InstanceNormAct2d, PixelNorm
from fastgen.nn.stylegan import BiasAct
from fastgen.nn.upsample_conv import UpsampleConv2d

__all__ = ["AdaIN", "BatchNormAct2d", "BiasAct", "GroupNormAct", "InstanceNormAct2d", "PixelNorm",
           "UpsampleConv2d"]
