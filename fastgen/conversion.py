"""fastgen.convert and fastgen.unconvert: fused layers swapped into an existing model wherever they
compute exactly what the layers they replace compute, and back.

What is fused (every swap keeps the state_dict keys, so one state dict loads into the model before
and after, and the fused layers share the original parameters and buffers):
  - runs inside an nn.Sequential: Upsample then Conv2d -> UpsampleConv2d; GroupNorm then an
    activation -> GroupNormAct; BatchNorm2d then an activation -> BatchNormAct2d;
  - known classes (diffusers, matched by name, so diffusers is never imported here): Upsample2D ->
    its upsampling and convolution fused; ResnetBlock2D's norm1/norm2 + nonlinearity and the VAE
    Encoder/Decoder's conv_norm_out + conv_act -> GroupNormAct;
  - any other module whose own forward calls F.interpolate or an activation function: traced with
    torch.fx (its children kept as calls) and rewritten where an interpolate feeds a Conv2d child
    used nowhere else, or a GroupNorm/BatchNorm2d child's only user is an activation.
The layer whose work moved into its neighbour is kept in place as a FusedAway (an identity) that
remembers it. The returned module carries `fastgen_report`: what was fused, and what was left and why.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from fastgen.activations import activation_of, torch_layer
from fastgen.nn import BatchNormAct2d, GroupNormAct, UpsampleConv2d

log = logging.getLogger("fastgen")


@dataclass
class ConversionReport:
    fused: list[tuple[str, str]] = field(default_factory=list)  # (module path, what was fused)
    left: list[tuple[str, str]] = field(default_factory=list)   # (module path, why it was not)

    def __str__(self) -> str:
        lines = [f"fastgen.convert: {len(self.fused)} fused, {len(self.left)} left"]
        lines += [f"  fused  {path or '(root)'}: {what}" for path, what in self.fused]
        lines += [f"  left   {path or '(root)'}: {why}" for path, why in self.left]
        return "\n".join(lines)


class FusedAway(nn.Identity):
    """The place of a layer whose work a neighbouring fused layer does now: passes its input on."""

    def __init__(self, original: nn.Module, into: str):
        super().__init__()
        self._fastgen_original = (original,)  # not a child: no state of its own, nothing to load
        self.into = into

    def extra_repr(self) -> str:
        return f"{type(self._fastgen_original[0]).__name__} -> {self.into}"


def convert(module: nn.Module, inplace: bool = False) -> nn.Module:
    """`module` with fastgen's fused layers swapped in wherever they are exactly equivalent (see the
    module docstring); a copy unless inplace. The result's `fastgen_report` says what changed."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    module = module if inplace else copy.deepcopy(module)
    report = ConversionReport()
    module = _convert(module, "", report)
    module.fastgen_report = report
    log.info("%s", report)
    return module


def unconvert(module: nn.Module, inplace: bool = False) -> nn.Module:
    """Undoes fastgen.convert: every swapped layer back to the original, holding the current
    parameters and buffers (trained, loaded or moved since); a copy unless inplace."""
    module = module if inplace else copy.deepcopy(module)
    module = _restore(module)
    if "fastgen_report" in vars(module):
        del module.fastgen_report
    return module


# ---------------------------------------------------------------------------------------------
# the walk

def _convert(m: nn.Module, path: str, report: ConversionReport) -> nn.Module:
    if _is_fastgen(m):
        return m
    known = _KNOWN.get(_diffusers_name(m))
    if known is not None:
        m = known(m, path, report)
    if isinstance(m, nn.Sequential):
        _fuse_sequential(m, path, report)
    for name, child in list(m.named_children()):
        new = _convert(child, _join(path, name), report)
        if new is not child:
            setattr(m, name, new)
    if known is None and not isinstance(m, nn.Sequential) and _calls_fusable_functions(m):
        m = _fuse_traced(m, path, report)
    return m


def _restore(m: nn.Module) -> nn.Module:
    if "_fastgen_original" in vars(m):
        (original,) = m._fastgen_original
        _relink(original, m)
        m = original
    for name, child in list(m.named_children()):
        new = _restore(child)
        if new is not child:
            setattr(m, name, new)
    return m


def _relink(original: nn.Module, fused: nn.Module) -> None:
    """Points the original's parameters and buffers at the fused module's (same names by
    construction): what was trained, loaded or moved to another device since stays."""
    for kind, items in (("_parameters", fused.named_parameters(remove_duplicate=False)),
                        ("_buffers", fused.named_buffers(remove_duplicate=False))):
        for name, t in items:
            owner, _, leaf = name.rpartition(".")
            target = original.get_submodule(owner) if owner else original
            if leaf in getattr(target, kind):
                getattr(target, kind)[leaf] = t


def _is_fastgen(m: nn.Module) -> bool:
    return "_fastgen_original" in vars(m) or type(m).__module__.startswith("fastgen.")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _diffusers_name(m: nn.Module) -> str | None:
    cls = type(m)
    return cls.__name__ if cls.__module__.startswith("diffusers.") else None


def _recast(m: nn.Module, cls: type, children: dict | None = None) -> nn.Module:
    """A shallow copy of m (the same attributes, parameters and buffers, so the same state_dict) of
    class cls (a subclass with one method replaced), some children swapped; m itself is untouched."""
    new = copy.copy(m)
    new._modules = dict(m._modules) | (children or {})
    new.__class__ = cls
    return new


def _remember(fused: nn.Module, original: nn.Module) -> nn.Module:
    fused._fastgen_original = (original,)
    return fused


# ---------------------------------------------------------------------------------------------
# the fused layers, from the torch layers they replace (sharing their parameters and buffers)

def _norm_act(norm: nn.Module, act: nn.Module | None) -> tuple[nn.Module | None, str]:
    """The fused norm + activation layer, or None and why not."""
    try:
        name, slope = activation_of(act)
    except TypeError as e:
        return None, str(e)
    if type(norm) is nn.GroupNorm:
        fused = GroupNormAct.from_modules(norm, torch_layer(name, slope))
    elif type(norm) is nn.BatchNorm2d:
        fused = BatchNormAct2d.from_modules(norm, torch_layer(name, slope))
    else:
        return None, f"{type(norm).__name__} has no fused counterpart"
    return _remember(fused, norm), f"{type(fused).__name__}({name})"


def _upsample_conv(upsample: nn.Upsample, conv: nn.Module) -> tuple[nn.Module | None, str]:
    if type(conv) is not nn.Conv2d:
        return None, f"{type(conv).__name__} after the upsampling is not an nn.Conv2d"
    try:
        fused = UpsampleConv2d.from_modules(upsample, conv)
    except (TypeError, ValueError) as e:
        return None, str(e)
    return _remember(fused, conv), f"UpsampleConv2d({fused.mode}, x{fused.scale_factor})"


# ---------------------------------------------------------------------------------------------
# nn.Sequential runs

def _fuse_sequential(seq: nn.Sequential, path: str, report: ConversionReport) -> None:
    names = list(seq._modules)
    for first, second in zip(names, names[1:]):
        a, b = seq._modules[first], seq._modules[second]
        if _is_fastgen(a) or _is_fastgen(b):
            continue
        if type(a) in (nn.GroupNorm, nn.BatchNorm2d) and type(b).__module__ == "torch.nn.modules.activation":
            fused, what = _norm_act(a, b)
            where = _join(path, first)
            if fused is None:
                report.left.append((where, what))
                continue
            seq._modules[first], seq._modules[second] = fused, FusedAway(b, into=first)
            report.fused.append((where, f"{type(a).__name__} + {type(b).__name__} -> {what}"))
        elif type(a) is nn.Upsample and isinstance(b, nn.Conv2d):
            fused, what = _upsample_conv(a, b)
            where = _join(path, second)
            if fused is None:
                report.left.append((where, what))
                continue
            seq._modules[first], seq._modules[second] = FusedAway(a, into=second), fused
            report.fused.append((where, f"Upsample + Conv2d -> {what}"))


# ---------------------------------------------------------------------------------------------
# known classes (diffusers)

def _fuse_pairs(pairs):
    """A handler for a class whose forward applies `act` right after `norm` and nowhere else."""
    def handle(m: nn.Module, path: str, report: ConversionReport) -> nn.Module:
        why = _why_not_pairs(m)
        for norm_name, act_name in pairs:
            where = _join(path, norm_name)
            norm, act = getattr(m, norm_name, None), getattr(m, act_name, None)
            if why or norm is None:
                report.left.append((where, why or f"{type(m).__name__} has no {norm_name}"))
                continue
            fused, what = _norm_act(norm, act)
            if fused is None:
                report.left.append((where, what))
                continue
            setattr(m, norm_name, fused)
            report.fused.append((where, f"{norm_name} + {act_name} -> {what}"))
        for _, act_name in pairs:  # the activation's work is done by the norms now
            act = getattr(m, act_name, None)
            if all(_is_fastgen(getattr(m, n)) for n, a in pairs if a == act_name) and not _is_fastgen(act):
                setattr(m, act_name, FusedAway(act, into=", ".join(n for n, a in pairs if a == act_name)))
        return m
    return handle


def _why_not_pairs(m: nn.Module) -> str:
    """ResnetBlock2D also applies its nonlinearity to the time embedding, and with a scale-shift
    time embedding normalizes before its shift: then norm + activation are not one step."""
    if getattr(m, "time_emb_proj", None) is not None:
        return "ResnetBlock2D with a time embedding: its nonlinearity is applied to the embedding too"
    if getattr(m, "time_embedding_norm", "default") == "scale_shift":
        return "ResnetBlock2D with time_embedding_norm='scale_shift'"
    return ""


def _fuse_upsample2d(m: nn.Module, path: str, report: ConversionReport) -> nn.Module:
    conv_name = "conv" if m.name == "conv" else "Conv2d_0"
    conv = getattr(m, conv_name, None)
    where = _join(path, conv_name)
    if not m.use_conv or m.use_conv_transpose or not m.interpolate or m.norm is not None:
        report.left.append((path, "Upsample2D without an interpolation followed by a Conv2d (transposed, "
                                  "normalized or conv-less)"))
        return m
    fused, what = _upsample_conv(nn.Upsample(scale_factor=2, mode="nearest"), conv)
    if fused is None:
        report.left.append((where, what))
        return m
    new = _recast(m, _subclass(type(m), "forward", _upsample2d_forward), {conv_name: fused})
    report.fused.append((where, f"Upsample2D's interpolate + {conv_name} -> {what}"))
    return _remember(new, m)


def _upsample2d_forward(self, hidden_states, output_size=None, *args, **kwargs):
    """diffusers' Upsample2D with the fused layer; any output_size other than 2x takes the original
    path (interpolate to that size, then the same weights)."""
    conv = self.conv if self.name == "conv" else self.Conv2d_0
    if output_size is None or tuple(output_size) == tuple(2 * s for s in hidden_states.shape[-2:]):
        return conv(hidden_states)
    hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
    return F.conv2d(hidden_states, conv.weight, conv.bias, padding=conv.padding)


def __getattr__(name: str):
    """The Fused* classes, made on first use; unpickling a converted model in a fresh process asks
    for them by name before any conversion ran."""
    if name == "FusedUpsample2D":
        from diffusers.models.upsampling import Upsample2D
        return _subclass(Upsample2D, "forward", _upsample2d_forward)
    if name == "FusedResnetBlock2D":
        from diffusers.models.resnet import ResnetBlock2D
        return _subclass(ResnetBlock2D, "forward", _resnet_block_forward)
    raise AttributeError(name)


def _fuse_resnet_block(m: nn.Module, path: str, report: ConversionReport) -> nn.Module:
    """ResnetBlock2D: both norms with the nonlinearity, then (when nothing else needs the original
    forward) a forward that adds the residual in place and skips the division by an
    output_scale_factor of 1 (x / 1.0 is x): two passes over the block's output fewer."""
    m = _fuse_pairs([("norm1", "nonlinearity"), ("norm2", "nonlinearity")])(m, path, report)
    if not (_is_fastgen(m.norm1) and _is_fastgen(m.norm2)) or m.upsample is not None or m.downsample is not None:
        return m
    return _remember(_recast(m, _subclass(type(m), "forward", _resnet_block_forward)), m)


def _resnet_block_forward(self, input_tensor, temb=None, *args, **kwargs):
    if temb is not None or args or kwargs:
        return super(type(self), self).forward(input_tensor, temb, *args, **kwargs)
    hidden = self.conv1(self.norm1(input_tensor))  # the norms apply the nonlinearity
    hidden = self.conv2(self.dropout(self.norm2(hidden)))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor.contiguous() if self.training else input_tensor)
    hidden = hidden.add_(input_tensor)  # conv2's output is ours: its backward does not need it
    return hidden if self.output_scale_factor == 1 else hidden / self.output_scale_factor


_SUBCLASSES: dict[tuple[type, str], type] = {}


def _subclass(base: type, name: str, method) -> type:
    """base with one method replaced, made once per base and importable from this module by name
    (so a converted model pickles)."""
    key = (base, name)
    if key not in _SUBCLASSES:
        cls = type(f"Fused{base.__name__}", (base,), {name: method, "__module__": __name__})
        _SUBCLASSES[key] = cls
        globals()[cls.__name__] = cls
    return _SUBCLASSES[key]


_KNOWN = {
    "ResnetBlock2D": _fuse_resnet_block,
    "Encoder": _fuse_pairs([("conv_norm_out", "conv_act")]),
    "Decoder": _fuse_pairs([("conv_norm_out", "conv_act")]),
    "Upsample2D": _fuse_upsample2d,
}


# ---------------------------------------------------------------------------------------------
# torch.fx: a module's own forward

# torch function -> (activation name, its alpha from the call's arguments) or None when the call's
# arguments make it another function than the table's
def _leaky(node):
    slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
    return ("leaky_relu", slope) if isinstance(slope, (int, float)) else None


def _gelu(node):
    approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    return {"none": ("gelu", 0.01), "tanh": ("gelu_tanh", 0.01)}.get(approximate)


def _defaults_only(name):
    return lambda node: (name, 0.01) if len(node.args) == 1 and set(node.kwargs) <= {"inplace"} else None


_FUNCTIONS = {F.silu: _defaults_only("silu"), F.relu: _defaults_only("relu"), torch.relu: _defaults_only("relu"),
              F.leaky_relu: _leaky, F.gelu: _gelu, torch.sigmoid: _defaults_only("sigmoid"),
              F.sigmoid: _defaults_only("sigmoid"), torch.tanh: _defaults_only("tanh"), F.tanh: _defaults_only("tanh"),
              F.elu: _defaults_only("elu"), F.selu: _defaults_only("selu"), F.softplus: _defaults_only("softplus")}
_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_CANDIDATE_WORDS = ("interpolate", "silu", "relu", "gelu", "sigmoid", "tanh", "elu", "softplus")


def _calls_fusable_functions(m: nn.Module) -> bool:
    """A cheap look at the forward's source before tracing: only modules that call a function fx
    could fuse are traced."""
    if type(m).__module__.startswith("torch."):
        return False
    try:
        source = inspect.getsource(type(m).forward)
    except (OSError, TypeError):
        return False
    return any(word in source for word in _CANDIDATE_WORDS)


class _OwnCodeTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # children stay calls
        return True


def _activation_call(node: fx.Node, m: nn.Module):
    """(name, alpha) when node applies an activation of the table to its first argument alone."""
    if node.op == "call_function" and node.target in _FUNCTIONS:
        return _FUNCTIONS[node.target](node)
    if node.op == "call_method" and node.target in _METHODS and len(node.args) == 1 and not node.kwargs:
        return _METHODS[node.target], 0.01
    if node.op == "call_module":
        try:
            return activation_of(m.get_submodule(node.target))
        except TypeError:
            return None
    return None


def _interpolation(node: fx.Node):
    """(scale, mode) of an F.interpolate call by an integer scale factor, else None."""
    if node.op != "call_function" or node.target is not F.interpolate:
        return None
    names = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
    kw = dict(zip(names, node.args)) | dict(node.kwargs)
    scale, mode = kw.get("scale_factor"), kw.get("mode", "nearest")
    if kw.get("size") is not None or kw.get("antialias") or kw.get("align_corners") \
            or not isinstance(scale, (int, float)) or scale != int(scale) or isinstance(scale, bool):
        return None
    return int(scale), mode


def _is_child(target: str) -> bool:
    return "." not in target  # a grandchild called directly stays: swapping it would touch its parent


def _fuse_traced(m: nn.Module, path: str, report: ConversionReport) -> nn.Module:
    try:
        graph = _OwnCodeTracer().trace(m)
    except Exception as e:  # anything fx cannot follow: the module stays as it is, and we say why
        report.left.append((path, f"{type(m).__name__}.forward is not traceable by torch.fx "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"))
        return m
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    swaps = {}
    for node in list(graph.nodes):
        if node.op == "call_module" and _is_child(node.target) and calls[node.target] == 1 and len(node.users) == 1:
            norm = m.get_submodule(node.target)
            (user,) = node.users
            act = _activation_call(user, m) if type(norm) in (nn.GroupNorm, nn.BatchNorm2d) else None
            if act is not None and user.args[:1] == (node,):
                fused, what = _norm_act(norm, torch_layer(*act))
                if fused is not None:
                    swaps[node.target] = fused
                    user.replace_all_uses_with(node)
                    graph.erase_node(user)
                    report.fused.append((_join(path, node.target), f"{type(norm).__name__} + {act[0]} -> {what}"))
        resampling = _interpolation(node)
        if resampling is not None and len(node.users) == 1:
            (user,) = node.users
            if user.op == "call_module" and _is_child(user.target) and calls[user.target] == 1 \
                    and user.args[:1] == (node,):
                conv = m.get_submodule(user.target)
                fused, what = _upsample_conv(nn.Upsample(scale_factor=resampling[0], mode=resampling[1]), conv)
                where = _join(path, user.target)
                if fused is None:
                    report.left.append((where, what))
                    continue
                swaps[user.target] = fused
                user.args = (node.args[0] if node.args else node.kwargs["input"],) + tuple(user.args[1:])
                graph.erase_node(node)
                report.fused.append((where, f"F.interpolate + Conv2d -> {what}"))
    if not swaps:
        return m
    graph.lint()
    return _remember(_with_forward(m, graph, swaps), m)


def _with_forward(m: nn.Module, graph: fx.Graph, swaps: dict) -> nn.Module:
    """m recast with the swapped children, its class m's with forward compiled from the rewritten graph."""
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<fastgen.convert: {type(m).__qualname__}.forward>", "exec"), namespace)
    cls = type(type(m).__name__, (type(m),), {"forward": namespace["forward"], "__module__": type(m).__module__,
                                               "fastgen_forward_source": code.src})
    return _recast(m, cls, swaps)  # swaps: children only (the tracer keeps them whole)

