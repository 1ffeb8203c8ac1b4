"""fastgen's fused ops. Each is one torch.library custom op under torch.ops.fastgen."""

from fastgen.ops.group_norm_act import group_norm_act, group_norm_act_ref
from fastgen.ops.upsample_conv import upsample_conv2d, upsample_conv2d_ref

__all__ = ["group_norm_act", "group_norm_act_ref", "upsample_conv2d", "upsample_conv2d_ref"]
