"""One declarative spec per op, registered once: the registry every part of the project reads.

An op file ends with `define(OpSpec(...))`: its name, public function, one `Impl` per backend (the
launcher, the dtypes it takes, the fastgen._C kernels it calls), its auto order where it is not the
usual one, small examples, and whether it is a custom op of its own. The reference, fake and
autograd functions are found in the op's file under the house names (`<op>_ref`, `_fake_<op>`,
`_backward_<op>`, `_setup_context_<op>`: shared/STYLE.md), and the custom op's schema is read from
the fake's annotations (as torch.library.custom_op reads a decorated function's). `define` makes the
`torch.library` custom op `fastgen::<name>` from it; `fastgen.dispatch.select` picks a backend from
it; the tests (case lists, registered kernels, the XLA stage's examples), the benchmark suites and
tools/gpu_check.sh read their lists from REGISTRY instead of keeping their own.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Optional

import torch

FLOATING = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})
NO_FLOAT64 = frozenset({torch.float32, torch.float16, torch.bfloat16})  # the Triton kernels' dtypes


@dataclass(frozen=True)
class Impl:
    """One backend of an op."""
    run: Callable                        # the custom op's arguments, `backend` left out -> its result
    dtypes: frozenset = FLOATING         # the input dtypes it takes
    kernels: tuple[str, ...] = ()        # the fastgen._C ops it calls (tests/test_build.py checks them)


def cpp_impls(run: Callable, *kernels: str) -> dict[str, Impl]:
    """The "cpu" and "cuda" backends of an op whose fastgen._C kernels have one launcher for both
    devices (the dispatcher picks the CPU or the CUDA kernel by the tensors' device)."""
    return {"cpu": Impl(run, kernels=kernels), "cuda": Impl(run, kernels=kernels)}


# The CPU auto order of an op with C++ kernels, fastest first (benchmarks/NOTES.md). CUDA has no order
# here: auto there takes what the GPU record verified (fastgen.dispatch), fastest first.
KERNELS_FIRST = {"cpu": ("cpu", "composite")}
# In bfloat16 and float16 the C++ CPU kernels convert element by element and eager's vectorized
# kernels win (benchmarks/results/bench-cpu-bfloat16-quick.json; float16: cpu-float16-untuned.json):
# ops whose kernels lose there say so with this.
EAGER_IN_LOW_PRECISION = {f"cpu/{dtype}": ("reference", "composite") for dtype in ("bfloat16", "float16")}


@dataclass(frozen=True)
class Example:
    """A small call of the public function, run against the reference by generic tests and the XLA stage."""
    name: str
    inputs: Callable[[], tuple]          # fresh CPU tensors and positional arguments (x first)
    kwargs: Mapping = field(default_factory=dict)
    grad_of: tuple[int, ...] = (0,)      # positions of the inputs that get gradients


@dataclass(frozen=True)
class OpSpec:
    name: str
    public: Callable                     # fastgen.ops.<name>
    impls: Mapping[str, Impl]            # backend -> Impl; "composite" always, "reference" is `ref`
    examples: tuple[Example, ...] = ()
    # "cpu[/<variant>][/<layout>][/<dtype>]" -> backends, fastest first (fastgen.dispatch.auto_order);
    # those the op lacks are passed over
    auto: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(KERNELS_FIRST))
    custom_op: bool = False              # True: fastgen::<name>, `str backend` its last argument;
                                         # False: a composition of other ops, whose backends it borrows
    xla: Optional[Callable] = None       # the XLA kernel; default: the composite
    launch_empty: bool = False           # True: the implementations handle inputs with no elements
    # found by `define` in the op's file:
    ref: Optional[Callable] = None       # <name>_ref: the spec, the test oracle, the benchmark baseline
    fake: Optional[Callable] = None      # _fake_<name>: shapes only; also the result for an empty input
    backward: Optional[Callable] = None  # _backward_<name>
    setup_context: Optional[Callable] = None  # _setup_context_<name>

    @property
    def backends(self) -> frozenset[str]:
        return frozenset({"reference", *self.impls})

    @property
    def kernels(self) -> dict[str, tuple[str, ...]]:
        """Backend -> the fastgen._C ops it calls."""
        return {name: impl.kernels for name, impl in self.impls.items() if impl.kernels}


REGISTRY: dict[str, OpSpec] = {}
_EAGER: dict[str, type] = {}  # name -> the custom op's implementation and autograd as an autograd.Function
_RUN: dict[str, Callable] = {}  # name -> the custom op's implementation (its arguments, backend last)


def call(spec: OpSpec, *args):
    """fastgen::<name>(*args): the custom op's arguments, backend last. Eager calls on CPU or CUDA
    tensors run the same implementation and autograd formula through a plain autograd.Function:
    torch.library's Python layers around a custom op (its autograd wrapper, the redispatch, the
    backend wrapper) cost about 70 us a forward+backward, as much as a 1M-element norm's compute
    on 2 cores (benchmarks/NOTES.md); where nothing needs a gradient (inference: a decode under
    no_grad) the implementation runs without the autograd.Function too (another 40-80 us a call, a
    video VAE makes hundreds). Traced code (torch.compile, torch.export), XLA and other devices call
    the custom op itself."""
    if torch.compiler.is_compiling() or args[0].device.type not in ("cpu", "cuda"):
        return getattr(torch.ops.fastgen, spec.name)(*args)
    if not torch.is_grad_enabled() or not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return _RUN[spec.name](*args)
    return _EAGER[spec.name].apply(*args)


def on_device(x):
    """x's CUDA device made current while an implementation runs: Triton launches (and the caching
    allocator's streams) follow the current device, so a tensor on cuda:1 while cuda:0 is current
    would fault. A no-op elsewhere."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def define(spec: OpSpec) -> OpSpec:
    """Adds spec to REGISTRY and, when it has a schema, registers the custom op fastgen::<name>: a
    CPU/CUDA kernel that runs the named backend, an XLA kernel, the fake and the autograd formula."""
    if spec.name in REGISTRY:
        raise RuntimeError(f"fastgen op {spec.name} is defined twice")
    assert "composite" in spec.impls, f"{spec.name}: every op has a composite (the XLA path)"
    module = vars(sys.modules[spec.public.__module__])
    named = {"ref": f"{spec.name}_ref"}
    if spec.custom_op:
        named.update(fake=f"_fake_{spec.name}", backward=f"_backward_{spec.name}",
                     setup_context=f"_setup_context_{spec.name}")
    spec = replace(spec, **{field: module[name] for field, name in named.items()})
    REGISTRY[spec.name] = spec
    if not spec.custom_op:
        return spec
    impls, fake = spec.impls, spec.fake

    def run(*args):
        *args, backend = args
        if not spec.launch_empty and args[0].numel() == 0:  # nothing to compute: no launch
            return fake(*args, backend)
        with on_device(args[0]):
            return impls[backend].run(*args)

    _RUN[spec.name] = run
    xla = spec.xla or impls["composite"].run
    op = torch.library.custom_op(f"fastgen::{spec.name}", run, mutates_args=(), device_types=("cpu", "cuda"),
                                 schema=torch.library.infer_schema(fake, mutates_args=()))
    op.register_kernel("xla")(lambda *args: xla(*args[:-1]))
    op.register_fake(fake)
    if spec.backward is not None:
        op.register_autograd(spec.backward, setup_context=spec.setup_context)
        def forward(ctx, *args):  # the ctx-first form: the setup_context form binds a signature per call
            out = run(*args)
            spec.setup_context(ctx, args, out)
            return out

        _EAGER[spec.name] = type(f"{spec.name}_eager", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(spec.backward)})
    return spec
