"""Drop-in layers: the constructor arguments and state_dict keys of the torch layers they replace."""

from fastgen.nn.norm_act import GroupNormAct
from fastgen.nn.upsample_conv import UpsampleConv2d

__all__ = ["GroupNormAct", "UpsampleConv2d"]
