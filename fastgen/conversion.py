"""fastgen.convert and fastgen.unconvert.

The promise is "same weights, same images": a converted model computes what the original computes
(within the fused kernels' rounding) for every input, mode, dtype and hook a user can set. So convert
never replaces a layer. It reads each module's own forward with torch.fx (the children kept as
calls) and, where a norm layer's output goes to an activation and nowhere else, or an upsampling's
output goes to a Conv2d and nowhere else, gives that module a forward in which the pair is one fused
call reading the same layers' parameters and buffers. The module tree, every layer, parameter,
buffer, state_dict key, hook and mode stay where the user put them; the module's class becomes a
subclass of its own (one per original class, importable, so the model pickles), and unconvert gives
the original class back: nothing else was touched.

Why that is exact where a layer swap is not:
  - Python control flow and attributes that fx freezes (`self.training`, an argument that is None or
    not, a flag read in forward, a child's parameter dtype) are part of the key under which each
    traced forward is kept; a call with another key traces again (or, inside torch.compile and
    past a few keys, runs the original forward).
  - each fused call checks, when it runs, what could make it differ: hooks on either layer (or
    global module hooks), autocast, torch.func transforms, a dtype or rank the kernel does not take.
    Then it calls the two layers as the original did.
  - a forward that writes attributes, mutates the module's containers or draws from Python's random
    module while traced is left alone: fx would drop or freeze it.

What is fused: GroupNorm, BatchNorm2d or InstanceNorm2d (batch statistics) followed by an activation
of fastgen's table (a module, a torch function or a tensor method) -> group_norm_act / batch_norm_act
/ instance_norm_act; nn.Upsample (or a subclass that only casts to float32 and back, in a nearest
mode: diffusers' Wan and QwenImage upsamplers) or F.interpolate (nearest 2/3/4x, nearest-exact 2/4x, bilinear 2x
without align_corners, by an integer scale factor) followed by an nn.Conv2d -> upsample_conv2d; a
pixel norm written out (x * rsqrt(mean(x^2, dim=1, keepdim=True) + eps), or x / sqrt(...)) -> pixel_norm.
diffusers' Upsample2D (whose forward fx cannot trace) has a forward of its own here, used only for
the version of diffusers it mirrors. Every module that could hold such a pattern and does not is
listed in `fastgen_report` with the reason.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import hashlib
import importlib
import inspect
import logging
import textwrap
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules import module as _module_globals

from fastgen.activations import activation_of
from fastgen.nn.norm_act import batch_norm_act_module
from fastgen.ops.group_norm_act import group_norm_act
from fastgen.ops.instance_norm_act import instance_norm_act
from fastgen.ops.pixel_norm import pixel_norm
from fastgen.ops._util import memory_format
from fastgen.ops.rms_norm_act import rms_norm_act
from fastgen.paired import pair_rewrite
from fastgen.rules import FUNCTIONS as _FUNCTIONS, is_call as _is, only_for as _only_for
from fastgen.rules import INTERPOLATE_ARGS as _INTERPOLATE_ARGS, pixel_norm_match as _pixel_norm_match
from fastgen.rules import resampling as _resampling
from fastgen.ops.upsample_conv2d import upsample_conv2d
from fastgen.ops.upsample_conv3d import upsample_conv3d

log = logging.getLogger("fastgen")


@dataclass
class ConversionReport:
    fused: list[tuple[str, str]] = field(default_factory=list)  # (layer path, what was fused)
    left: list[tuple[str, str]] = field(default_factory=list)   # (module or layer path, why not)

    def __str__(self) -> str:
        lines = [f"fastgen.convert: {len(self.fused)} fused, {len(self.left)} left"]
        lines += [f"  fused  {path or '(root)'}: {what}" for path, what in self.fused]
        lines += [f"  left   {path or '(root)'}: {why}" for path, why in self.left]
        return "\n".join(lines)

    def add(self, kind: str, path: str, text: str) -> None:
        items = getattr(self, kind)
        if (path, text) not in items:
            items.append((path, text))


def convert(module: nn.Module, inplace: bool = False) -> nn.Module:
    """`module` with fused forwards wherever a norm + activation or an upsampling + convolution can
    run as one fastgen op (see the module docstring); a copy unless inplace. The result's
    `fastgen_report` says what was fused and what was left and why."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not inplace:
        try:
            module = copy.deepcopy(module)
        except Exception as e:  # e.g. legacy torch.nn.utils.weight_norm: its tensors refuse deepcopy
            raise RuntimeError(f"fastgen.convert copies the model first, and this model cannot be deep-copied "
                               f"({type(e).__name__}: {e}); fastgen.convert(model, inplace=True) converts it "
                               f"in place") from e
    report = ConversionReport()
    for path, m in list(module.named_modules()):
        _convert_one(m, path, report)
    module.fastgen_report = report
    log.info("%s", report)
    return module


def unconvert(module: nn.Module, inplace: bool = False) -> nn.Module:
    """Undoes fastgen.convert: every module back to its original class (all else was never changed:
    parameters, buffers, modes and hooks are the current ones); a copy unless inplace."""
    module = module if inplace else copy.deepcopy(module)
    for m in module.modules():
        base = type(m).__dict__.get("_fastgen_base")
        if base is not None:
            m.__class__ = base
            m.__dict__.pop("_fastgen_plans", None)
    module.__dict__.pop("fastgen_report", None)
    return module


def _convert_one(m: nn.Module, path: str, report: ConversionReport) -> None:
    cls = type(m)
    if "_fastgen_base" in cls.__dict__ or cls.__module__.startswith("fastgen."):
        return  # converted already, or one of fastgen's own layers
    known = _KNOWN.get(_qualified(cls)) or (_RMSNormForward if _rms_norm(m) else None)
    if known is not None:
        plans = known()
        if plans.prepare(m, path, report):
            _recast(m, plans)
        return
    if not _may_hold_a_pattern(m):
        return
    # fx's traced forwards where it can follow the call; then the forward rewritten at the source,
    # for the calls fx cannot stand for (a feature cache passed in, ...)
    traced, paired, pairs_report = _TracedForwards(), _PairedForward(), ConversionReport()
    ready = [p for p, r in ((traced, report), (paired, pairs_report)) if p.prepare(m, path, r)]
    if paired in ready:  # what the rewrite fuses fuses for every call: fx's refusal of the module is moot
        report.left[:] = [(p, why) for p, why in report.left if p != path]
        for where, what in pairs_report.fused:
            report.add("fused", where, what)
    if ready:
        _recast(m, ready[0] if len(ready) == 1 else _Chain(ready))


def _recast(m: nn.Module, plans) -> None:
    m.__class__ = _fused_class(type(m))
    m.__dict__["_fastgen_plans"] = plans


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------------------------------
# the converted classes: one per original class, importable from this module by name

_CLASSES: dict[type, type] = {}


def _fused_class(base: type) -> type:
    if base not in _CLASSES:
        name = f"Fused[{base.__module__.replace('.', '/')}:{base.__qualname__.replace('.', '/')}]"

        @functools.wraps(base.forward)
        def forward(self, *args, **kwargs):
            plans = self.__dict__.get("_fastgen_plans")
            if plans is not None and not torch.compiler.is_compiling():
                out = plans.run(self, args, kwargs)
                if out is not _MISS:
                    return out
            return base.forward(self, *args, **kwargs)

        def __getstate__(self):
            state = dict(base.__getstate__(self) if hasattr(base, "__getstate__") else self.__dict__)
            state.pop("_fastgen_plans", None)  # traced code does not pickle; it is traced again on use
            return state

        def __setstate__(self, state):
            base.__setstate__(self, state) if hasattr(base, "__setstate__") else self.__dict__.update(state)
            known = _KNOWN.get(_qualified(base)) or (_RMSNormForward if _rms_norm_class(base) else None)
            self.__dict__["_fastgen_plans"] = known() if known else _Chain([_TracedForwards(), _PairedForward()])

        _CLASSES[base] = type(name, (base,), {
            "forward": forward, "__getstate__": __getstate__, "__setstate__": __setstate__,
            "_fastgen_base": base, "__module__": __name__, "__qualname__": name})
    return _CLASSES[base]


def __getattr__(name: str):
    """The Fused[...] classes by name, made on first use: unpickling a converted model in a fresh
    process asks for them before any conversion ran."""
    if name.startswith("Fused[") and name.endswith("]") and ":" in name:
        module_name, qualname = name[len("Fused["):-1].split(":", 1)
        base = importlib.import_module(module_name.replace("/", "."))
        for part in qualname.split("/"):
            base = getattr(base, part)
        return _fused_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MISS = object()  # a plan's answer for "run the original forward"


# ---------------------------------------------------------------------------------------------
# the fused calls: what a converted forward runs in place of a pair of layers

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _hooked(m: nn.Module | None) -> bool:
    return m is not None and any(getattr(m, d, None) for d in _HOOK_DICTS)


def _plain_call(x: torch.Tensor, *weights) -> bool:
    """Whether the fused kernel computes exactly what the layers would for x: no global module hooks,
    no autocast (it would run the layers in another dtype), no torch.func transform (the fused ops
    have no batching rule), a floating dtype the kernels take and the weights share."""
    if any(getattr(_module_globals, d) for d in _GLOBAL_HOOKS):
        return False
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES or x.device.type not in ("cpu", "cuda", "xla"):
        return False
    if torch._C._are_functorch_transforms_active() or torch.is_autocast_enabled(x.device.type):
        return False
    return all(w is None or (isinstance(w, torch.Tensor) and w.dtype == x.dtype) for w in weights)


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _norm_act_call(norm: nn.Module, act: nn.Module | None, call: tuple, name: str, alpha: float, x):
    """act(norm(x)) for a GroupNorm, BatchNorm2d, InstanceNorm2d (batch statistics) or a video VAE's
    RMS norm (_RMS_NORMS) `norm`; `act` the activation module, or None where the forward called a
    function or a tensor method: call = (the function or the method's name, its other arguments, its
    keyword arguments' items)."""
    if _rms_norm(norm):
        settings = None if _hooked(norm) or _hooked(act) else _rms_settings(norm, x)
        if settings is not None:
            return rms_norm_act(x, *settings, name, alpha, clamp=True)
    elif _per_channel_rms(norm):
        settings = None if _hooked(act) else _per_channel_rms_settings(norm, x)
        if settings is not None:
            return rms_norm_act(x, *settings, name, alpha)
    elif _chunked_group_norm(norm):
        inner = norm.norm_layer
        if not _hooked(norm) and not _hooked(inner) and not _hooked(act) and _plain_call(x, inner.weight, inner.bias) \
                and x.dim() == 5 and x.shape[1] == inner.num_channels and x.numel() > 0:
            frames = x.permute(0, 2, 1, 3, 4).flatten(0, 1)  # the frames as a batch, as Mochi's forward has them
            y = group_norm_act(frames, inner.num_groups, inner.weight, inner.bias, inner.eps, name, alpha)
            return y.unflatten(0, (x.shape[0], -1)).permute(0, 2, 1, 3, 4)
    elif not _hooked(norm) and not _hooked(act) and _plain_call(x, norm.weight, norm.bias):
        kind = type(norm)
        if kind is nn.GroupNorm and x.dim() >= 2 and x.shape[1] == norm.num_channels:
            return group_norm_act(x, norm.num_groups, norm.weight, norm.bias, norm.eps, name, alpha)
        if kind is nn.BatchNorm2d and x.dim() == 4 and x.shape[1] == norm.num_features \
                and x.dtype == _buffer_dtype(norm, x):
            return batch_norm_act_module(norm, x, name, alpha)
        if kind is nn.InstanceNorm2d and x.dim() == 4 and not norm.track_running_stats \
                and x.shape[-1] * x.shape[-2] > 1 and (not norm.affine or norm.weight.shape[0] == x.shape[1]):
            return instance_norm_act(x, norm.weight, norm.bias, norm.eps, name, alpha)
    return _activation(act, call, norm(x))


def _activation(act: nn.Module | None, call: tuple, y):
    """act(y), or the function or tensor method `call` stands for (see _norm_act_call); y itself for
    neither."""
    if act is not None:
        return act(y)
    if not call:
        return y
    target, args, kwargs = call  # a method's name, or the function's place in _FUNCTIONS
    function = getattr(y, target) if isinstance(target, str) else _FUNCTION_LIST[target]
    return function(*args, **dict(kwargs)) if isinstance(target, str) else function(y, *args, **dict(kwargs))


def _channel_rms_call(norm: nn.Module, act: nn.Module | None, call: tuple, name: str, alpha: float, x):
    """act(norm(x.movedim(1, -1)).movedim(-1, 1)) for diffusers' RMSNorm over the channels, as LTX
    writes it (see _norm_act_call for act and call; neither: the norm alone, name 'identity')."""
    settings = None if _hooked(norm) or _hooked(act) else _channel_rms_settings(norm, x)
    if settings is not None:
        return rms_norm_act(x, *settings, name, alpha)
    return _activation(act, call, norm(x.movedim(1, -1)).movedim(-1, 1))


def _channel_rms_settings(norm: nn.Module, x):
    """(weight, bias, eps) of rms_norm_act for diffusers' RMSNorm over x's channels, or None where the
    fused op would not compute what the forward does: its NPU branch, float64 (the forward takes the
    mean square in float32), weights in another dtype (the forward rounds to the weight's dtype),
    a shape other than (C,), autocast or hooks (_plain_call)."""
    weight, bias = norm.weight, norm.bias
    if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5) or x.dtype == torch.float64 \
            or norm.dim != (x.shape[1],) or (weight is None and bias is not None) \
            or any(t is not None and (not isinstance(t, torch.Tensor) or t.shape != norm.dim) for t in (weight, bias)) \
            or not _plain_call(x, weight, bias) or type(norm).forward.__globals__["is_torch_npu_available"]():
        return None
    return weight, bias, norm.eps


# diffusers' RMSNorm (over the last dimension; LTX calls it on x.movedim(1, -1)) and Mochi's
# per-frame GroupNorm, by class and the hash of the forward fastgen mirrors (diffusers 0.42)
_CHANNEL_RMS = ("diffusers.models.normalization.RMSNorm", "ab9075d036873ac9")
_PER_CHANNEL_RMS = ("diffusers.models.autoencoders.autoencoder_kl_ltx2.PerChannelRMSNorm", "b013e7d05857d89b")
_CHUNKED_GROUP_NORM = ("diffusers.models.autoencoders.autoencoder_kl_mochi.MochiChunkedGroupNorm3D", "765ff3f4a4c02dc4")


def _known_class(m, known: tuple[str, str]) -> bool:
    cls = type(m).__dict__.get("_fastgen_base", type(m))
    return isinstance(m, nn.Module) and _qualified(cls) == known[0] and _source_hash(cls) == known[1]


def _per_channel_rms(m) -> bool:
    return _known_class(m, _PER_CHANNEL_RMS)


def _per_channel_rms_settings(norm: nn.Module, x):
    """(None, None, eps) of rms_norm_act for LTX-2's PerChannelRMSNorm (x / sqrt(mean(x^2, dim=1) +
    eps), no affine) on x, or None: another dimension, autocast or hooks (_plain_call)."""
    if norm.channel_dim != 1 or not isinstance(x, torch.Tensor) or x.dim() not in (4, 5) \
            or not _plain_call(x) or _hooked(norm):
        return None
    return None, None, norm.eps


def _channel_rms(m) -> bool:
    return _known_class(m, _CHANNEL_RMS)


def _chunked_group_norm(m) -> bool:
    return _known_class(m, _CHUNKED_GROUP_NORM) and isinstance(getattr(m, "norm_layer", None), nn.GroupNorm)


def _pixel_norm_call(x, eps: float, divide: bool):
    """ProGAN's pixel norm, as the forward wrote it: x * rsqrt(mean(x^2, dim=1) + eps), or with
    divide, x / sqrt(...)."""
    if _plain_call(x) and x.dim() >= 2:
        return pixel_norm(x, eps)
    norm = torch.mean(x ** 2, dim=1, keepdim=True) + eps
    return x / torch.sqrt(norm) if divide else x * torch.rsqrt(norm)


# The video VAEs' channel RMS norms, by class, and the hash of the forward fastgen mirrors (diffusers
# 0.42): F.normalize(x (in fp32 for fp16/bf16), dim=1).to(x.dtype) * scale * gamma + bias, which is
# rms_norm_act with clamp=True and eps = 1e-12 / sqrt(C), in fp32 and rounded once.
_RMS_NORM_FORWARD = "fc44101b65138738"
_RMS_NORMS = frozenset(f"diffusers.models.autoencoders.autoencoder_kl_{m}.{c}" for m, c in (
    ("wan", "WanRMS_norm"), ("qwenimage", "QwenImageRMS_norm"), ("qwenimage21", "QwenImage21RMS_norm"),
    ("hunyuanvideo15", "HunyuanVideo15RMS_norm"), ("hunyuanimage_refiner", "HunyuanImageRefinerRMS_norm")))


def _rms_norm_class(cls: type) -> bool:
    return _qualified(cls) in _RMS_NORMS and _source_hash(cls) == _RMS_NORM_FORWARD


@functools.lru_cache(maxsize=None)
def _source_hash(cls: type) -> str:
    """The hash of cls.forward's source ('' where it cannot be read): which forward fastgen mirrors.
    Once per class: the known forwards' run() reads it on every call."""
    try:
        return hashlib.sha256(inspect.getsource(cls.forward).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return ""


def _rms_norm(m) -> bool:
    """m is one of _RMS_NORMS with the forward fastgen mirrors (converted or not)."""
    return isinstance(m, nn.Module) and _rms_norm_class(type(m).__dict__.get("_fastgen_base", type(m)))


def _rms_settings(norm: nn.Module, x):
    """(weight, bias, eps) of rms_norm_act for norm(x), or None where the fused op would not compute
    what norm's forward does: channels last in the layer's sense, a gamma or bias not shaped (C, 1, ...)
    against x's rank (they would broadcast over other dimensions), a scale other than sqrt(C), a
    non-zero constant bias, weights in another dtype, autocast or hooks (_plain_call)."""
    gamma, bias = getattr(norm, "gamma", None), getattr(norm, "bias", None)
    if not getattr(norm, "channel_first", False) or not isinstance(gamma, torch.Tensor) \
            or not isinstance(x, torch.Tensor) or x.dim() < 2:
        return None
    c = x.shape[1]
    if tuple(gamma.shape) != (c, *(1,) * (x.dim() - 2)) or norm.scale != c ** 0.5:
        return None
    if isinstance(bias, torch.Tensor):
        if bias.shape != gamma.shape:
            return None
        bias = bias.view(c)
    elif bias != 0 or isinstance(bias, bool):
        return None
    else:
        bias = None
    if not _plain_call(x, gamma, bias):
        return None
    return gamma.view(c), bias, 1e-12 / c ** 0.5


def _buffer_dtype(norm: nn.Module, x: torch.Tensor):
    mean = norm.running_mean
    return x.dtype if mean is None else mean.dtype


def _upsample_conv_call(conv: nn.Conv2d, upsample: nn.Module | None, interpolate: tuple, scale: int, mode: str, x):
    """conv(upsample(x)), or conv(F.interpolate(x, *args, **kwargs)) with interpolate = (args, kwargs
    items) where the forward called the function."""
    exact = upsample is None or type(upsample) is nn.Upsample or x.dtype != torch.float64  # see _casting_upsample
    if exact and not _hooked(conv) and not _hooked(upsample) and _plain_call(x, conv.weight, conv.bias) \
            and x.dim() == 4:
        return upsample_conv2d(x, conv.weight, conv.bias, scale_factor=scale, mode=mode, padding=conv.padding[0])
    if upsample is not None:
        return conv(upsample(x))
    args, kwargs = interpolate
    return conv(F.interpolate(x, *args, **dict(kwargs)))


# ---------------------------------------------------------------------------------------------
# which layer pairs fuse (read off a traced graph)

_NORMS = (nn.GroupNorm, nn.BatchNorm2d, nn.InstanceNorm2d)
_NORM_LIKE = (nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LayerNorm)


def _norm_refusal(norm: nn.Module) -> str:
    """Why a norm layer followed by an activation does not fuse ('' when it does)."""
    if _rms_norm(norm) or _per_channel_rms(norm):
        return ""
    if _chunked_group_norm(norm):
        norm = norm.norm_layer
    if type(norm) not in _NORMS:
        base = next((b.__name__ for b in _NORMS if isinstance(norm, b)), None)
        return (f"{type(norm).__name__} is a subclass of nn.{base}: its forward may differ" if base
                else f"{type(norm).__name__} has no fused counterpart")
    if type(norm) is nn.InstanceNorm2d and norm.track_running_stats:
        return "InstanceNorm2d with track_running_stats=True (running statistics): not fused"
    return ""


_FUNCTION_LIST = tuple(_FUNCTIONS)  # generated code names a function by its place here
_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}


def _activation_call(node: fx.Node, modules: dict):
    """(module or None, name, alpha) when node applies an activation of the table to its first
    argument alone; (None, None, why) for an activation layer that is not in the table; None when
    node is no activation."""
    if node.op == "call_function" and node.target in _FUNCTIONS:
        parsed = _FUNCTIONS[node.target](node)
        return None if parsed is None else (None, *parsed)
    if node.op == "call_method" and node.target in _METHODS and len(node.args) == 1 and not node.kwargs:
        return None, _METHODS[node.target], 0.01
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        act = modules.get(node.target)
        if type(act).__module__ != "torch.nn.modules.activation":
            return None
        try:
            return (act, *activation_of(act))
        except TypeError:
            return None, None, f"{type(act).__name__} is not in fastgen's activation table"
    return None


def _conv_refusal(conv: nn.Module) -> str:
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} after the upsampling is not an nn.Conv2d"
    k = conv.kernel_size
    if (conv.stride, conv.dilation, conv.groups) != ((1, 1), (1, 1), 1) or k[0] != k[1] or k[0] % 2 == 0 \
            or conv.padding_mode != "zeros" or not isinstance(conv.padding, tuple) \
            or conv.padding[0] != conv.padding[1]:
        return "the Conv2d after the upsampling is not stride-1, groups-1, odd square kernel, symmetric zero padding"
    return ""


def _rewrite(graph: fx.Graph, modules: dict, path: str, report: ConversionReport) -> int:
    """Fuses the graph's pairs in place; returns how many. What could have fused and did not goes
    into the report."""
    fused = 0
    for node in list(graph.nodes):
        if node._erased:  # erased with its pair
            continue
        if node.op == "call_module" and _channel_rms(modules.get(node.target)):
            fused += _fuse_channel_rms(graph, node, modules, path, report)
        elif node.op == "call_module" and _norm_like(modules.get(node.target)) \
                and len(node.args) == 1 and not node.kwargs:
            if len(node.users) == 1:
                fused += _fuse_norm(graph, node, modules, path, report)
            elif any(_activation_call(u, modules) for u in node.users):
                report.add("left", _join(path, node.target), "its output is read elsewhere too, not only by the activation")
        elif _upsampling_settings(node, modules) is not None and len(node.users) == 1:
            fused += _fuse_upsampling(graph, node, modules, path, report)
        elif _pixel_norm_match(node) is not None:
            fused += _fuse_pixel_norm(graph, node, path, report)
        elif node.op == "call_module" and isinstance(modules.get(node.target), nn.Upsample) \
                and type(modules[node.target]) is not nn.Upsample and not _casting_upsample(modules[node.target]) \
                and any(u.op == "call_module" and isinstance(modules.get(u.target), nn.Conv2d) for u in node.users):
            report.add("left", _join(path, node.target),
                       f"{type(modules[node.target]).__name__} is a subclass of nn.Upsample: its forward may differ")
    return fused


def _fuse_norm(graph, node, modules, path, report) -> int:
    (user,) = node.users
    act = _activation_call(user, modules)
    if act is None or user.args[0] is not node or node in user.args[1:] or node in user.kwargs.values():
        return 0
    norm, where = modules[node.target], _join(path, node.target)
    module, name, alpha = act
    why = alpha if name is None else _norm_refusal(norm)
    if why:
        report.add("left", where, why)
        return 0
    with graph.inserting_before(user):
        new = graph.call_function(_norm_act_call, (graph.get_attr(node.target), *_activation_args(graph, user, module),
                                                   name, alpha, node.args[0]))
    user.replace_all_uses_with(new)
    graph.erase_node(user)
    graph.erase_node(node)
    report.add("fused", where, _norm_act_text(norm, name, alpha))
    return 1


def _activation_args(graph, user, module) -> tuple:
    """(act, call) of _norm_act_call for the activation node `user`: its module (an attribute of the
    graph), or the function or tensor method it calls with its other arguments."""
    if module is not None:
        return graph.get_attr(user.target), ()
    target = user.target if user.op == "call_method" else _FUNCTION_LIST.index(user.target)
    return None, (target, tuple(user.args[1:]), tuple(user.kwargs.items()))


def _moved(node, source: int, destination: int) -> bool:
    return node.op == "call_method" and node.target == "movedim" and len(node.args) == 3 and not node.kwargs \
        and tuple(node.args[1:]) == (source, destination)


def _fuse_channel_rms(graph, node, modules, path, report) -> int:
    """x.movedim(1, -1) -> diffusers' RMSNorm -> .movedim(-1, 1), then an activation or not: the
    norm over the channels, one rms_norm_act."""
    before = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if not (isinstance(before, fx.Node) and _moved(before, 1, -1) and len(before.users) == 1
            and len(node.users) == 1 and _moved(next(iter(node.users)), -1, 1)):
        return 0
    (after,) = node.users
    module, name, alpha, last = None, "identity", 0.0, after
    if len(after.users) == 1:
        (user,) = after.users
        act = _activation_call(user, modules)
        if act is not None and act[1] is not None and user.args[0] is after and after not in user.args[1:] \
                and after not in user.kwargs.values():
            (module, name, alpha), last = act, user
    with graph.inserting_before(last):
        act_args = _activation_args(graph, last, module) if last is not after else (None, ())
        new = graph.call_function(_channel_rms_call, (graph.get_attr(node.target), *act_args, name, alpha,
                                                      before.args[0]))
    last.replace_all_uses_with(new)
    for n in dict.fromkeys((last, after, node, before)):
        graph.erase_node(n)
    paired = f" + {name}{f'({alpha})' if name == 'leaky_relu' else ''}" if last is not after else ""
    report.add("fused", _join(path, node.target),
               f"RMSNorm over the channels (movedim){paired} -> rms_norm_act{'' if paired else '(identity)'}")
    return 1


_FUSED_OP = {nn.GroupNorm: "group_norm_act", nn.BatchNorm2d: "batch_norm_act", nn.InstanceNorm2d: "instance_norm_act"}


def _norm_act_text(norm: nn.Module, name: str, alpha: float) -> str:
    base = type(norm).__dict__.get("_fastgen_base", type(norm))
    slope = f"({alpha})" if name == "leaky_relu" else ""
    op = "rms_norm_act" if _rms_norm(norm) or _per_channel_rms(norm) \
        else "group_norm_act (per frame)" if _chunked_group_norm(norm) else _FUSED_OP[base]
    return f"{base.__name__} + {name}{slope} -> {op}"


def _norm_like(m) -> bool:
    return isinstance(m, _NORM_LIKE) or _rms_norm(m) or _per_channel_rms(m) or _chunked_group_norm(m)


def _upsampling_settings(node: fx.Node, modules: dict):
    """The settings of an nn.Upsample call or an F.interpolate call, else None."""
    if node.op == "call_function" and node.target is F.interpolate:
        return dict(zip(_INTERPOLATE_ARGS, node.args)) | dict(node.kwargs)
    up = modules.get(node.target) if node.op == "call_module" else None
    if (type(up) is nn.Upsample or _casting_upsample(up)) and len(node.args) == 1 and not node.kwargs:
        return dict(input=node.args[0], size=up.size, scale_factor=up.scale_factor, mode=up.mode,
                    align_corners=up.align_corners, recompute_scale_factor=up.recompute_scale_factor)
    return None


@functools.lru_cache(maxsize=None)
def _casting_forward(cls: type) -> bool:
    try:
        (fn,) = ast.parse(textwrap.dedent(inspect.getsource(cls.forward))).body
    except (OSError, TypeError, SyntaxError, ValueError):
        return False
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    args = [a.arg for a in fn.args.args]
    return len(body) == 1 and isinstance(body[0], ast.Return) and len(args) == 2 \
        and ast.unparse(body[0].value) == f"super().forward({args[1]}.float()).type_as({args[1]})"


def _casting_upsample(up) -> bool:
    """An nn.Upsample subclass whose forward is `super().forward(x.float()).type_as(x)` (diffusers'
    Wan and QwenImage upsamplers), in a nearest mode: the same copies as nn.Upsample's in float32,
    float16 and bfloat16 (nearest only copies values); a float64 input is rounded to float32 by it,
    so the fused call runs the layers there."""
    return isinstance(up, nn.Upsample) and type(up) is not nn.Upsample and up.mode in ("nearest", "nearest-exact") \
        and _casting_forward(type(up))


def _fuse_upsampling(graph, node, modules, path, report) -> int:
    (user,) = node.users
    if user.op != "call_module" or user.args != (node,) or user.kwargs \
            or not isinstance(modules.get(user.target), nn.Conv2d):
        return 0
    settings, where = _upsampling_settings(node, modules), _join(path, user.target)
    if any(isinstance(v, fx.Node) for k, v in settings.items() if k != "input"):
        report.add("left", where, "upsampling settings computed in forward")
        return 0
    resampling, why = _resampling(settings), _conv_refusal(modules[user.target])
    if isinstance(resampling, str) or why:
        report.add("left", where, resampling if isinstance(resampling, str) else why)
        return 0
    scale, mode = resampling
    x = settings["input"]
    with graph.inserting_before(user):
        conv_ref = graph.get_attr(user.target)
        if node.op == "call_module":
            up_ref, interpolate = graph.get_attr(node.target), ((), ())
        else:
            up_ref = None
            interpolate = (tuple(node.args[1:]), tuple(node.kwargs.items()))
        new = graph.call_function(_upsample_conv_call, (conv_ref, up_ref, interpolate, scale, mode, x))
    user.replace_all_uses_with(new)
    graph.erase_node(user)
    graph.erase_node(node)
    origin = type(modules[node.target]).__name__ if node.op == "call_module" else "F.interpolate"
    report.add("fused", where, f"{origin} + Conv2d -> upsample_conv2d({mode}, x{scale})")
    return 1


def _fuse_pixel_norm(graph, node, path, report) -> int:
    x, eps, divide, replaced = _pixel_norm_match(node)
    with graph.inserting_before(node):
        new = graph.call_function(_pixel_norm_call, (x, eps, divide))
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    for n in replaced:
        graph.erase_node(n)
    report.add("fused", path, f"{'x / sqrt' if divide else 'x * rsqrt'}(mean(x^2, dim=1) + {eps:g}) -> pixel_norm")
    return 1


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# ---------------------------------------------------------------------------------------------
# which modules are traced

_ACTIVATION_WORDS = ("silu", "relu", "gelu", "sigmoid", "tanh", "elu", "softplus", "act", "nonlinearity")


def _may_hold_a_pattern(m: nn.Module) -> bool:
    """A module whose own forward could call a norm then an activation, or an upsampling then a
    conv: torch's own layers are not (nn.Sequential is), nor modules without such layers among
    their children (or in their ModuleLists and ModuleDicts)."""
    cls = type(m)
    if cls.__module__.startswith("torch.") and cls is not nn.Sequential:
        return False
    layers = []
    for child in m.children():
        layers += list(child.children()) if isinstance(child, (nn.ModuleList, nn.ModuleDict)) else [child]
    has_norm = any(_norm_like(c) or _channel_rms(c) for c in layers)
    has_conv = any(isinstance(c, nn.Conv2d) for c in layers)
    if cls is nn.Sequential:
        return has_norm or has_conv
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return has_norm or has_conv  # no source to look at: fx reads the code itself
    upsampling = "interpolate" in source or any(isinstance(c, nn.Upsample) for c in layers)
    activation = any(word in source for word in _ACTIVATION_WORDS)
    pixel_norm = "sqrt" in source and "mean" in source
    channel_rms = "movedim" in source and any(_channel_rms(c) for c in layers)  # fused with or without an activation
    return (has_norm and activation) or (has_conv and upsampling) or pixel_norm or channel_rms


# ---------------------------------------------------------------------------------------------
# traced forwards, one per call key

_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)
_TENSOR = "tensor"
_DEFAULT = "default"
_KEYS_PER_MODULE = 16  # distinct call keys traced per module; past them, the original forward runs
_INTERNAL = frozenset({"training", "_fastgen_plans", "_parameters", "_buffers", "_modules"})


def _value_key(v):
    if type(v) in _PLAIN:
        return (type(v), v)
    if type(v) is tuple and all(type(e) in _PLAIN for e in v):
        return (tuple, v)
    return None


def _first_tensor(m: nn.Module):
    """m's first parameter (else buffer) in its subtree: what a forward reads when it asks a child
    for its dtype or device."""
    for t in m._parameters.values():
        if t is not None:
            return t
    for child in m._modules.values():
        if child is not None:
            t = _first_tensor(child)
            if t is not None:
                return t
    return next((t for t in m._buffers.values() if t is not None), None)


def _tensor_state(t):
    return None if t is None else (t.dtype, t.device, t.shape)


def _state(m: nn.Module):
    """Everything about m that a traced forward may have frozen, as a hashable key (objects by
    identity; the plan keeps them alive, so an identity is never reused while it is a key)."""
    attrs = tuple((k, _value_key(v) or id(v)) for k, v in m.__dict__.items() if k not in _INTERNAL)
    params = tuple(_tensor_state(p) for p in m._parameters.values())
    buffers = tuple(_tensor_state(b) for b in m._buffers.values())
    children = tuple((id(c), c.training, _tensor_state(_first_tensor(c)))
                     if c is not None else None for c in m._modules.values())
    return attrs, params, buffers, children


class _Plan:
    """One traced forward: fn(self, *tensors) or None (the original forward runs), and the objects
    whose identities its key holds."""

    def __init__(self, fn, keep):
        self.fn, self.keep = fn, keep


class _TracedForwards:
    """A module's forwards, traced per call key: (each argument a tensor, or its value or default,
    the module's training flag, grad mode, and the module's state that tracing freezes)."""

    def __init__(self):
        self.plans: dict = {}
        self.signature = None
        self.stateful = False  # the forward writes the module's state: never traced again

    def prepare(self, m: nn.Module, path: str, report: ConversionReport) -> bool:
        """Traces the usual calls (tensor arguments, defaults, None for a later required argument, a
        tensor for a None default; both modes, with and without grad) for the report, which says
        what fused and what was left; True when one of them fuses (the module is then converted and
        traces its calls as they come)."""
        self.signature = _signature(type(m).forward)  # m's own class, not yet converted
        if self.signature is None:
            report.add("left", path, f"{type(m).__name__}.forward's signature cannot be read")
            return False
        why = _forward_refusal(type(m))
        if why:
            report.add("left", path, why)
            return False
        fused, reasons = 0, []
        for arg_key in self._usual_keys():
            for training in (m.training, not m.training):
                for grad in (True, False):
                    n, reason = _trace(m, self.signature, arg_key, training, grad, path, report)
                    fused += n
                    reasons.append(reason)
        if fused == 0:
            refusals = sorted({r for r in reasons if r})
            if refusals:
                report.add("left", path, refusals[0])
            return False
        return True

    def _usual_keys(self):
        params = self.signature
        base = tuple(_TENSOR if p.default is inspect.Parameter.empty else _DEFAULT for p in params)
        keys = [base]
        for i, p in enumerate(params):
            if i and p.default is inspect.Parameter.empty:
                keys.append(base[:i] + ((type(None), None),) + base[i + 1:])
            elif p.default is None:
                keys.append(base[:i] + (_TENSOR,) + base[i + 1:])
        return keys

    def run(self, m: nn.Module, args: tuple, kwargs: dict):
        if self.stateful:
            return _MISS
        if self.signature is None:  # unpickled or copied: traced again on use
            self.signature = _signature(type(m)._fastgen_base.forward)
        arg_key, tensors = _arguments(self.signature, args, kwargs)
        if arg_key is None:
            return _MISS
        key = (arg_key, m.training, torch.is_grad_enabled(), _state(m))
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) >= _KEYS_PER_MODULE or _tracing_now():
                return _MISS
            fn, outcome = _compile(m, self.signature, arg_key, m.training, torch.is_grad_enabled())
            if fn is None and isinstance(outcome, str) and outcome.endswith(_DROPPED):
                self.stateful = True
                return _MISS
            plan = self.plans[key] = _Plan(fn, (tuple(m.__dict__.values()), tuple(m._modules.values())))
        return _MISS if plan.fn is None else plan.fn(m, *tensors)


_is_fx_tracing = getattr(fx._symbolic_trace, "is_fx_tracing_symbolic_tracing", fx._symbolic_trace.is_fx_tracing)


def _tracing_now() -> bool:
    return torch.compiler.is_compiling() or _is_fx_tracing()


def _signature(forward):
    """The forward's parameters after self, or None where they cannot be read."""
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    return tuple(p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def _arguments(signature, args: tuple, kwargs: dict):
    """(the call's key, its tensor arguments in order), or (None, None) for a call no trace can
    stand for (more arguments than named parameters, a value that is not a tensor nor a plain
    constant, a missing argument: the original forward raises what it raises)."""
    if len(args) > len(signature):
        return None, None
    key, tensors = [], []
    for i, p in enumerate(signature):
        if i < len(args):
            v = args[i]
            if p.name in kwargs:
                return None, None
        elif p.name in kwargs and p.kind is not p.POSITIONAL_ONLY:
            v = kwargs[p.name]
        elif p.default is not inspect.Parameter.empty:
            key.append(_DEFAULT)
            continue
        else:
            return None, None
        if isinstance(v, torch.Tensor) and type(v) in (torch.Tensor, nn.Parameter):
            key.append(_TENSOR)
            tensors.append(v)
        elif v is p.default:
            key.append(_DEFAULT)
        else:
            k = _value_key(v)
            if k is None:
                return None, None
            key.append(k)
    if len(kwargs) > sum(1 for p in signature if p.name in kwargs):
        return None, None
    return tuple(key), tensors


def _forward_refusal(cls: type) -> str:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""
    if "random." in source.replace("torch.random.", "").replace("np.random.", "random."):
        return f"{cls.__name__}.forward draws from Python's or NumPy's random numbers: fx would freeze the draw"
    return ""


def _shim(m: nn.Module, signature, arg_key, training: bool) -> nn.Module:
    """A stand-in for m to trace: m's attributes (containers copied, so that what tracing writes
    does not reach m) and a forward whose parameters are the call key's tensors alone, calling m's
    forward with the key's constants and defaults."""
    base = type(m).__dict__.get("_fastgen_base", type(m))
    names = [p.name for p, k in zip(signature, arg_key) if k == _TENSOR]

    def call(self, *tensors):
        it = iter(tensors)
        args, kwargs = [], {}
        for p, k in zip(signature, arg_key):
            if k == _DEFAULT and p.kind is not p.POSITIONAL_ONLY:
                continue
            v = next(it) if k == _TENSOR else p.default if k == _DEFAULT else k[1]
            if p.kind is p.POSITIONAL_ONLY:
                args.append(v)
            elif p.kind is p.KEYWORD_ONLY:
                kwargs[p.name] = v
            else:
                kwargs[p.name] = v
        out = base.forward(self, *args, **kwargs)
        self.__dict__["_fastgen_output_type"] = type(out)
        return out

    namespace = {"_call": call}
    exec(f"def forward(self, {', '.join(names)}):\n    return _call(self, {', '.join(names)})", namespace)
    shim = object.__new__(type(base.__name__, (base,), {"forward": namespace["forward"]}))
    shim.__dict__.update(m.__dict__)
    for d in ("_parameters", "_buffers", "_modules"):
        shim.__dict__[d] = dict(m.__dict__[d])
    shim.__dict__.pop("_fastgen_plans", None)
    shim.__dict__["training"] = training
    return shim


class _OwnCodeTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # children stay calls
        return True


def _containers(m: nn.Module) -> dict:
    return {k: (len(v), tuple(map(id, v)), tuple(map(id, v.values())) if isinstance(v, dict) else ())
            for k, v in m.__dict__.items() if isinstance(v, (list, dict, set)) and k not in _INTERNAL}


_DROPPED = ": fx would drop that"


def _trace(m, signature, arg_key, training, grad, path, report) -> tuple[int, str]:
    fn, outcome = _compile(m, signature, arg_key, training, grad, path, report)
    return (outcome, "") if fn is not None else (0, outcome)


def _compile(m, signature, arg_key, training, grad, path="", report=None):
    """(fn(self, *tensors), number fused) for one call key; (None, why not) where it does not fuse."""
    report = report or ConversionReport()
    shim = _shim(m, signature, arg_key, training)
    before = _containers(m)
    saved = {k: copy.copy(v) for k, v in m.__dict__.items() if k in before}
    try:
        with torch.set_grad_enabled(grad):
            graph = _OwnCodeTracer().trace(shim)
    except Exception as e:  # anything fx cannot follow: the original forward runs, and we say why
        first = str(e).splitlines()[0][:120] if str(e) else ""
        return None, f"{type(m).__name__}.forward is not traceable by torch.fx ({type(e).__name__}: {first})"
    finally:
        after = _containers(m)
        changed = [k for k in before if after.get(k) != before[k]]
        for k in changed:  # what the trace put into m's lists, dicts and sets is taken out again
            if isinstance(saved[k], list):
                m.__dict__[k][:] = saved[k]
            else:
                m.__dict__[k].clear()
                m.__dict__[k].update(saved[k])
    if changed:
        return None, f"{type(m).__name__}.forward changes the module's lists or dicts{_DROPPED}"
    output = shim.__dict__.pop("_fastgen_output_type")
    if output not in (fx.Proxy, tuple, list, dict) and not _dataclass_dict(output) \
            and not (issubclass(output, tuple) and hasattr(output, "_fields")):
        return None, f"{type(m).__name__}.forward returns a {output.__name__}, which fx does not rebuild"
    written = [k for k, v in shim.__dict__.items() if k not in _INTERNAL and m.__dict__.get(k, _MISS) is not v]
    written += [d for d in ("_parameters", "_buffers", "_modules") if shim.__dict__[d] != m.__dict__[d]]
    if written:
        return None, f"{type(m).__name__}.forward sets {', '.join(sorted(written))}{_DROPPED}"
    modules = dict(shim.named_modules())
    fused = _rewrite(graph, modules, path, report)
    if not fused:
        return None, ""
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<fastgen.convert: {type(m).__qualname__}.forward>", "exec"), namespace)
    fn = namespace["forward"]
    if _dataclass_dict(output):  # fx gives a diffusers BaseOutput (a dataclass and a dict) back as a dict
        return (lambda self, *tensors: output(**fn(self, *tensors))), fused
    return fn, fused


def _dataclass_dict(cls: type) -> bool:
    return issubclass(cls, dict) and dataclasses.is_dataclass(cls)


class _Chain:
    """Plans tried in turn; the first that runs the call answers."""

    def __init__(self, plans):
        self.plans = list(plans)

    def run(self, m, args, kwargs):
        for plan in self.plans:
            out = plan.run(m, args, kwargs)
            if out is not _MISS:
                return out
        return _MISS


class _PairedForward:
    """The module's forward compiled again from its source with each norm + activation pair written
    as two statements made one call to _module_pair_call (fastgen/paired.py): for forwards fx cannot
    follow. Made again on first use after a copy or unpickling."""

    def __init__(self):
        self.fn, self.tried = None, False

    def prepare(self, m, path, report) -> bool:
        self.tried = True
        base = type(m).__dict__.get("_fastgen_base", type(m))
        modules = dict(m.named_children())

        def accept(norm_name, act_name):
            return _fusable_pair(modules.get(norm_name), modules.get(act_name)) is not None

        try:
            self.fn, pairs = pair_rewrite(base.forward, accept, _module_pair_call)
        except (SyntaxError, ValueError, TypeError, OSError):  # a source that does not compile again
            self.fn, pairs = None, []
        for norm_name, act_name in pairs:
            report.add("fused", _join(path, norm_name),
                       _norm_act_text(modules[norm_name], *_fusable_pair(modules[norm_name], modules[act_name])))
        return self.fn is not None

    def run(self, m, args, kwargs):
        if not self.tried:
            self.prepare(m, "", ConversionReport())
        return _MISS if self.fn is None else self.fn(m, *args, **kwargs)


def _fusable_pair(norm, act):
    """(activation name, alpha) where `norm` is a norm fastgen fuses and `act` an activation layer of
    the table, else None."""
    if not _norm_like(norm) or _norm_refusal(norm) or type(act).__module__ != "torch.nn.modules.activation":
        return None
    try:
        return activation_of(act)
    except TypeError:
        return None


def _module_pair_call(norm, act, x):
    """act(norm(x)) for two layers a forward called one after the other: fused where both are still
    a fusable pair (checked at each call: the layers may have been replaced), else the two calls."""
    pair = _fusable_pair(norm, act)
    return act(norm(x)) if pair is None else _norm_act_call(norm, act, (), *pair, x)


class _RMSNormForward:
    """A video VAE's RMS norm (_RMS_NORMS) on its own, not followed by an activation in a forward
    fastgen fuses: the norm alone as rms_norm_act with the identity (one read and one write instead
    of five passes)."""

    def prepare(self, m, path, report) -> bool:
        if not m.channel_first:
            report.add("left", path, f"{type(m).__name__} over the last dimension (channel_first=False): not fused")
            return False
        report.add("fused", path, f"{type(m).__name__} -> rms_norm_act(identity)")
        return True

    def run(self, m, args, kwargs):
        if len(args) != 1 or kwargs or _hooked(m):
            return _MISS
        settings = _rms_settings(m, args[0])
        return _MISS if settings is None else rms_norm_act(args[0], *settings, "identity", clamp=True)


class _PerChannelRMSForward:
    """LTX-2's PerChannelRMSNorm on its own (its blocks put a timestep scale and shift between it and
    the activation): rms_norm_act with the identity, one read and one write instead of five passes.
    Its forward takes a channel_dim argument and ignores it: such calls run the original."""

    def prepare(self, m, path, report) -> bool:
        if _source_hash(type(m)) != _PER_CHANNEL_RMS[1]:
            report.add("left", path, "this diffusers version's PerChannelRMSNorm.forward is not the one fastgen mirrors")
            return False
        if m.channel_dim != 1:
            report.add("left", path, f"PerChannelRMSNorm over dimension {m.channel_dim}, not the channels: not fused")
            return False
        report.add("fused", path, "PerChannelRMSNorm -> rms_norm_act(identity)")
        return True

    def run(self, m, args, kwargs):
        settings = _per_channel_rms_settings(m, args[0]) if len(args) == 1 and not kwargs else None
        return _MISS if settings is None else rms_norm_act(args[0], *settings, "identity")


# ---------------------------------------------------------------------------------------------
# diffusers' Upsample2D: its forward reads shapes and dtypes in Python, which fx cannot trace; this
# is that forward (diffusers 0.42) with the interpolation and the convolution as one op. It is used
# only where the installed Upsample2D.forward is the one it mirrors (its source's hash).

_UPSAMPLE2D_SOURCE = "3c0e13df5e4ac796"


class _Upsample2D:
    def prepare(self, m, path, report) -> bool:
        digest = _source_hash(type(m))
        conv_name = "conv" if m.name == "conv" else "Conv2d_0"
        where = _join(path, conv_name)
        if digest != _UPSAMPLE2D_SOURCE:
            report.add("left", path, "this diffusers version's Upsample2D.forward is not the one fastgen mirrors")
        elif not m.use_conv or m.use_conv_transpose or not m.interpolate or m.norm is not None:
            report.add("left", path, "Upsample2D without an interpolation followed by a Conv2d (transposed, "
                                     "normalized or conv-less)")
        elif _conv_refusal(getattr(m, conv_name)):
            report.add("left", where, _conv_refusal(getattr(m, conv_name)))
        else:
            report.add("fused", where, "Upsample2D's interpolate + Conv2d -> upsample_conv2d(nearest, x2)")
            return True
        return False

    def run(self, m, args, kwargs):
        if len(args) + len(kwargs) > 2 or (kwargs and set(kwargs) - {"hidden_states", "output_size"}):
            return _MISS
        x = args[0] if args else kwargs.get("hidden_states")
        output_size = args[1] if len(args) > 1 else kwargs.get("output_size")
        conv = m.conv if m.name == "conv" else m.Conv2d_0
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != m.channels or m.norm is not None \
                or m.use_conv_transpose or not m.interpolate or not m.use_conv or _conv_refusal(conv) \
                or _hooked(conv) or not _plain_call(x, conv.weight, conv.bias):
            return _MISS
        if output_size is not None and tuple(output_size) != (2 * x.shape[2], 2 * x.shape[3]):
            return _MISS
        if x.shape[0] >= 64 or x.numel() * 2 > 2 ** 31:  # diffusers makes such inputs contiguous
            x = x.contiguous()
        return upsample_conv2d(x, conv.weight, conv.bias, scale_factor=2, mode="nearest", padding=conv.padding[0])


# ---------------------------------------------------------------------------------------------
# The video VAEs' causal 3-D convolutions (diffusers 0.42; each used only where the installed
# forward is the one mirrored, by its source's hash): the causal padding and the convolution as
# upsample_conv3d, whose CPU backend hands the convolution to oneDNN (aten sends these small-batch
# 3-D convolutions to its slow im2col path).

def _plain_conv3d(conv, padding_modes=("zeros",)) -> bool:
    return isinstance(conv, nn.Conv3d) and tuple(conv.stride) == (1, 1, 1) and tuple(conv.dilation) == (1, 1, 1) \
        and conv.groups == 1 and conv.padding_mode in padding_modes and isinstance(conv.padding, tuple)


_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class _CausalConv3d:
    """A causal convolution written as padding in time, then the convolution: Wan's and QwenImage's
    WanCausalConv3d(nn.Conv3d) (zeros, a feature cache prepended in time), HunyuanVideo's (F.pad in the
    layer's pad_mode, then its child nn.Conv3d), LTX's (copies of the first frame, and of the last
    where not causal, then its child) and CogVideoX's, which Mochi uses too (its own padding method,
    replicate or the first frame / a cache, then its child CogVideoXSafeConv3d; it returns the
    convolution and the next cache). Only the zero padding of the convolution is folded: the frames
    put in front are the original's copies."""
    SOURCES = {"afffb99acd515ba2": "cached", "70f04cf3106c379f": "padded", "f59da342199a71d6": "ltx",
               "cccfd18730efcce3": "ltx2", "ce0570bf0ae334bd": "cogvideox"}
    SAFE_CONV = "b94af19627fdfc1c"  # CogVideoXSafeConv3d.forward: the convolution, in time chunks past 2 GiB

    @classmethod
    def _conv(cls, m, kind):
        """The layer's convolution where fastgen folds it: Wan's layer is its own (an nn.Conv3d whose
        forward is the one mirrored); the others' child is an nn.Conv3d itself (a subclass may change
        its forward) or CogVideoX's safe one. LTX's convolutions may pad in space by reflection."""
        if kind == "cached":
            return m if _plain_conv3d(m) else None
        conv = getattr(m, "conv", None)
        if type(conv) is not nn.Conv3d and not (kind == "cogvideox" and _source_hash(type(conv)) == cls.SAFE_CONV):
            return None
        return conv if _plain_conv3d(conv, _PADDING_MODES if kind in ("ltx", "ltx2") else ("zeros",)) else None

    def prepare(self, m, path, report) -> bool:
        kind = self.SOURCES.get(_source_hash(type(m)))
        if kind is None:
            report.add("left", path, f"this diffusers version's {type(m).__name__}.forward is not the one fastgen mirrors")
        elif self._conv(m, kind) is None:
            report.add("left", path, f"{type(m).__name__} with a stride, dilation, groups, padding mode or convolution "
                                     "class fastgen does not fold")
        elif tuple(self._conv(m, kind).kernel_size) == (1, 1, 1):
            report.add("left", path, f"{type(m).__name__} of a 1x1x1 kernel: no padding to fold, and aten's pointwise "
                                     "path is faster than oneDNN's on the CPU (CogVideoX's spatial norms)")
        else:
            report.add("fused", path, f"{type(m).__name__}'s causal padding + Conv3d -> upsample_conv3d")
            return True
        return False

    @staticmethod
    def _arguments(kind, args, kwargs):
        """(x, cache) of the call, or None for a call the mirrored forward would not take."""
        names = {"cached": ("x", "cache_x"), "cogvideox": ("inputs", "conv_cache"),
                 "ltx2": ("hidden_states", "causal")}.get(kind, ("hidden_states",))
        if len(args) > len(names) or set(kwargs) - set(names[len(args):]):
            return None
        values = [*args, *(kwargs.get(n, True if n == "causal" else None) for n in names[len(args):])]
        x, cache = values[0], values[1] if len(values) > 1 else None  # LTX-2: whether causal, not a cache
        if not isinstance(x, torch.Tensor) or x.dim() != 5 \
                or (cache is not None and not isinstance(cache, bool if kind == "ltx2" else torch.Tensor)):
            return None
        return x, cache

    def run(self, m, args, kwargs):
        kind = self.SOURCES.get(_source_hash(type(m)._fastgen_base))
        call = self._arguments(kind, args, kwargs)
        conv = self._conv(m, kind)
        if call is None or conv is None or _hooked(conv) or not _plain_call(call[0], conv.weight, conv.bias):
            return _MISS
        x, cache = call
        pt, ph, pw = conv.padding  # zero in time in these layers (and for Wan's in space), but a user may set it
        pads = [pw, pw, ph, ph, pt, pt]
        if kind == "padded":  # HunyuanVideo
            x = F.pad(x, m.time_causal_padding, mode=m.pad_mode)
        elif kind in ("ltx", "ltx2"):  # causal: an attribute of LTX's layer, an argument of LTX-2's
            k, causal = m.kernel_size[0], m.is_causal if kind == "ltx" else cache
            if causal:  # as the original: no empty repeat (torch_xla cannot make one)
                x = torch.concatenate([x[:, :, :1].repeat((1, 1, k - 1, 1, 1)), x], dim=2)
            else:
                side = (k - 1) // 2
                x = torch.concatenate([x[:, :, :1].repeat((1, 1, side, 1, 1)), x,
                                       x[:, :, -1:].repeat((1, 1, side, 1, 1))], dim=2)
            if conv.padding_mode != "zeros":  # nn.Conv3d pads these modes with F.pad, then convolves unpadded
                x, pads = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), [0] * 6
        elif kind == "cogvideox":
            x = m.fake_context_parallel_forward(x, cache)
            cache = None if m.pad_mode == "replicate" else x[:, :, -m.time_kernel_size + 1:].clone()
            if x.numel() * 2 / 1024 ** 3 > 2:  # CogVideoXSafeConv3d convolves such clips in time chunks
                return conv(x), cache
            return upsample_conv3d(x, conv.weight, conv.bias, 1, tuple(pads)), cache
        else:  # Wan: the cached frames stand in for the causal zeros
            pads = [a + b for a, b in zip(pads, m._padding)]
            if cache is not None and m._padding[4] > 0:
                x = torch.cat([cache.to(x.device), x], dim=2)
                pads[4] -= cache.shape[2]
        if min(pads) < 0:  # F.pad would crop
            return _MISS
        return upsample_conv3d(x, conv.weight, conv.bias, 1, tuple(pads))


class _HunyuanUpsample:
    """HunyuanVideoUpsampleCausal3D: the first frame upsampled in space only, the others in time and
    space (nearest), concatenated, then its causal convolution (replicate padding: two copies of the
    first frame in front, a pixel around). The same frames come out of upsampling the clip with one
    copy of its first frame in front (and a replicated pixel around) and dropping the first output
    frame (and the outermost pixels): upsample_conv3d without the upsampled clip. Kernels of 3, stride
    1, replicate padding, factors (2, 2, 2) or (1, 2, 2); XLA has no upsample_nearest3d lowering, so
    this is also what keeps a HunyuanVideo decode on a TPU."""
    SOURCE = "1a034fe4c3b920df"

    def prepare(self, m, path, report) -> bool:
        if _source_hash(type(m)) != self.SOURCE:
            report.add("left", path, f"this diffusers version's {type(m).__name__}.forward is not the one fastgen mirrors")
        elif not self._foldable(m):
            report.add("left", path, f"{type(m).__name__} with a kernel, stride, padding or factor fastgen does not fold")
        else:
            report.add("fused", path, f"{type(m).__name__}'s nearest upsampling + causal Conv3d -> upsample_conv3d")
            return True
        return False

    @staticmethod
    def _foldable(m) -> bool:
        conv = getattr(m, "conv", None)
        inner = getattr(conv, "conv", None)
        return _source_hash(type(conv).__dict__.get("_fastgen_base", type(conv))) == "70f04cf3106c379f" \
            and type(inner) is nn.Conv3d and _plain_conv3d(inner) and tuple(inner.kernel_size) == (3, 3, 3) and tuple(inner.padding) == (0, 0, 0) \
            and conv.pad_mode == "replicate" and tuple(conv.time_causal_padding) == (1, 1, 1, 1, 2, 0) \
            and tuple(m.upsample_factor) in ((2, 2, 2), (1, 2, 2))

    def run(self, m, args, kwargs):
        if len(args) + len(kwargs) != 1 or set(kwargs) - {"hidden_states"}:
            return _MISS
        x = args[0] if args else kwargs["hidden_states"]
        conv = m.conv
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or not self._foldable(m) or _hooked(conv) \
                or _hooked(conv.conv) or not _plain_call(x, conv.conv.weight, conv.conv.bias):
            return _MISS
        if tuple(m.upsample_factor) == (2, 2, 2) and x.shape[2] > 1:
            small = F.pad(x, (1, 1, 1, 1, 1, 0), mode="replicate")
            y = upsample_conv3d(small, conv.conv.weight, conv.conv.bias, 2, 0)[:, :, 1:, 1:-1, 1:-1]
        else:  # every frame in space only (one frame, or a (1, 2, 2) factor)
            small = F.pad(x, (1, 1, 1, 1, 2, 0), mode="replicate")
            y = upsample_conv3d(small, conv.conv.weight, conv.conv.bias, (1, 2, 2), 0)[:, :, :, 1:-1, 1:-1]
        return y.contiguous(memory_format=memory_format(x))


_CAUSAL_CONVS = ("diffusers.models.autoencoders.autoencoder_kl_wan.WanCausalConv3d",
                 "diffusers.models.autoencoders.autoencoder_kl_qwenimage.QwenImageCausalConv3d",
                 "diffusers.models.autoencoders.autoencoder_kl_hunyuan_video.HunyuanVideoCausalConv3d",
                 "diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15.HunyuanVideo15CausalConv3d",
                 "diffusers.models.autoencoders.autoencoder_kl_hunyuanimage_refiner.HunyuanImageRefinerCausalConv3d",
                 "diffusers.models.autoencoders.autoencoder_kl_ltx.LTXVideoCausalConv3d",
                 "diffusers.models.autoencoders.autoencoder_kl_ltx2.LTX2VideoCausalConv3d",
                 "diffusers.models.autoencoders.autoencoder_kl_cogvideox.CogVideoXCausalConv3d")

_KNOWN = {"diffusers.models.upsampling.Upsample2D": _Upsample2D, **{name: _CausalConv3d for name in _CAUSAL_CONVS},
          "diffusers.models.autoencoders.autoencoder_kl_hunyuan_video.HunyuanVideoUpsampleCausal3D": _HunyuanUpsample,
          _PER_CHANNEL_RMS[0]: _PerChannelRMSForward}
