"""The activations of every fused op, by code: the Triton side of the one activation table
(fastgen/activations.py; tests/test_activations.py pins each code here against torch). fp32 in,
fp32 out."""

import triton
import triton.language as tl


@triton.jit
def _activate(z, ACT: tl.constexpr, ALPHA):
    if ACT == 1:  # relu
        z = tl.where(z < 0, 0.0, z)  # tl.maximum would turn a NaN into 0; torch.relu keeps it
    elif ACT == 2:  # leaky_relu
        z = tl.where(z > 0, z, z * ALPHA)
    elif ACT == 3:  # silu
        z = z * tl.sigmoid(z)
    elif ACT == 4:  # gelu (erf)
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 5:  # gelu_tanh: 0.5 z (1 + tanh u) = z sigmoid(2u)
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        z = z * tl.sigmoid(2.0 * u)
    elif ACT == 6:  # tanh = 2 sigmoid(2z) - 1, saturating cleanly at both ends
        z = 2.0 * tl.sigmoid(2.0 * z) - 1.0
    elif ACT == 7:  # sigmoid
        z = tl.sigmoid(z)
    elif ACT == 8:  # elu
        z = tl.where(z > 0, z, tl.exp(tl.where(z > 0, 0.0, z)) - 1.0)
    elif ACT == 9:  # selu
        z = 1.0507009873554805 * tl.where(z > 0, z, 1.6732632423543772 * (tl.exp(tl.where(z > 0, 0.0, z)) - 1.0))
    elif ACT == 10:  # softplus, linear above F.softplus's threshold 20
        z = tl.where(z > 20.0, z, tl.log(1.0 + tl.exp(tl.where(z > 20.0, 20.0, z))))
    return z


@triton.jit
def _activate_grad(z, ACT: tl.constexpr, ALPHA):
    """d act(z) / dz, with torch's one-sided choices at the kinks (the left one at 0)."""
    if ACT == 1:  # relu
        g = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:  # leaky_relu
        g = tl.where(z > 0, 1.0, ALPHA)
    elif ACT == 3:  # silu
        s = tl.sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    elif ACT == 4:  # gelu (erf)
        g = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 5:  # gelu_tanh
        t = 2.0 * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z)) - 1.0
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACT == 6:  # tanh
        t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        g = 1.0 - t * t
    elif ACT == 7:  # sigmoid
        s = tl.sigmoid(z)
        g = s * (1.0 - s)
    elif ACT == 8:  # elu
        g = tl.where(z > 0, 1.0, tl.exp(tl.where(z > 0, 0.0, z)))
    elif ACT == 9:  # selu
        g = 1.0507009873554805 * tl.where(z > 0, 1.0, 1.6732632423543772 * tl.exp(tl.where(z > 0, 0.0, z)))
    elif ACT == 10:  # softplus
        g = tl.where(z > 20.0, 1.0, tl.sigmoid(z))
    else:
        g = tl.zeros_like(z) + 1.0
    return g
