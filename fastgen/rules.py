"""The fusion rules: which chains of torch functions run as one fastgen op, and when that is exact.

A rule reads a graph at the torch-function level, as TorchDynamo captures it (modules inlined into
F.group_norm, torch.conv2d, operator.mul, ...: the code people write, whatever the module that wrote
it), and says for each occurrence either how to fuse it or why not. Every intermediate of a chain
must be used by the next step alone; everything else about the call (hooks, modes, attributes,
random draws, Python control flow) is Dynamo's: it captured the graph for exactly that state and
guards it.

    pattern                                                  fastgen op           condition
    norm [cast] [* (1 + scale) + shift] [cast] activation    group_norm_act       (1)
      norm: F.group_norm, F.instance_norm (batch statistics),                     instance_norm_act
            F.batch_norm (training or eval, running statistics or none)           batch_norm_act (2)
    F.normalize(x, dim=1) * g * sqrt(C) activation           rms_norm_act         (3)
    x * rsqrt(mean(x^2, dim=1, keepdim=True) + eps) * g act  rms_norm_act         (3)
    x * rsqrt(mean(x^2, dim=1, keepdim=True) + eps)          pixel_norm
    F.interpolate(x, scale, mode) -> conv2d                  upsample_conv2d      (4)

  activation: any spelling of fastgen's table (fastgen.activations): F.silu, torch.relu, x.relu(),
  F.leaky_relu(x, s), F.gelu(x, approximate=...), x * torch.sigmoid(x), in place or not.
  cast: x.float() before the norm, .type(dtype) / .to(dtype) after it (guided-diffusion's GroupNorm32):
  the fused op runs in the norm's dtype and the cast follows it (one rounding where eager has two).
  (1) scale and shift (N, C, 1, ...) per sample and channel: folded into group_norm_act's per-sample
      affine, weight * (1 + scale) and bias * (1 + scale) + shift (the same sums, rounded once less).
  (2) batch_norm_act: no per-sample affine, so no scale-shift; its running statistics updated as
      F.batch_norm updates them.
  (3) g broadcasting over channels alone, the constant sqrt(C) (F.normalize's eps 1e-12 becomes
      rms_norm_act's clamp; in the rsqrt spelling eps is added to the mean square); no scale-shift
      (no per-sample affine).
  (4) integer scale (nearest 2/3/4x, nearest-exact 2/4x, bilinear 2x without align_corners), a
      stride-1, groups-1 convolution with an odd square kernel and symmetric zero padding.
Each fused call also passes the op's own argument checks on the captured shapes and dtypes, or the
occurrence is left with the check's message.
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx

from fastgen.ops.batch_norm_act import _check_batch_norm_act, batch_norm_act
from fastgen.ops.group_norm_act import _check_group_norm_act, group_norm_act
from fastgen.ops.instance_norm_act import _check_one_pixel
from fastgen.ops.pixel_norm import pixel_norm
from fastgen.ops.rms_norm_act import _check_rms_norm_act, rms_norm_act
from fastgen.ops.upsample_conv2d import SCALES, _check_upsample_conv2d, upsample_conv2d


# --- activations: torch function -> (name, alpha) from the call, or None when its arguments make it another
def _leaky(node):
    slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
    return ("leaky_relu", float(slope)) if isinstance(slope, (int, float)) and not isinstance(slope, bool) else None


def _gelu(node):
    approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    return {"none": ("gelu", 0.01), "tanh": ("gelu_tanh", 0.01)}.get(approximate) if len(node.args) <= 2 else None


def _defaults_only(name):
    def parse(node):
        extra = dict(node.kwargs)
        inplace = extra.pop("inplace", False)
        plain = len(node.args) == 1 and not extra and isinstance(inplace, bool)
        return (name, 0.01) if plain else None
    return parse


FUNCTIONS = {F.silu: _defaults_only("silu"), F.relu: _defaults_only("relu"), torch.relu: _defaults_only("relu"),
             torch.relu_: _defaults_only("relu"), F.relu_: _defaults_only("relu"),
             F.leaky_relu: _leaky, F.gelu: _gelu, torch.sigmoid: _defaults_only("sigmoid"),
             F.sigmoid: _defaults_only("sigmoid"), torch.tanh: _defaults_only("tanh"), F.tanh: _defaults_only("tanh"),
             F.elu: _defaults_only("elu"), F.selu: _defaults_only("selu"), F.softplus: _defaults_only("softplus")}
METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh",
           "tanh_": "tanh"}


def is_call(node, functions=(), methods=()) -> bool:
    return isinstance(node, fx.Node) and ((node.op == "call_function" and node.target in functions)
                                          or (node.op == "call_method" and node.target in methods))


def only_for(node, user) -> bool:
    """node's value goes to user and nowhere else."""
    return isinstance(node, fx.Node) and list(node.users) == [user]


def activation(node: fx.Node):
    """(name, alpha, input node, the nodes of the activation that read it) when node applies an
    activation of the table to one tensor, else None. x * torch.sigmoid(x) (either order, the sigmoid
    used there alone) is silu, read by both nodes."""
    if node.op == "call_function" and node.target in FUNCTIONS:
        parsed = FUNCTIONS[node.target](node)
        return None if parsed is None else (*parsed, node.args[0], (node,))
    if node.op == "call_method" and node.target in METHODS and len(node.args) == 1 and not node.kwargs:
        return METHODS[node.target], 0.01, node.args[0], (node,)
    if is_call(node, (operator.mul, torch.mul), ("mul",)) and len(node.args) == 2 and not node.kwargs:
        for x, s in (node.args, node.args[::-1]):
            if is_call(s, (torch.sigmoid, F.sigmoid), ("sigmoid",)) and s.args == (x,) and not s.kwargs \
                    and only_for(s, node):
                return "silu", 0.01, x, (node, s)
    return None


def _inside_larger_activation(node: fx.Node) -> bool:
    """node is the sigmoid of an x * torch.sigmoid(x): that product is the activation, matched at it."""
    users = list(node.users)
    if len(users) != 1:
        return False
    outer = activation(users[0])
    return outer is not None and node in outer[3] and outer[3][0] is not node


# --- the norm + activation chain
_NORMS = {F.group_norm: "group_norm", F.instance_norm: "instance_norm", F.batch_norm: "batch_norm"}
_CASTS = ("type", "to", "float")


def _value(a):
    """The captured value of a graph input or node (a fake tensor: shapes, dtypes), else a itself."""
    return a.meta.get("example_value", a.meta.get("val")) if isinstance(a, fx.Node) else a


def _cast(node) -> bool:
    """x.float(), x.type(dtype) or x.to(dtype): a dtype cast and nothing else."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target in _CASTS and not node.kwargs):
        return False
    return len(node.args) == 1 if node.target == "float" else len(node.args) == 2 and isinstance(node.args[1], torch.dtype)


def _scale_shift(node):
    """(inner, scale, shift, nodes) when node computes inner * (1 + scale) + shift (any operand order)."""
    if not (is_call(node, (operator.add, torch.add), ("add",)) and len(node.args) == 2 and not node.kwargs):
        return None
    for mul, shift in (node.args, node.args[::-1]):
        if not (is_call(mul, (operator.mul, torch.mul), ("mul",)) and len(mul.args) == 2 and not mul.kwargs
                and only_for(mul, node)):
            continue
        for inner, one_plus in (mul.args, mul.args[::-1]):
            if is_call(one_plus, (operator.add, torch.add), ("add",)) and len(one_plus.args) == 2 \
                    and not one_plus.kwargs and only_for(one_plus, mul) and 1 in one_plus.args:
                scale = one_plus.args[1] if one_plus.args[0] == 1 else one_plus.args[0]
                if isinstance(scale, fx.Node) and isinstance(shift, fx.Node):
                    return inner, scale, shift, (mul, one_plus)
    return None


def _per_sample_channel(t, x) -> bool:
    """t is (N, C, 1, ...) for x (N, C, ...), or (N, C) after squeezing: one value per sample and channel."""
    t, x = _value(t), _value(x)
    return (torch.is_tensor(t) and torch.is_tensor(x) and t.dim() == x.dim()
            and tuple(t.shape) == (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2))


@dataclass
class Match:
    """One fusable occurrence: the node whose value the fused call replaces, the call, and the nodes that go."""
    rule: str
    op: str
    node: fx.Node
    fn: Callable
    args: tuple
    casts: list = field(default_factory=list)   # the chain's casts, applied again after the fused call, in order
    erase: list = field(default_factory=list)   # the chain's other nodes


def _bind(fn, node) -> dict:
    return inspect.signature(fn).bind(*node.args, **node.kwargs).arguments


def _fake_check(check, *args) -> str:
    """'' when the op's own checks take these captured values, else their message."""
    try:
        check(*[_value(a) for a in args])
    except Exception as e:  # the op's checks raise torch's kinds of errors
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return ""


def match_norm_act(act: fx.Node) -> Match | str | None:
    """The norm chain that ends in this activation, or why it does not fuse, or None (no norm chain)."""
    parsed = activation(act)
    if parsed is None:
        return None
    name, alpha, y, readers = parsed
    if not isinstance(y, fx.Node) or _inside_larger_activation(act):
        return None
    nodes, casts, scale_shift, user = list(readers), [], None, None
    while True:  # walk back from the activation over casts and at most one scale-shift
        if set(y.users) != ({user} if user is not None else set(readers)):
            if y.op == "call_function" and y.target in _NORMS:
                return f"{_NORMS[y.target]} -> {name}: the norm's output is read elsewhere too (a hook, a skip)"
            return None
        if _cast(y):
            casts.insert(0, y)
        elif scale_shift is None and (ss := _scale_shift(y)) is not None:
            scale_shift = ss
            nodes += list(ss[3])
            nodes.append(y)
            user, y = ss[3][0], ss[0]
            continue
        else:
            break
        nodes.append(y)
        user, y = y, y.args[0]
    if not (isinstance(y, fx.Node) and y.op == "call_function" and y.target in _NORMS):
        return None
    norm, kind = y, _NORMS[y.target]
    args = _bind(y.target, y)
    x = args["input"]
    what = f"{kind} -> {'scale-shift -> ' if scale_shift else ''}{name}"
    if kind == "batch_norm":
        if scale_shift:
            return f"{what}: batch_norm_act has no per-sample affine"
        call = (x, args["running_mean"], args.get("running_var"), args.get("weight"), args.get("bias"),
                args.get("training", False), args.get("momentum", 0.1), args.get("eps", 1e-5), name, alpha)
        why = _fake_check(_check_batch_norm_act, *call)
        fn = _batch_norm_act
    else:
        why = ""
        if kind == "instance_norm":
            if args.get("running_mean") is not None or args.get("running_var") is not None \
                    or args.get("use_input_stats", True) is not True:
                return f"{what}: instance norm with running statistics"
            xv = _value(x)
            groups = xv.shape[1] if torch.is_tensor(xv) and xv.dim() > 1 else 1
            why = _fake_check(_check_one_pixel, x)  # F.instance_norm refuses one pixel; so must the fused call
        else:
            groups = args["num_groups"]
        weight, bias, eps = args.get("weight"), args.get("bias"), args.get("eps", 1e-5)
        scale = shift = None
        if scale_shift:
            scale, shift = scale_shift[1], scale_shift[2]
            if not (_per_sample_channel(scale, x) and _per_sample_channel(shift, x)):
                return f"{what}: scale and shift are not one value per sample and channel"
        call = (x, groups, weight, bias, scale, shift, eps, name, alpha)
        why = why or _fake_check(_check_group_norm_act, x, groups, weight, bias, eps, name, alpha)
        fn = _group_norm_act
    if why:
        return f"{what}: {why}"
    op = {"batch_norm": "batch_norm_act", "instance_norm": "instance_norm_act"}.get(kind, "group_norm_act")
    return Match(what, op, act, fn, call, casts, [n for n in nodes if n is not act] + [norm])


def _group_norm_act(x, groups, weight, bias, scale, shift, eps, activation, alpha):
    if scale is not None:  # h * (1 + scale) + shift over an affine norm: one per-sample affine
        n, c = x.shape[:2]
        one_plus = 1 + scale.reshape(n, c).to(x.dtype)
        weight = one_plus if weight is None else weight * one_plus
        bias = shift.reshape(n, c).to(x.dtype) + (0 if bias is None else bias * one_plus)
    return group_norm_act(x, groups, weight, bias, eps, activation, alpha)


def _batch_norm_act(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, alpha):
    return batch_norm_act(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, alpha)


# --- F.normalize(x, dim=1) * g * sqrt(C) -> activation
def match_rms_act(act: fx.Node) -> Match | str | None:
    parsed = activation(act)
    if parsed is None:
        return None
    name, alpha, y, readers = parsed
    if not (is_call(y, (operator.mul, torch.mul), ("mul",)) and len(y.args) == 2 and set(y.users) == set(readers)):
        return None
    for pn, g in (y.args, y.args[::-1]):  # x * rsqrt(mean(x^2, dim=1, keepdim=True) + eps) * g
        spelled = pixel_norm_match(pn) if only_for(pn, y) else None
        if spelled is not None:
            x, eps, _, replaced = spelled
            what = f"x * rsqrt(mean(x^2, dim=1) + eps) * g -> {name}"
            if not _per_channel(g, x):
                return f"{what}: g is not one value per channel"
            why = _fake_check(lambda x: _check_rms_norm_act(x, None, None, eps, False, name, alpha), x)
            if why:
                return f"{what}: {why}"
            return Match(what, "rms_norm_act", act, _rms_act, (x, g, eps, name, alpha, False), [],
                         [*readers[1:], y, pn, *replaced])
    found = None
    for inner, outer in (y.args, y.args[::-1]):  # (normalize * a) * b, a and b g and sqrt(C) in either order
        if is_call(inner, (operator.mul, torch.mul), ("mul",)) and len(inner.args) == 2 and only_for(inner, y):
            for norm, a in (inner.args, inner.args[::-1]):
                if is_call(norm, (F.normalize,)) and only_for(norm, inner):
                    found = norm, inner, (a, outer)
    if found is None:
        return None
    norm, inner, (a, b) = found
    args = _bind(F.normalize, norm)
    x = args["input"]
    xv = _value(x)
    what = f"F.normalize(x, dim=1) * g * sqrt(C) -> {name}"
    if args.get("p", 2.0) != 2 or args.get("dim", 1) != 1 or not torch.is_tensor(xv) or xv.dim() < 2:
        return f"{what}: not a 2-norm over dim 1"
    c = xv.shape[1]
    g, k = (a, b) if isinstance(a, fx.Node) else (b, a)
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isclose(k, math.sqrt(c), rel_tol=1e-12) \
            or not _per_channel(g, x):
        return f"{what}: the factors are not a per-channel g and sqrt(C)"
    eps = args.get("eps", 1e-12) / math.sqrt(c)  # max(||x||, eps) = sqrt(C) * max(rms(x), eps / sqrt(C))
    why = _fake_check(lambda x: _check_rms_norm_act(x, None, None, eps, True, name, alpha), x)
    if why:
        return f"{what}: {why}"
    return Match(what, "rms_norm_act", act, _rms_act, (x, g, eps, name, alpha, True), [],
                 [*readers[1:], y, inner, norm])


def _per_channel(g, x) -> bool:
    """g broadcasts over x (N, C, ...) along the channels alone: (C,) placed there, (1, C, 1, ...), (C, 1, ...)."""
    g, x = _value(g), _value(x)
    if not (torch.is_tensor(g) and torch.is_tensor(x) and x.dim() >= 2 and g.numel() == x.shape[1]
            and g.dim() <= x.dim()):
        return False
    at = x.dim() - g.dim()  # g's dimensions align with x's last ones
    return all(n == (x.shape[1] if at + i == 1 else 1) for i, n in enumerate(g.shape))


def _rms_act(x, g, eps, activation, alpha, clamp):
    return rms_norm_act(x, g.reshape(-1).to(x.dtype), None, eps, activation, alpha, clamp=clamp)


# --- x * rsqrt(mean(x^2, dim=1, keepdim=True) + eps) -> pixel_norm
def pixel_norm_match(node):
    """(x, eps, divide, the nodes it replaces) where node computes x * rsqrt(mean(x^2, dim=1,
    keepdim=True) + eps) or x / sqrt(...) (x^2 as x ** 2, x * x, x.square() or x.pow(2); the mean
    and the root as torch functions or tensor methods), each intermediate used there alone."""
    if is_call(node, (operator.mul, torch.mul), ("mul",)) and len(node.args) == 2 and not node.kwargs:
        pairs = [node.args, node.args[::-1]]
        root_fns, root_methods, divide = (torch.rsqrt,), ("rsqrt",), False
    elif is_call(node, (operator.truediv, torch.div), ("div",)) and len(node.args) == 2 and not node.kwargs:
        pairs = [node.args]
        root_fns, root_methods, divide = (torch.sqrt,), ("sqrt",), True
    else:
        return None
    for x, root in pairs:
        if not (is_call(root, root_fns, root_methods) and len(root.args) == 1 and only_for(root, node)):
            continue
        shifted = root.args[0]
        if not (is_call(shifted, (operator.add, torch.add), ("add",)) and len(shifted.args) == 2
                and not shifted.kwargs and only_for(shifted, root)):
            continue
        for mean, eps in (shifted.args, shifted.args[::-1]):
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
                continue
            if not (is_call(mean, (torch.mean,), ("mean",)) and only_for(mean, shifted)):
                continue
            args = dict(zip(("input", "dim", "keepdim"), mean.args)) | dict(mean.kwargs)
            if set(args) != {"input", "dim", "keepdim"} or args["keepdim"] is not True \
                    or args["dim"] not in (1, (1,), [1]) or not only_for(args["input"], mean):
                continue
            square = args["input"]
            squares = ((is_call(square, (operator.pow, torch.pow), ("pow",)) and square.args == (x, 2))
                       or (is_call(square, (operator.mul, torch.mul), ("mul",)) and square.args == (x, x))
                       or (is_call(square, (torch.square,), ("square",)) and square.args == (x,)))
            if squares and not square.kwargs:
                return x, float(eps), divide, (root, shifted, mean, square)
    return None


def pixel_norm_call(x, eps: float, divide: bool):
    """pixel_norm on an (N, C, *) map; the written formula on anything else (where it raises, so does this)."""
    if x.dim() >= 2:
        return pixel_norm(x, eps)
    r = torch.mean(x * x, dim=1, keepdim=True) + eps
    return x / torch.sqrt(r) if divide else x * torch.rsqrt(r)


def match_pixel_norm(node: fx.Node) -> Match | None:
    m = pixel_norm_match(node)
    if m is None:
        return None
    x, eps, divide, replaced = m
    what = f"{'x / sqrt' if divide else 'x * rsqrt'}(mean(x^2, dim=1) + {eps:g})"
    return Match(what, "pixel_norm", node, pixel_norm_call, (x, eps, divide), [], list(replaced))


# --- F.interpolate -> conv2d
INTERPOLATE_ARGS = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")


def resampling(settings: dict) -> tuple[int, str] | str:
    """(integer scale, fused mode) of an upsampling, or why it does not fuse."""
    scale, mode = settings.get("scale_factor"), settings.get("mode", "nearest")
    if settings.get("size") is not None:
        return "upsampling to a given size (the scale is not known before the call)"
    if isinstance(scale, (tuple, list)):
        if len(set(scale)) != 1:
            return f"unequal scale factors {tuple(scale)}"
        scale = scale[0]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != int(scale):
        return f"scale_factor {scale!r} is not an integer"
    if settings.get("antialias"):
        return "antialias=True"
    if settings.get("align_corners"):
        return "align_corners=True"
    scale = int(scale)
    if mode == "nearest-exact" and scale in (2, 4):  # floor((i + 0.5) / s) == floor(i / s), bit for bit
        mode = "nearest"
    if mode not in SCALES or scale not in SCALES[mode]:
        return f"{mode} x{scale} is not fused (fused: {SCALES})"
    return scale, mode


_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _pair(v, default):
    v = default if v is None else v
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def match_upsample_conv(conv: fx.Node) -> Match | str | None:
    if not is_call(conv, (torch.conv2d, F.conv2d)):
        return None
    args = dict(zip(_CONV2D_ARGS, conv.args)) | dict(conv.kwargs)
    up = args["input"]
    if not (is_call(up, (F.interpolate,)) and only_for(up, conv)):
        return None
    settings = dict(zip(INTERPOLATE_ARGS, up.args)) | dict(up.kwargs)
    resampled = resampling(settings)
    if isinstance(resampled, str):
        return f"interpolate -> conv2d: {resampled}"
    scale, mode = resampled
    what = f"interpolate ({mode} x{scale}) -> conv2d"
    padding = args.get("padding", 0)
    if isinstance(padding, str) or _pair(args.get("stride"), 1) != (1, 1) \
            or _pair(args.get("dilation"), 1) != (1, 1) or args.get("groups", 1) != 1:
        return f"{what}: not a stride-1, groups-1 convolution with numeric padding"
    pad = _pair(padding, 0)
    wv = _value(args["weight"])
    k = tuple(wv.shape[2:]) if torch.is_tensor(wv) else ()
    if pad[0] != pad[1] or len(k) != 2 or k[0] != k[1] or k[0] % 2 == 0:
        return f"{what}: not an odd square kernel with symmetric padding"
    call = (settings["input"], args["weight"], args.get("bias"), scale, mode, pad[0])
    why = _fake_check(_check_upsample_conv2d, *call)
    if why:
        return f"{what}: {why}"
    return Match(what, "upsample_conv2d", conv, _upsample_conv2d, call, [], [up])


def _upsample_conv2d(x, weight, bias, scale, mode, padding):
    return upsample_conv2d(x, weight, bias, scale_factor=scale, mode=mode, padding=padding)


# node -> Match, the reason it does not fuse (str), or None (not this pattern); the first that answers wins
RULES: tuple[Callable[[fx.Node], Any], ...] = (match_norm_act, match_rms_act, match_pixel_norm, match_upsample_conv)
