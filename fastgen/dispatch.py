"""Which implementation of an op runs: the backend registry and its selection rules.

Backends a user can name:
  reference  the eager composition (`<op>_ref`), the spec;
  composite  an algebraic rewrite in plain aten ops: the XLA/TPU path, and the CPU fast path;
  cpu        C++ CPU kernels in fastgen._C (ops that have them);
  cuda       CUDA C++ kernels in fastgen._C;
  triton     Triton kernels (CPU tensors only under TRITON_INTERPRET=1);
  auto       the fastest available for the tensor's device (XLA tensors always take composite); on
             CUDA only what a GPU run verified (fastgen/gpu_verified.json), else the eager path.

The choice comes from, first to last: the op's `backend=` keyword, the innermost
`fastgen.use_backend(name)` block, the environment variable FASTGEN_BACKEND (read at import), "auto".
Asking for a backend that cannot run raises; nothing falls back silently.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("fastgen")

NAMES = ("reference", "composite", "cpu", "cuda", "triton")
# the device types each backend runs on (triton on CPU tensors only under the interpreter)
DEVICES = {"reference": ("cpu", "cuda", "xla"), "composite": ("cpu", "cuda", "xla"), "cpu": ("cpu",),
           "cuda": ("cuda",), "triton": ("cpu", "cuda")}
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _probe_extension() -> tuple[str, str]:
    """Why the C++ kernels, and why the CUDA kernels, cannot run ('' when they can)."""
    try:
        from fastgen import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)
    except ImportError as e:
        why = f"fastgen._C is not built ({e})"
        return why, why
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastgen::_upsample_conv2d_fused", "CUDA"):
        return "", "fastgen._C was built without CUDA (see README: building on a CUDA machine)"
    return "", ""


def _probe_triton() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    return ""


_EXT_WHY, _CUDA_WHY = _probe_extension()

_TRITON_WHY = _probe_triton()

# The record tools/gpu_check.sh writes after running every op's CUDA backends on a GPU against the
# float64 reference: device, compute capability, versions, git sha, and per op / backend / dtype
# whether it passed and its speedup over eager. Without a passing entry, auto never picks a fused
# kernel on a CUDA device (no kernel of ours has run on a GPU until such a record is committed).
# FASTGEN_GPU_RECORD names another record: tools/gpu_check.sh's sweep reads the one its verify just wrote.
VERIFIED_PATH = Path(os.environ.get("FASTGEN_GPU_RECORD") or Path(__file__).with_name("gpu_verified.json"))


RECORD_FORMAT = 3  # op -> backend -> dtype -> record_layout -> entry


def _load_verified(path: Path = VERIFIED_PATH) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


_VERIFIED = _load_verified()


def _device_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def verified_speedup(op: str, backend: str, dtype: torch.dtype, device: torch.device,
                     memory_layout: str = "nchw") -> float | None:
    """The recorded speedup over eager of `backend` for `op` at `dtype` in `memory_layout` (a
    fastgen.dispatch.record_layout key) on a GPU of `device`'s compute capability, when a GPU run passed
    exactly that; else None (also for an entry verified but not timed). A record of another format
    verifies nothing: format 1 had no memory formats, format 2 one "nhwc" for 4-D and 5-D alike."""
    record = _VERIFIED
    if not record or record.get("format") != RECORD_FORMAT or \
            tuple(record.get("capability") or ()) != tuple(_device_capability(device)):
        return None
    entry = record.get("ops", {}).get(op, {}).get(backend, {}).get(str(dtype).replace("torch.", ""), {})
    entry = entry.get(memory_layout) if isinstance(entry, dict) else None
    if not (isinstance(entry, dict) and entry.get("passed") and entry.get("speedup_vs_eager")):
        return None
    return float(entry["speedup_vs_eager"])


@dataclass(frozen=True)
class Backend:
    name: str
    available: bool
    reason: str  # why not available, or on which devices it runs

    def __str__(self) -> str:
        return f"{self.name:10s} {'yes' if self.available else 'no ':4s} {self.reason}"


def backends() -> dict[str, Backend]:
    """Every backend, whether this install can run it, and why (not)."""
    has_gpu = torch.cuda.is_available()
    triton_where = "CUDA tensors" if has_gpu else ""
    if _INTERPRET:
        triton_where = (triton_where + " and " if triton_where else "") + "CPU tensors (interpreter)"
    triton_why = _TRITON_WHY or (
        "" if triton_where else "no CUDA device; set TRITON_INTERPRET=1 to run it on CPU tensors"
    )
    table = [
        Backend("reference", True, "all devices"),
        Backend("composite", True, "all devices (the XLA path)"),
        Backend("cpu", not _EXT_WHY, _EXT_WHY or "CPU tensors"),
        Backend("cuda", not _CUDA_WHY, _CUDA_WHY or ("CUDA tensors" if has_gpu else "CUDA tensors (no GPU here)")),
        Backend("triton", not triton_why, triton_where if not triton_why else triton_why),
    ]
    return {b.name: b for b in table}


class _PerThread(threading.local):
    """The use_backend blocks open in this thread: one thread's block never changes another's choice."""

    def __init__(self):
        self.stack: list[str] = []


_blocks = _PerThread()
_env_default = os.environ.get("FASTGEN_BACKEND", "auto").strip() or "auto"


def _validate_name(name: str, argname: str = "backend") -> str:
    if not isinstance(name, str) or (name not in NAMES and name != "auto"):
        raise ValueError(f"{argname} must be one of {('auto',) + NAMES}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the fastgen ops inside this block with backend `name` (an op's own backend= wins); the
    block holds for the thread that opened it."""
    _blocks.stack.append(_validate_name(name))
    try:
        yield
    finally:
        _blocks.stack.pop()


def requested(backend: str | None) -> str:
    if backend is not None:
        return _validate_name(backend)
    if _blocks.stack:
        return _blocks.stack[-1]
    return _validate_name(_env_default, "FASTGEN_BACKEND")


def _unavailable(name: str, device: torch.device) -> str:
    """Why backend `name` cannot run on `device` ('' when it can)."""
    kind = device.type
    if name in ("reference", "composite"):
        return ""
    if name == "cpu":
        return _EXT_WHY or ("" if kind == "cpu" else f"it runs on CPU tensors, not {kind}")
    if name == "cuda":
        return _CUDA_WHY or ("" if kind == "cuda" else f"it runs on CUDA tensors, not {kind}")
    if _TRITON_WHY:
        return _TRITON_WHY
    if kind == "cuda" or (kind == "cpu" and _INTERPRET):
        return ""
    if kind == "cpu":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before importing torch)"
    return f"Triton does not run on {kind} tensors"


def _unsupported(spec, name: str, dtype: torch.dtype) -> str:
    """Why backend `name` of op `spec` cannot take `dtype` ('' when it can)."""
    impl = spec.impls.get(name)
    if impl is None or dtype in impl.dtypes:
        return ""
    takes = ", ".join(sorted(str(d).replace("torch.", "") for d in impl.dtypes))
    return f"the {name} backend takes {takes}, not {str(dtype).replace('torch.', '')}"


_warned: set[tuple[str, str, str]] = set()


CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # by rank: images, video


def layout(x: torch.Tensor) -> str:
    """'nhwc' for a channels-last tensor (4-D channels_last or 5-D channels_last_3d, that is not also
    contiguous), else 'nchw' (the ops' output layout follows it: fastgen.ops._util.memory_format)."""
    fmt = CHANNELS_LAST.get(x.dim())
    if fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
        return "nhwc"
    return "nchw"


def record_layout(x: torch.Tensor) -> str:
    """The GPU record's memory-format key: 'nchw' / 'nhwc' for 4-D maps (and other ranks), 'ncdhw' /
    'ndhwc' for 5-D clips, whose channels-last kernels take other paths than the 4-D ones."""
    cl = layout(x) == "nhwc"
    if x.dim() == 5:
        return "ndhwc" if cl else "ncdhw"
    return "nhwc" if cl else "nchw"


_recorders: list[list] = []


@contextlib.contextmanager
def auto_choices():
    """Inside the block, every choice `auto` makes is appended to the yielded list as (op, backend):
    what the benchmarks report as auto's backend, and what the tests check against the measurements."""
    picks: list = []
    _recorders.append(picks)
    try:
        yield picks
    finally:
        _recorders.remove(picks)


def select(spec, x: torch.Tensor, backend: str | None, variant: str | None = None) -> str:
    """The backend op `spec` (a fastgen.ops._registry.OpSpec) runs on for input x.

    An explicitly named backend runs or raises. `auto` walks the spec's order for x's device, the
    most specific entry first (auto_order: keys "<device>[/<variant>][/<layout>][/<dtype>]"; variants
    are an op's mode or size classes, e.g. upsample_conv2d's modes; layouts "nchw" and "nhwc"), and
    takes the first backend that this install has and that
    takes x's dtype; XLA tensors always take the composite; CUDA tensors what a GPU run verified.
    Falling past the first choice is logged once per op, device and choice. Backends in the order
    that the op does not have are passed over (orders are shared).
    """
    name = requested(backend)
    device = x.device
    if torch._C._are_functorch_transforms_active():
        # torch.library's autograd for custom ops has no functorch rules (torch 2.14: "must override the
        # setup_context staticmethod"): under torch.func, auto runs the reference; a named fast backend says so
        if name not in ("auto", "reference"):
            raise RuntimeError(f"{spec.name}: backend '{name}' cannot run under a torch.func transform (vmap, grad, "
                               f"jvp, jacrev, ...); under torch.func, auto (or backend='reference') runs the reference")
        return "reference"
    if name != "auto":
        if name not in spec.backends:
            raise NotImplementedError(f"{spec.name} has no '{name}' backend; it has {sorted(spec.backends)}")
        why = _unavailable(name, device) or _unsupported(spec, name, x.dtype)
        if why:
            raise RuntimeError(f"{spec.name}: backend '{name}' is not available: {why}")
        return name
    choice = _select_auto(spec, x, variant)
    for picks in _recorders:
        picks.append((spec.name, choice))
    return choice


def auto_order(spec, kind: str, variant: str | None, memory_layout: str, dtype: torch.dtype) -> tuple[str, ...]:
    """The spec's auto order for a device kind, variant, layout and dtype: the entry whose key names
    the most of them ("cpu/<variant>/<layout>/<dtype>", then "cpu/<variant>/<layout>", ...,
    "cpu/<dtype>", "cpu"), earlier qualifiers breaking ties."""
    qualifiers = [q for q in (variant, memory_layout, str(dtype).replace("torch.", "")) if q]
    for subset in (c for r in range(len(qualifiers), -1, -1) for c in itertools.combinations(qualifiers, r)):
        key = "/".join((kind, *subset))
        if key in spec.auto:
            return spec.auto[key]
    return ("composite",)


def _select_auto(spec, x: torch.Tensor, variant: str | None) -> str:
    device = x.device
    kind = device.type
    if kind == "xla":
        return "composite"
    if kind == "cuda":
        return _select_verified(spec, x)
    order = auto_order(spec, kind, variant, layout(x), x.dtype)
    candidates = [c for c in order if c in spec.backends]  # an op without a backend passes it over
    for choice in candidates:
        why = _unavailable(choice, device) or _unsupported(spec, choice, x.dtype)
        if not why:
            return choice
        key = (spec.name, kind, choice)
        if choice == candidates[0] and key not in _warned:  # an explicit, logged fallback, once
            _warned.add(key)
            log.warning("fastgen: %s on %s: '%s' is unavailable (%s); auto takes the next in %s",
                        spec.name, kind, choice, why, order)
    return "composite"


def _select_verified(spec, x: torch.Tensor) -> str:
    """auto on CUDA: the fastest backend the committed GPU record verified and measured faster than
    eager for this op, dtype, memory format and compute capability; else the eager path (reference),
    said once per op and dtype."""
    speed = {}
    for name in spec.impls:
        if not (_unavailable(name, x.device) or _unsupported(spec, name, x.dtype)):
            s = verified_speedup(spec.name, name, x.dtype, x.device, record_layout(x))
            if s is not None and s > 1.0:  # a kernel slower than eager is never auto's choice
                speed[name] = s
    if speed:
        return max(speed, key=speed.get)
    key = (spec.name, "cuda", str(x.dtype))
    if key not in _warned:
        _warned.add(key)
        log.warning("fastgen: %s on cuda (%s): no GPU run has verified a fused kernel faster than eager on "
                    "this device (fastgen/gpu_verified.json); auto runs the eager path. Opt in with "
                    "backend='cuda' or 'triton', fastgen.use_backend(...) or FASTGEN_BACKEND.", spec.name, x.dtype)
    return "reference"


def verified_summary() -> str:
    """What the committed GPU record says, for `python -m fastgen info`."""
    record = _VERIFIED
    if not record:
        return "GPU-verified kernels: none (no GPU run recorded; auto on CUDA runs the eager path)"
    passed = sorted(f"{op}/{b}/{d}/{m}" for op, bs in record.get("ops", {}).items() for b, ds in bs.items()
                    for d, ms in ds.items() for m, e in ms.items() if isinstance(e, dict) and e.get("passed"))
    return (f"GPU-verified kernels ({record.get('device')}, capability {record.get('capability')}, "
            f"git {str(record.get('git_sha'))[:10]}): {len(passed)} op/backend/dtype/layout passed: " + ", ".join(passed))


def summary() -> str:
    return "fastgen backends:\n" + "\n".join(f"  {b}" for b in backends().values()) + "\n  " + verified_summary()
