"""Drop-in layers: the constructor arguments and state_dict keys of the torch layers they replace."""

from fastgen.nn.norm_act import AdaIN, BatchNormAct2d, GroupNormAct, InstanceNormAct2d, PixelNorm, RMSNormAct
from fastgen.nn.stylegan import BiasAct, Downsample2dFIR, EqualizedLinear, ModulatedConv2d, Upsample2dFIR
from fastgen.nn.upsample_conv2d import UpsampleConv2d
from fastgen.nn.upsample_conv3d import UpsampleConv3d

__all__ = ["AdaIN", "BatchNormAct2d", "BiasAct", "Downsample2dFIR", "EqualizedLinear", "GroupNormAct",
           "InstanceNormAct2d", "ModulatedConv2d", "PixelNorm", "RMSNormAct", "Upsample2dFIR", "UpsampleConv2d",
           "UpsampleConv3d"]
