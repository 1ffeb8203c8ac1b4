"""The one activation table (fastgen/activations.py) pinned against torch, independently of fastgen's
own code: every code in Python, C++ (csrc/activation.h, through the bias_act kernel ops) and Triton
(kernels/activation.py, through the bias_act kernel), every torch layer, value and derivative."""

import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastgen import activations as fa
from fastgen.dispatch import backends
from tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]
ALPHA = 0.15
# the codes, written out once more: moving an activation to another code must fail here
CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4, "gelu_tanh": 5, "tanh": 6, "sigmoid": 7,
         "elu": 8, "selu": 9, "softplus": 10}
# torch's own function for each, (z, alpha) -> act(z); alpha is leaky_relu's slope
TORCH = {
    "identity": lambda z, a: z,
    "relu": lambda z, a: torch.relu(z),
    "leaky_relu": lambda z, a: F.leaky_relu(z, a),
    "silu": lambda z, a: F.silu(z),
    "gelu": lambda z, a: F.gelu(z),
    "gelu_tanh": lambda z, a: F.gelu(z, approximate="tanh"),
    "tanh": lambda z, a: torch.tanh(z),
    "sigmoid": lambda z, a: torch.sigmoid(z),
    "elu": lambda z, a: F.elu(z),
    "selu": lambda z, a: F.selu(z),
    "softplus": lambda z, a: F.softplus(z),
}
LAYERS = {"identity": nn.Identity, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "silu": nn.SiLU, "gelu": nn.GELU,
          "gelu_tanh": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "elu": nn.ELU, "selu": nn.SELU,
          "softplus": nn.Softplus}
# StyleGAN2's names and default (alpha, gain) (torch_utils/ops/bias_act.py activation_funcs)
STYLEGAN2 = {"linear": ("identity", 0.0, 1.0), "relu": ("relu", 0.0, math.sqrt(2)),
             "lrelu": ("leaky_relu", 0.2, math.sqrt(2)), "tanh": ("tanh", 0.0, 1.0), "sigmoid": ("sigmoid", 0.0, 1.0),
             "elu": ("elu", 0.0, 1.0), "selu": ("selu", 0.0, 1.0), "softplus": ("softplus", 0.0, 1.0),
             "swish": ("silu", 0.0, math.sqrt(2))}


def points(dtype=torch.float64) -> torch.Tensor:
    """Random values of both signs, the kink at 0, and softplus's threshold region; 101 values, so
    the C++ kernels run both their vector loop and their scalar tail."""
    z = torch.randn(90, dtype=torch.float64) * 3
    z = torch.cat([z, torch.tensor([0.0, 1e-3, -1e-3, 19.5, 20.0, 20.5, 25.0, -25.0, 8.0, -8.0, 0.5])])
    return z.to(dtype)


def torch_grad(name: str, z: torch.Tensor) -> torch.Tensor:
    z = z.detach().double().requires_grad_(True)
    (g,) = torch.autograd.grad(TORCH[name](z, ALPHA).sum(), z)
    return g


def test_the_table_has_exactly_these_codes():
    assert {name: row.code for name, row in fa.ACTIVATIONS.items()} == CODES
    assert sorted(CODES.values()) == list(range(len(CODES)))


def test_the_cpp_header_and_the_triton_helper_name_the_same_codes():
    header = (ROOT / "csrc" / "activation.h").read_text()
    enum = dict(re.findall(r"k(\w+) = (\d+)", header.split("enum Activation")[1].split("};")[0]))
    camel = {name: "".join(part.capitalize() for part in name.split("_")) for name in CODES}
    assert {name: int(enum[camel[name]]) for name in CODES} == CODES
    assert int(enum["NumActivations"]) == len(CODES)
    helper = (ROOT / "kernels" / "activation.py").read_text()
    named = dict((name, int(code)) for code, name in re.findall(r"ACT == (\d+):  # (\w+)", helper))
    assert named == {name: code for name, code in CODES.items() if name != "identity"}


@pytest.mark.parametrize("name", CODES)
def test_layer_value_and_derivative_are_torchs(name):
    row = fa.ACTIVATIONS[name]
    z = points()
    layer = row.layer(ALPHA)
    assert type(layer) is LAYERS[name]
    want = TORCH[name](z, ALPHA)
    torch.testing.assert_close(layer(z), want, atol=1e-15, rtol=1e-14)
    torch.testing.assert_close(row.value(z, ALPHA), want, atol=1e-15, rtol=1e-14)
    grad = row.grad(z, ALPHA)
    assert grad.dtype == torch.float64  # never a float32 scalar pair inside a float64 path
    torch.testing.assert_close(grad, torch_grad(name, z), atol=1e-14, rtol=1e-12)
    g = torch.randn_like(z)
    torch.testing.assert_close(fa.activation_backward(g, z, name, ALPHA), g * torch_grad(name, z), atol=1e-14,
                               rtol=1e-12)
    assert fa.activation_of(layer) == (name, ALPHA if name == "leaky_relu" else 0.01)


@pytest.mark.skipif(not backends()["cpu"].available, reason="fastgen._C is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", CODES)
def test_cpp_code_computes_torchs_activation(name, dtype):
    z = points(dtype)
    n, code = z.numel(), CODES[name]
    y = torch.ops.fastgen._bias_act_fused(z, None, n, 1, 1, code, ALPHA, 1.0, -1.0)
    assert_close(y, TORCH[name](z.double(), ALPHA), dtype)
    d = torch.ops.fastgen._bias_act_grad_fused(torch.ones_like(z), z, None, n, 1, 1, code, ALPHA, 1.0, -1.0)
    assert_close(d, torch_grad(name, z), dtype)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", CODES)
def test_triton_code_computes_torchs_activation(name):
    from fastgen.kernels.bias_act import _bias_act_fwd_kernel

    z = points(torch.float32)
    out = torch.full_like(z, float("nan"))
    _bias_act_fwd_kernel[(1,)](z, z, out, z.numel(), 1, 1, ALPHA, 1.0, -1.0, HAS_BIAS=False, ACT=CODES[name],
                               EMULATE_BF16=False, BLOCK=128)
    assert_close(out, TORCH[name](z.double(), ALPHA), torch.float32)


@pytest.mark.parametrize("alias", STYLEGAN2)
def test_stylegan2_names_and_defaults(alias):
    name, alpha, gain = STYLEGAN2[alias]
    row = fa.activation(alias)
    assert row.name == name and row.alpha == alpha and math.isclose(row.gain, gain)


def test_bad_names_and_layers_raise_naming_the_argument():
    with pytest.raises(ValueError, match="act must be one of"):
        fa.activation("swishy", "act")
    with pytest.raises(ValueError, match="negative_slope must be a finite number"):
        fa.check_activation("leaky_relu", float("nan"))
    with pytest.raises(TypeError, match="cannot fuse activation"):
        fa.activation_of(nn.Softplus(beta=2.0))  # another function than the table's softplus
    with pytest.raises(TypeError, match="cannot fuse activation"):
        fa.activation_of(nn.Hardswish())


@pytest.mark.parametrize("backend", ["cpu", "composite"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_float64_norms_keep_the_slope_in_float64(backend, channels_last):
    """A leaky_relu slope of 0.2 is 0.2 in a float64 computation, not 0.2f (the C++ norm kernels took
    it as float once: 1e-8 off, where float64 agrees to 1e-15)."""
    if backend == "cpu" and not backends()["cpu"].available:
        pytest.skip(backends()["cpu"].reason)
    from fastgen.ops import batch_norm_act, group_norm_act

    x = (3 * torch.randn(4, 8, 5, 6, dtype=torch.float64)).to(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    w, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    got = batch_norm_act(x, None, None, w, b, True, activation="leaky_relu", negative_slope=0.2, backend=backend)
    assert (got - F.leaky_relu(F.batch_norm(x, None, None, w, b, True), 0.2)).abs().max() < 1e-13
    got = group_norm_act(x, 4, w, b, activation="leaky_relu", negative_slope=0.2, backend=backend)
    assert (got - F.leaky_relu(F.group_norm(x, 4, w, b), 0.2)).abs().max() < 1e-13
