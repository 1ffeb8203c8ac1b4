"""The op registry (fastgen.ops.REGISTRY): every spec complete and consistent, every reference an
independent oracle, every example right on every CPU backend, and the lists read from it."""

import ast
import builtins
import inspect
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastgen
from fastgen import activations
from fastgen import bench
from fastgen.bench import SUITES
from fastgen.dispatch import NAMES
from fastgen.ops import REGISTRY
from fastgen.ops.pixel_norm import _pixel_norm_composite
from fastgen.ops.upsample_conv2d import _check_upsample_conv2d
from cases import cpu_backends, fast_backends, skip_unavailable
from tolerances import assert_close, assert_close_grad

ROOT = Path(__file__).resolve().parents[1]
SPECS = list(REGISTRY.values())
IDS = [spec.name for spec in SPECS]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_spec_is_complete(spec):
    assert spec.public.__name__ == spec.name
    assert "composite" in spec.impls and set(spec.impls) <= set(NAMES) - {"reference"}
    for key, order in spec.auto.items():
        assert key.split("/")[0] == "cpu" and set(order) <= set(NAMES), key  # CUDA: the GPU record decides
        assert set(order) & spec.backends, f"{spec.name}: auto[{key}] names none of its backends"
    assert spec.examples, f"{spec.name} has no example (the XLA stage and the tests below run them)"
    assert spec.ref.__name__ == spec.name + "_ref"
    if spec.custom_op:
        assert spec.fake.__name__ == f"_fake_{spec.name}" and spec.backward and spec.setup_context
        schema = str(getattr(torch.ops.fastgen, spec.name).default._schema)
        assert schema.startswith(f"fastgen::{spec.name}(") and "str backend) ->" in schema


def _globals_used(fn) -> set[str]:
    """The module-level names a function's body reads."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(fn))).body
    body = [n for stmt in node.body for n in ast.walk(stmt)]  # not the annotations
    local = {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
    local |= {n.id for n in body if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return {n.id for n in body if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - local


def _independent(name: str, value) -> bool:
    """What a reference may use: torch and math, builtins, constants, torch's and Python's types,
    other references, its own argument check (whose result it may not use: _checks_used), and the
    torch layer of an activation (torch's own class per name, each pinned against torch by
    tests/test_activations.py)."""
    if getattr(builtins, name, None) is value:
        return True
    if isinstance(value, types.ModuleType):
        return value.__name__.split(".")[0] in ("torch", "math")
    if isinstance(value, type):
        return value.__module__.split(".")[0] in ("torch", "builtins", "typing")
    if value is activations.torch_layer:
        return True
    if callable(value):
        return name.endswith("_ref") or name.startswith("_check_")
    return isinstance(value, (int, float, str, tuple))


def _violations(ref) -> list[str]:
    found = []
    for name in _globals_used(ref):
        value = ref.__globals__[name] if name in ref.__globals__ else getattr(builtins, name)
        if not _independent(name, value):
            found.append(name)
    return found + _checks_used(ref) + (["torch.ops"] if "torch.ops" in inspect.getsource(ref) else [])


def _checks_used(fn) -> list[str]:
    """The argument checks whose result the reference uses: the values they parse (padding, scales,
    defaults) are the implementation's, and a parsing bug would be shared by oracle and kernel.
    A check called as a statement, its result dropped, only validates."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(fn))).body
    bare = {id(s.value.func) for s in ast.walk(node) if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)}
    return [f"{n.id} (its result)" for n in ast.walk(node)
            if isinstance(n, ast.Name) and n.id.startswith("_check_") and id(n) not in bare]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_reference_is_an_independent_oracle(spec):
    """The reference shares no code with the fast paths: any other fastgen function it called could
    change the spec and the implementation together."""
    assert _violations(spec.ref) == [], f"{spec.ref.__name__} uses code that is not torch's"


def _shared_pixel_norm_ref(x, eps=1e-8):  # the composite dressed up as a reference
    return _pixel_norm_composite(x, eps)


def _shared_parser_ref(x, weight, bias=None, scale_factor=2, mode="nearest", padding=None):
    scale, pad = _check_upsample_conv2d(x, weight, bias, scale_factor, mode, padding)  # the kernel's parsing
    return F.conv2d(F.interpolate(x, scale_factor=scale, mode=mode), weight, bias, padding=pad)


def test_the_guard_catches_a_shared_helper():
    assert _violations(_shared_pixel_norm_ref) == ["_pixel_norm_composite"]
    assert _violations(_shared_parser_ref) == ["_check_upsample_conv2d (its result)"]


EXAMPLES = [pytest.param(spec, ex, backend, id=f"{ex.name}-{backend}")
            for spec in SPECS for ex in spec.examples for backend in ["reference", *cpu_backends(spec.name)]]


@pytest.mark.parametrize("spec,example,backend", EXAMPLES)
def test_example_matches_the_float64_reference(spec, example, backend):
    skip_unavailable(backend, "cpu")
    inputs = [t.requires_grad_(True) if i in example.grad_of else t for i, t in enumerate(example.inputs())]
    out = spec.public(*inputs, **example.kwargs, backend=backend)
    as64 = [t.detach().double().requires_grad_(t.requires_grad) if torch.is_tensor(t) else t for t in inputs]
    kw64 = {k: v.double() if torch.is_tensor(v) else v for k, v in example.kwargs.items()}
    want = spec.ref(*as64, **kw64)
    assert_close(out, want, torch.float32)
    grad = torch.randn(out.shape)
    got = torch.autograd.grad(out, [inputs[i] for i in example.grad_of], grad)
    wanted = torch.autograd.grad(want, [as64[i] for i in example.grad_of], grad.double())
    for g, w in zip(got, wanted, strict=True):
        assert_close_grad(g, w, torch.float32)


def test_every_custom_op_has_a_benchmark_suite_and_a_readme_row():
    readme = (ROOT / "README.md").read_text()
    for spec in SPECS:
        if spec.custom_op:
            assert spec.name in SUITES, f"{spec.name} has no suite in fastgen/bench/"
        assert f"`fastgen.ops.{spec.name}`" in readme, f"README's ops table lacks {spec.name}"
    assert sorted(s.op for s in bench._SUITES) == sorted(SUITES), "a suite names an op that is not registered"


EXAMPLES64 = [pytest.param(spec, ex, b, id=f"{spec.name}-{ex.name}-{b}") for spec in SPECS for ex in spec.examples
              for b in cpu_backends(spec.name, torch.float64)]


@pytest.mark.parametrize("spec,example,backend", EXAMPLES64)
def test_float64_stays_float64(spec, example, backend):
    """Every backend that takes float64 computes in float64: output and gradients agree with the
    reference to near float64 precision (no Python scalar, no float32 constant rounds on the way)."""
    skip_unavailable(backend, "cpu")
    as64 = [t.double() if torch.is_tensor(t) and t.is_floating_point() else t for t in example.inputs()]
    kw64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in example.kwargs.items()}
    results = []
    for name in (backend, "reference"):
        inputs = [t.detach().clone().requires_grad_(i in example.grad_of) if torch.is_tensor(t) else t
                  for i, t in enumerate(as64)]
        out = spec.public(*inputs, **kw64, backend=name)
        grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        results.append([out] + list(torch.autograd.grad(out, [inputs[i] for i in example.grad_of], grad)))
    for got, want in zip(*results, strict=True):
        assert got.dtype == torch.float64
        scale = max(1.0, want.abs().max().item())
        assert (got - want).abs().max().item() <= 1e-12 * scale, (got - want).abs().max().item()


@pytest.mark.serial
@pytest.mark.parametrize("spec,example,backend", EXAMPLES)
def test_forward_is_bitwise_reproducible_across_calls_and_thread_counts(spec, example, backend):
    skip_unavailable(backend, "cpu")
    if spec.name == "upsample_conv3d" and (backend == "reference" or example.name.endswith("causal")):
        pytest.skip("aten's own CPU conv3d at these sizes (slow_conv3d: im2col + a gemm) sums in an order that "
                    "depends on the thread count; the cpu backend (oneDNN) is checked")
    inputs = example.inputs()
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            outs.append(spec.public(*inputs, **example.kwargs, backend=backend))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.serial
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", ["cpu", "composite"])
def test_norm_statistics_do_not_depend_on_the_thread_count(backend, channels_last):
    """Maps large enough that the C++ kernels split their reductions over threads."""
    from fastgen.ops import batch_norm_act, group_norm_act

    skip_unavailable(backend, "cpu")
    if backend == "cpu" and not fastgen.backends()["cpu"].available:
        pytest.skip(fastgen.backends()["cpu"].reason)
    x = torch.randn(8, 64, 48, 40).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    w, b = torch.randn(64), torch.randn(64)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append((group_norm_act(x, 8, w, b, backend=backend),
                         batch_norm_act(x, None, None, w, b, True, backend=backend)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# every backend, the CUDA ones on a GPU (marked cuda: tools/gpu_check.sh runs them)
NAN_CASES = [pytest.param(spec, ex, "reference", "cpu", id=f"{ex.name}-reference") for spec in SPECS
             for ex in spec.examples] + [
    pytest.param(spec, ex, *p.values, id=f"{ex.name}-{p.id}", marks=p.marks) for spec in SPECS
    for ex in spec.examples for p in fast_backends(spec.name)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("spec,example,backend,device", NAN_CASES)
def test_nan_and_inf_land_where_eager_puts_them(spec, example, backend, device, bad):
    """A NaN or an Inf in one input pixel: the output is non-finite exactly where the unfused layers'
    output is (a NaN in one group or sample does not leak into another's); a NaN input gives NaN in
    eager's positions, on every backend (a max() in a kernel that returns the other operand for a NaN
    fails here). (An Inf may come out as Inf where eager has Inf - Inf = NaN: upsample_conv2d's fold
    adds the weights that meet the same input pixel before multiplying.)"""
    skip_unavailable(backend, device)
    inputs = [t.to(device) if torch.is_tensor(t) else t for t in example.inputs()]
    inputs[0][(0,) * inputs[0].dim()] = bad
    got = spec.public(*inputs, **{k: v.to(device) if torch.is_tensor(v) else v for k, v in example.kwargs.items()},
                      backend=backend).cpu()
    inputs = [t.cpu() if torch.is_tensor(t) else t for t in inputs]
    want = spec.ref(*[t.double() if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs],
                    **{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                       for k, v in example.kwargs.items()})
    assert torch.equal(got.isfinite(), want.isfinite()), \
        f"{int((~got.isfinite()).sum())} non-finite vs eager's {int((~want.isfinite()).sum())}"
    if bad != bad:  # NaN
        assert torch.equal(got.isnan(), want.isnan()) and want.isnan().any() and not want.isnan().all()


@pytest.mark.parametrize("spec,example", [pytest.param(s, e, id=e.name) for s in SPECS for e in s.examples])
def test_torch_func_runs_the_reference_under_auto_and_names_the_transform_otherwise(spec, example):
    """torch.func.grad and vmap over the public op: auto runs the reference (torch.library's custom-op
    autograd has no functorch rules); a named fast backend raises, naming torch.func."""
    x, *rest = example.inputs()
    x = x.double()
    rest = [t.double() if torch.is_tensor(t) and t.is_floating_point() else t for t in rest]

    def loss(x, backend=None):
        return spec.public(x, *rest, **example.kwargs, backend=backend).square().sum()

    got = torch.func.grad(loss)(x)
    want = torch.autograd.grad(loss(x.requires_grad_(True), "reference"), x)[0]
    torch.testing.assert_close(got, want)
    x = x.detach()
    batched = torch.func.vmap(lambda t: spec.public(t, *rest, **example.kwargs))(torch.stack([x, 2 * x]))
    torch.testing.assert_close(batched, torch.stack([spec.ref(t, *rest, **example.kwargs) for t in (x, 2 * x)]))
    for backend in cpu_backends(spec.name):
        with pytest.raises(RuntimeError, match="torch.func"):
            torch.func.grad(loss)(x.detach(), backend)
