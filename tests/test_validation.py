"""Bad input, one table: every op rejects it in its public function's checks (before choosing a
backend, so before any kernel), with the error class torch raises for the same mistake in the unfused
layers where torch has one, and a message that names the argument."""

import re

import pytest
import torch
import torch.nn.functional as F

from fastgen import ops
from fastgen.ops.upfirdn2d import setup_filter


def x4(*shape, dtype=torch.float32):
    return torch.randn(*shape or (2, 8, 6, 6)).to(dtype)


C = 8
W, B = torch.randn(C), torch.randn(C)
CONV_W = torch.randn(4, C, 3, 3)
FIR = setup_filter([1, 3, 3, 1])
INT_X = torch.ones(2, C, 6, 6, dtype=torch.int64)
MISMATCH = torch.randn(C, dtype=torch.float64)

# (case id, the fastgen call, the argument the message names, the unfused torch call for the same
# mistake (its error class is the one expected) or an error class where torch has no such call)
CASES = [
    # group_norm_act (and the layers on it)
    ("gn-rank", lambda: ops.group_norm_act(torch.randn(4), 2), "x", lambda: F.group_norm(torch.randn(4), 2)),
    ("gn-int", lambda: ops.group_norm_act(INT_X, 2), "x", lambda: F.group_norm(INT_X, 2)),
    ("gn-groups", lambda: ops.group_norm_act(x4(), 3), "num_groups", ValueError),  # nn.GroupNorm's class
    ("gn-one-value", lambda: ops.group_norm_act(x4(1, C, 1, 1), C), "x", lambda: F.group_norm(x4(1, C, 1, 1), C)),
    ("in-one-pixel", lambda: ops.instance_norm_act(x4(2, C, 1, 1)), "x", lambda: F.instance_norm(x4(2, C, 1, 1))),
    ("adain-one-pixel", lambda: ops.adaptive_instance_norm(x4(2, C, 1, 1), torch.randn(2, C), torch.randn(2, C)),
     "x", lambda: F.instance_norm(x4(2, C, 1, 1))),
    ("gn-weight-shape", lambda: ops.group_norm_act(x4(), 2, torch.randn(5)), "weight",
     lambda: F.group_norm(x4(), 2, torch.randn(5))),
    ("gn-weight-dtype", lambda: ops.group_norm_act(x4(), 2, MISMATCH), "weight", RuntimeError),
    ("gn-eps", lambda: ops.group_norm_act(x4(), 2, eps=-1.0), "eps", ValueError),
    ("gn-eps-nan", lambda: ops.group_norm_act(x4(), 2, eps=float("nan")), "eps", ValueError),
    ("gn-activation", lambda: ops.group_norm_act(x4(), 2, activation="swishy"), "activation", ValueError),
    # batch_norm_act
    ("bn-rank", lambda: ops.batch_norm_act(torch.randn(4), None, None, training=True), "x", RuntimeError),
    ("bn-int", lambda: ops.batch_norm_act(INT_X, None, None, training=True), "x",
     lambda: F.batch_norm(INT_X, None, None, training=True)),
    ("bn-weight-shape", lambda: ops.batch_norm_act(x4(), None, None, torch.randn(3), training=True), "weight",
     lambda: F.batch_norm(x4(), None, None, torch.randn(3), training=True)),
    ("bn-weight-dtype", lambda: ops.batch_norm_act(x4(), None, None, MISMATCH, training=True), "weight",
     RuntimeError),
    ("bn-one-value", lambda: ops.batch_norm_act(x4(1, C, 1, 1), None, None, training=True), "value per channel",
     lambda: F.batch_norm(x4(1, C, 1, 1), None, None, training=True)),
    ("bn-eval-without-stats", lambda: ops.batch_norm_act(x4(), None, None, training=False), "running_mean",
     ValueError),
    ("bn-eps", lambda: ops.batch_norm_act(x4(), None, None, training=True, eps=-1.0), "eps", ValueError),
    # rms_norm_act (the torch call: an RMS norm over channels, as the reference writes it)
    ("rms-rank", lambda: ops.rms_norm_act(torch.randn(4)), "x", RuntimeError),
    ("rms-int", lambda: ops.rms_norm_act(INT_X), "x", lambda: F.rms_norm(INT_X.movedim(1, -1), (C,))),
    ("rms-weight-shape", lambda: ops.rms_norm_act(x4(), torch.randn(5)), "weight",
     lambda: F.rms_norm(x4().movedim(1, -1), (C,), torch.randn(5))),
    ("rms-weight-dtype", lambda: ops.rms_norm_act(x4(), MISMATCH), "weight", RuntimeError),
    ("rms-eps", lambda: ops.rms_norm_act(x4(), eps=-1.0), "eps", ValueError),
    ("rms-clamp", lambda: ops.rms_norm_act(x4(), clamp="yes"), "clamp", TypeError),
    ("rms-activation", lambda: ops.rms_norm_act(x4(), activation="swishy"), "activation", ValueError),
    # upsample_conv3d (the torch call: F.conv3d)
    ("uc3-rank", lambda: ops.upsample_conv3d(x4(), torch.randn(4, C, 3, 3, 3)), "x", RuntimeError),
    ("uc3-int", lambda: ops.upsample_conv3d(INT_X.unsqueeze(2), torch.randn(4, C, 1, 3, 3)), "x", RuntimeError),
    ("uc3-channels", lambda: ops.upsample_conv3d(x4(2, C, 3, 4, 4), torch.randn(4, 3, 3, 3, 3)), "weight",
     lambda: F.conv3d(x4(2, C, 3, 4, 4), torch.randn(4, 3, 3, 3, 3))),
    ("uc3-weight-dtype", lambda: ops.upsample_conv3d(x4(2, C, 3, 4, 4), torch.randn(4, C, 3, 3, 3).double()),
     "weight", lambda: F.conv3d(x4(2, C, 3, 4, 4), torch.randn(4, C, 3, 3, 3).double())),
    ("uc3-bias-shape", lambda: ops.upsample_conv3d(x4(2, C, 3, 4, 4), torch.randn(4, C, 3, 3, 3), torch.randn(3)),
     "bias", lambda: F.conv3d(x4(2, C, 3, 4, 4), torch.randn(4, C, 3, 3, 3), torch.randn(3))),
    ("uc3-scale", lambda: ops.upsample_conv3d(x4(2, C, 3, 4, 4), torch.randn(4, C, 3, 3, 3), scale_factor=5),
     "scale_factor", ValueError),
    ("uc3-padding", lambda: ops.upsample_conv3d(x4(2, C, 3, 4, 4), torch.randn(4, C, 3, 3, 3),
                                                padding=(1, 1, 1, 1, -2, 0)), "padding", ValueError),
    ("uc3-too-small", lambda: ops.upsample_conv3d(x4(2, C, 1, 1, 1), torch.randn(4, C, 3, 3, 3)), "kernel",
     lambda: F.conv3d(x4(2, C, 1, 1, 1), torch.randn(4, C, 3, 3, 3))),
    # pixel_norm
    ("pn-rank", lambda: ops.pixel_norm(torch.randn(4)), "x", RuntimeError),
    ("pn-int", lambda: ops.pixel_norm(INT_X), "x", RuntimeError),
    ("pn-eps", lambda: ops.pixel_norm(x4(), eps=-1.0), "eps", ValueError),
    # bias_act
    ("ba-int", lambda: ops.bias_act(INT_X, None), "x", RuntimeError),
    ("ba-b-shape", lambda: ops.bias_act(x4(), torch.randn(3)), "b", RuntimeError),
    ("ba-b-dtype", lambda: ops.bias_act(x4(), MISMATCH), "b", RuntimeError),
    ("ba-dim", lambda: ops.bias_act(x4(), B, dim=7), "dim", lambda: x4().sum(dim=7)),  # (b=None: any dim, as StyleGAN2)
    ("ba-act", lambda: ops.bias_act(x4(), None, act="swishy"), "act", ValueError),
    ("ba-clamp", lambda: ops.bias_act(x4(), None, clamp=-1.0), "clamp", ValueError),
    # upsample_conv2d
    ("uc-rank", lambda: ops.upsample_conv2d(torch.randn(C, 6, 6), CONV_W), "x", RuntimeError),
    ("uc-int", lambda: ops.upsample_conv2d(INT_X, CONV_W), "x", RuntimeError),
    ("uc-channels", lambda: ops.upsample_conv2d(x4(), torch.randn(4, 3, 3, 3)), "weight",
     lambda: F.conv2d(x4(), torch.randn(4, 3, 3, 3))),
    ("uc-weight-dtype", lambda: ops.upsample_conv2d(x4(), CONV_W.double()), "weight",
     lambda: F.conv2d(x4(), CONV_W.double())),
    ("uc-bias-shape", lambda: ops.upsample_conv2d(x4(), CONV_W, torch.randn(3)), "bias",
     lambda: F.conv2d(x4(), CONV_W, torch.randn(3))),
    ("uc-mode", lambda: ops.upsample_conv2d(x4(), CONV_W, mode="bicubic"), "mode", ValueError),
    ("uc-scale", lambda: ops.upsample_conv2d(x4(), CONV_W, scale_factor=5), "scale_factor", ValueError),
    ("uc-padding", lambda: ops.upsample_conv2d(x4(), CONV_W, padding=-1), "padding", ValueError),
    # upfirdn2d
    ("ud-rank", lambda: ops.upfirdn2d(torch.randn(6, 6), FIR), "x", RuntimeError),
    ("ud-int", lambda: ops.upfirdn2d(INT_X, FIR), "x", RuntimeError),
    ("ud-up", lambda: ops.upfirdn2d(x4(), FIR, up=0), "up", ValueError),
    ("ud-down", lambda: ops.upfirdn2d(x4(), FIR, down=-2), "down", ValueError),
    ("ud-padding", lambda: ops.upfirdn2d(x4(), FIR, padding=[1, 2, 3]), "padding", ValueError),
    ("ud-filter", lambda: ops.upfirdn2d(x4(), torch.ones(2, 2, 2)), "f", RuntimeError),
    ("ud-gain", lambda: ops.upfirdn2d(x4(), FIR, gain="2"), "gain", ValueError),
    # modulated_conv2d
    ("mc-weight", lambda: ops.modulated_conv2d(x4(), torch.randn(4, 3, 3, 3), torch.randn(2, C)), "weight",
     RuntimeError),
    ("mc-styles", lambda: ops.modulated_conv2d(x4(), CONV_W, torch.randn(2, 3)), "styles", RuntimeError),
    ("mc-up", lambda: ops.modulated_conv2d(x4(), CONV_W, torch.randn(2, C), up=0), "up", ValueError),
    ("mc-filter-needed", lambda: ops.modulated_conv2d(x4(), CONV_W, torch.randn(2, C), up=2), "resample_filter",
     ValueError),
    # instance_norm_act / adaptive_instance_norm
    ("in-int", lambda: ops.instance_norm_act(INT_X), "x", RuntimeError),
    ("adain-style-shape", lambda: ops.adaptive_instance_norm(x4(), torch.randn(2, 3), torch.randn(2, 3)),
     "style_scale", RuntimeError),
]


@pytest.mark.parametrize("case,call,names,torch_call", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_first_with_torchs_error_class(case, call, names, torch_call):
    expected = torch_call
    if not isinstance(torch_call, type):
        with pytest.raises(Exception) as torch_error:
            torch_call()
        expected = torch_error.type
    with pytest.raises(Exception) as error:
        call()
    assert issubclass(error.type, expected) or issubclass(expected, error.type), (
        f"{error.type.__name__} ({error.value}); torch raises {expected.__name__}")
    assert re.search(rf"\b{re.escape(names)}\b", str(error.value)), f"the message does not name {names}: {error.value}"


def test_empty_batches_behave_as_torch():
    """Batch 0 gives an empty result of the right shape (no launch), as the torch layers do."""
    x = torch.randn(0, C, 6, 6)
    assert ops.group_norm_act(x, 2, W, B).shape == F.group_norm(x, 2, W, B).shape
    assert ops.pixel_norm(x).shape == x.shape
    assert ops.bias_act(x, B).shape == x.shape
    assert ops.upsample_conv2d(x, CONV_W, padding=1).shape == F.conv2d(F.interpolate(x, scale_factor=2),
                                                                        CONV_W, padding=1).shape
    assert ops.batch_norm_act(x, torch.zeros(C), torch.ones(C), W, B, False).shape == x.shape
