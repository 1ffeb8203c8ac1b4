"""fastgen's fused ops. Each is one torch.library custom op under torch.ops.fastgen (or a composition
of them), described by one spec in REGISTRY (fastgen/ops/_registry.py)."""

from fastgen.ops.batch_norm_act import batch_norm_act, batch_norm_act_ref
from fastgen.ops.bias_act import bias_act, bias_act_ref
from fastgen.ops.group_norm_act import group_norm_act, group_norm_act_ref
from fastgen.ops.instance_norm_act import (adaptive_instance_norm, adaptive_instance_norm_ref, instance_norm_act,
                                           instance_norm_act_ref)
from fastgen.ops.modulated_conv2d import modulated_conv2d, modulated_conv2d_ref
from fastgen.ops.pixel_norm import pixel_norm, pixel_norm_ref
from fastgen.ops.rms_norm_act import rms_norm_act, rms_norm_act_ref
from fastgen.ops.upfirdn2d import upfirdn2d, upfirdn2d_ref
from fastgen.ops.upsample_conv2d import upsample_conv2d, upsample_conv2d_ref
from fastgen.ops.upsample_conv3d import upsample_conv3d, upsample_conv3d_ref
from fastgen.ops._registry import REGISTRY  # noqa: E402  (filled by the imports above)

__all__ = ["REGISTRY", *(name for spec in REGISTRY.values() for name in (spec.name, spec.name + "_ref"))]
