"""torch.compile(model, backend="fastgen"): the fusion rules (fastgen.rules) over the graphs TorchDynamo
captures, then Inductor for the rest.

Dynamo does what makes a rewrite exact: it inlines every module's forward into torch functions,
guards each graph on what it assumed (attributes, the training flag, hooks, dtypes, shapes) and
captures again when that changes, keeps torch.rand and its kin as ops of the graph, and replays list
and attribute mutations. Here each captured graph is rewritten (every rule occurrence fused, or left
with its reason) and handed to Inductor, or run as it is with options={"inductor": False} (no
compile time; the fused ops are fastgen's kernels either way).

    model = torch.compile(model, backend="fastgen")
    fastgen.compiler.report()      # what was fused and left, graphs captured, graph breaks

The name "fastgen" comes from the installed package's entry point (setup.cfg: torch_dynamo_backends,
torch's registry for third-party backends: nothing is imported until a model compiles with it);
from a source tree that pip did not install, pass backend=fastgen.compiler.backend.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx

from fastgen.rules import RULES, Match

log = logging.getLogger("fastgen")


@dataclass
class Report:
    """Since the last reset: each graph's fused occurrences and the ones left with their reasons, at
    the source line that wrote them."""
    graphs: int = 0
    fused: list[tuple[str, str]] = field(default_factory=list)   # (where, what)
    left: list[tuple[str, str]] = field(default_factory=list)    # (where, why)

    def graph_breaks(self) -> dict[str, int]:
        """TorchDynamo's graph breaks (reason -> count) since torch._dynamo.reset()."""
        from torch._dynamo.utils import counters
        return dict(counters["graph_break"])

    def __str__(self) -> str:
        fused = Counter(what for _, what in self.fused)
        lines = [f"fastgen: {self.graphs} graphs, {len(self.fused)} fused, {len(self.left)} left, "
                 f"{sum(self.graph_breaks().values())} graph breaks"]
        lines += [f"  fused x{n}  {what}" for what, n in fused.most_common()]
        lines += [f"  left   {where}: {why}" for where, why in self.left]
        lines += [f"  break  x{n}  {why}" for why, n in self.graph_breaks().items()]
        return "\n".join(lines)


_REPORT = Report()


def report() -> Report:
    return _REPORT


def reset() -> None:
    """Forget what was reported (torch._dynamo.reset() forgets the compiled graphs)."""
    global _REPORT
    _REPORT = Report()


def _where(node: fx.Node) -> str:
    """The module that wrote node (its path in the model, as Dynamo recorded it) and the node's name."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return f"{path}: {node.name}" if path else node.name


def rewrite(gm: fx.GraphModule, report: Report | None = None) -> int:
    """Fuses every rule occurrence in gm's graph in place; returns how many."""
    report = _REPORT if report is None else report
    graph, fused = gm.graph, 0
    for match in RULES:  # rule by rule: the longer patterns claim their nodes first (an RMS norm holds a pixel norm)
        order = {n: i for i, n in enumerate(graph.nodes)}
        gone: set = set()
        for node in list(graph.nodes):
            if node in gone:
                continue
            found = match(node)
            if isinstance(found, str):
                report.left.append((_where(node), found))
            elif found is not None:
                report.fused.append((_where(node), f"{found.rule} -> {found.op}"))
                _apply(graph, found, order)
                gone.update([found.node, *found.erase])
                fused += 1
    graph.lint()
    gm.recompile()
    return fused


def _apply(graph: fx.Graph, m: Match, order: dict) -> None:
    with graph.inserting_before(m.node):
        new = graph.call_function(m.fn, m.args)
        # the captured values of what the new nodes compute, as later rules read them: the fused op's is
        # its input's shape in the chain's dtype before the casts
        new.meta = dict((m.casts[0].args[0] if m.casts else m.node).meta)
        for cast in m.casts:  # the chain's dtype casts, now after the fused op
            new = graph.call_method(cast.target, (new, *cast.args[1:]))
            new.meta = dict(cast.meta)
    new.meta = dict(m.node.meta)
    m.node.replace_all_uses_with(new)
    for n in sorted({m.node, *m.erase}, key=order.__getitem__, reverse=True):  # users before what they read
        graph.erase_node(n)


def _autocast(gm: fx.GraphModule) -> str:
    """Why autocast rules this graph ('' when it does not): on where it was captured, or entered in it."""
    for device in ("cpu", "cuda", "xpu", "mps"):
        try:
            if torch.is_autocast_enabled(device):
                return f"captured under torch.autocast({device!r})"
        except (RuntimeError, ValueError):  # a device type this torch does not know
            continue
    if any(getattr(n.target, "__name__", "") == "_enter_autocast" for n in gm.graph.nodes):
        return "the graph enters torch.autocast"
    return ""


def backend(gm: fx.GraphModule, example_inputs, options: dict | None = None):
    """The "fastgen" backend of torch.compile. options: {"inductor": False} runs the rewritten graph
    as it is; the others go to Inductor."""
    options = dict(options or {})
    inductor = options.pop("inductor", True)
    _REPORT.graphs += 1
    why = _autocast(gm)
    if why:  # autocast picks each op's dtype (group_norm fp32, conv2d low): a fused op would run in neither
        _REPORT.left.append((f"graph {_REPORT.graphs}", f"nothing fused: {why}"))
        n = 0
    else:
        n = rewrite(gm)
    log.info("fastgen: graph %d, %d fused", _REPORT.graphs, n)
    if not inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, example_inputs, config_patches=options or None)
