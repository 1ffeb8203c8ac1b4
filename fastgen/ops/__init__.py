"""fastgen's fused ops. Each is one torch.library custom op under torch.ops.fastgen."""

from fastgen.ops.upsample_conv import upsample_conv2d, upsample_conv2d_ref

__all__ = ["upsample_conv2d", "upsample_conv2d_ref"]
