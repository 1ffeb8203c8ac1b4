"""Timing, checking and measuring one row: an op at one shape, layout and pass, every provider.

Providers side by side in one process: `eager` (the op's `_ref`, the unfused torch layers),
`compile` (torch.compile of eager; max-autotune on a GPU), the suite's baselines, `auto` (the public
op as a user calls it) and each fastgen backend the device runs. For each: the median time, the
output's and each gradient's error against the float64 oracle judged by the tolerance table
(fastgen.tolerances.judge: PASS or FAIL), the peak memory one step allocates, and the achieved
TFLOP/s or GB/s against the machine's measured ceiling (matmul peak, copy bandwidth).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import fastgen
from fastgen.dispatch import CHANNELS_LAST, auto_choices, backends
from fastgen.ops import REGISTRY
from fastgen.tolerances import judge

FASTGEN_BACKENDS = ("composite", "cpu", "cuda", "triton")  # what "best fastgen backend" ranges over


def make_inputs(suite, shape, dtype, device, channels_last: bool, need_grad=False) -> list[torch.Tensor]:
    """The suite's inputs in dtype and layout on device; those in suite.grad_of require grad when
    need_grad. Filters stay float32 (the ops take them so)."""
    x, *rest = suite.inputs(shape)
    fmt = CHANNELS_LAST[x.dim()] if channels_last else torch.contiguous_format
    out = [x.to(device=device, dtype=dtype).to(memory_format=fmt)]
    out += [t.to(device=device, dtype=dtype if suite.names[i + 1] != "filter" else t.dtype)
            for i, t in enumerate(rest)]
    return [t.requires_grad_(need_grad and i in suite.grad_of) for i, t in enumerate(out)]


def providers(suite, device: str, shape=None, compile_mode: str | None = "auto") -> dict:
    """name -> f(*inputs, shape): every way this device can run the op at shape. compile_mode "auto"
    is max-autotune (without CUDA graphs) on a GPU and the default elsewhere."""
    if compile_mode == "auto":
        compile_mode = "max-autotune-no-cudagraphs" if device == "cuda" else None
    table = {"eager": suite.eager, "compile": torch.compile(suite.eager, mode=compile_mode, dynamic=False)}
    table.update({name: getattr(suite, name) for name in getattr(suite, "baselines", ())})
    table["auto"] = suite.fused(None)
    # the backends that run here; on the CPU triton is the interpreter (correctness only, not timed)
    runs_here = {"composite"} | ({"cuda", "triton"} if device == "cuda" else {"cpu"})
    worth = suite.backends(shape) if hasattr(suite, "backends") and shape is not None else None
    for name in REGISTRY[suite.op].impls:
        if name in runs_here and backends()[name].available and (worth is None or name in worth):
            table[name] = suite.fused(name)
    return table


def time_ms(fn, device: str, reps: int = 10, budget_s: float | None = None) -> float:
    """Median milliseconds of fn() (one provider alone; rows time theirs together, time_together)."""
    return time_together({"fn": fn}, device, reps, budget_s)["fn"]


def time_together(steps: dict, device: str, reps: int = 10, budget_s: float | None = None) -> dict:
    """Median milliseconds of each step. On a GPU triton.testing.do_bench, one after another. On the
    CPU one warm-up call each, then `reps` rounds that call every step once in turn (or fewer rounds,
    at least 3, once each step has had `budget_s` seconds): the CPU's speed drifts (other tenants,
    memory reclaim), and round-robin timing lays the drift on every provider alike."""
    if device == "cuda":
        import triton.testing
        return {name: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                for name, fn in steps.items()}
    for fn in steps.values():
        fn()
    times = {name: [] for name in steps}
    start = time.perf_counter()
    for done in range(1, reps + 1):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        if budget_s is not None and done >= 3 and time.perf_counter() - start > budget_s * len(steps):
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_mib(step, device: str) -> float:
    """The most memory one call of step() holds at once beyond what was allocated before it, in MiB.
    CUDA: the caching allocator's peak. CPU: every allocation and free the profiler saw, in order."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    with _quiet(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                          profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    held = peak = 0
    for _, delta in events:
        held += delta
        peak = max(peak, held)
    return peak / 2 ** 20


@contextlib.contextmanager
def _quiet():
    """The profiler's C++ side logs each start and stop to the process's stdout/stderr; silence them
    (not Python's own output: nothing Python prints happens inside)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def matmul_tflops(device: str, dtype: torch.dtype) -> float:
    """The machine's measured matmul throughput (TFLOP/s): the compute ceiling. At dtype on a GPU; in
    float32 on the CPU, where half-precision GEMM may have no fast kernel at all (float16 2048^3 took
    minutes here) and float32 is what the CPU computes fastest."""
    n = 8192 if device == "cuda" else 2048
    dtype = dtype if device == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / time_ms(lambda: a @ b, device, 5) / 1e9


def copy_gbps(x: torch.Tensor) -> float:
    """The measured copy bandwidth (read + write, GB/s) of a tensor of x's size: the ceiling of a
    memory-bound op on x (a map that fits in cache is copied faster than one that does not)."""
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / time_ms(lambda: y.copy_(x), x.device.type, 10) / 1e6


def _evaluate(f, inputs, shape, grad_of, cotangent):
    """f's output and the gradients of <output, cotangent> with respect to inputs[grad_of], detached."""
    out = f(*inputs, shape)
    if cotangent is None:
        return [out.detach()]
    grads = torch.autograd.grad(out, [inputs[i] for i in grad_of], cotangent)
    return [out.detach()] + [g.detach() for g in grads]


def _backward_only(f, inputs, shape, grad_of, cotangent):
    """A step that runs only the backward of one forward made here (the graph kept across calls)."""
    out = f(*inputs, shape)
    wrt = [inputs[i] for i in grad_of]
    return lambda: [out.detach()] + [g.detach() for g in torch.autograd.grad(out, wrt, cotangent, retain_graph=True)]


def row(suite, shape, device: str, dtype: torch.dtype, channels_last: bool, kind: str, table: dict,
        peak_tflops: float, reps: int = 10, budget_s: float | None = None, on_provider=None) -> dict:
    """One row: every provider of `table` at this shape, layout and pass (kind "fwd", "bwd": the
    backward alone, of a forward made once, or "fwd+bwd")."""
    # a "bwd" row runs one graph's backward again and again (retain_graph), which torch.compile's
    # donated buffers forbid
    keep = torch._functorch.config.patch(donated_buffer=False) if kind == "bwd" else contextlib.nullcontext()
    with keep:
        return _row(suite, shape, device, dtype, channels_last, kind, table, peak_tflops, reps, budget_s, on_provider)


def _row(suite, shape, device, dtype, channels_last, kind, table, peak_tflops, reps, budget_s, on_provider):
    need_grad = kind != "fwd"
    inputs = make_inputs(suite, shape, dtype, device, channels_last, need_grad)
    oracle_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    grad_of = suite.grad_of if need_grad else ()
    out64 = suite.eager(*oracle_inputs, shape)
    cotangent = None
    if need_grad:
        g = torch.Generator().manual_seed(1)
        cotangent = torch.randn(out64.shape, generator=g, dtype=torch.float64).to(out64.device)
    want = [out64.detach()] + (list(torch.autograd.grad(out64, [oracle_inputs[i] for i in grad_of], cotangent))
                               if need_grad else [])
    # the incoming gradient in x's layout, as the next layer of a channels_last model hands it back
    fmt = CHANNELS_LAST[cotangent.dim()] if channels_last and need_grad else torch.contiguous_format
    cot = cotangent.to(dtype).contiguous(memory_format=fmt) if need_grad else None
    work = suite.work(shape, inputs[0].element_size())
    ceiling = {"matmul_tflops": peak_tflops, "copy_gbps": copy_gbps(inputs[0].detach())}
    results, steps, eager_vals = {}, {}, None
    for name, f in table.items():  # correctness, memory and warm-up, one provider at a time
        if on_provider:
            on_provider(name, False)
        try:
            with auto_choices() as picked:
                got = _evaluate(f, inputs, shape, grad_of, cot)
            eager_vals = got if name == "eager" else eager_vals
            problems = judge(got, eager_vals, want, dtype)
            steps[name] = (_backward_only(f, inputs, shape, grad_of, cot) if kind == "bwd"
                           else (lambda f=f: _evaluate(f, inputs, shape, grad_of, cot)))
            r = {"passed": not problems, "problems": problems[:3],
                 "max_err": (got[0].double() - want[0]).abs().max().item(),
                 "grad_err": {suite.names[i]: (g.double() - w).abs().max().item()
                              for i, g, w in zip(grad_of, got[1:], want[1:])},
                 "peak_mib": peak_mib(steps[name], device)}
            if name == "auto":
                r["backend"] = next((b for op, b in picked if op == suite.op), None)
        except Exception as e:  # a provider that fails is reported, not hidden
            r = {"passed": False, "error": f"{type(e).__name__}: {e}"[:300]}
        results[name] = r
        if on_provider:
            on_provider(name, True)
    if on_provider:
        on_provider("timing", False)
    for name, ms in time_together(steps, device, reps, budget_s).items():
        r = results[name]
        r["ms"] = ms
        if "flops" in work:  # a backward is twice the forward's multiply-adds
            r["tflops"] = work["flops"] * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[kind] / ms / 1e9
            r["of_peak"] = r["tflops"] / ceiling["matmul_tflops"]
        else:
            r["gbps"] = ((work["bytes"] if kind != "bwd" else 0) + (work["bwd_bytes"] if need_grad else 0)) / ms / 1e6
            r["of_peak"] = r["gbps"] / ceiling["copy_gbps"]
    credit(results)
    best = min((n for n in FASTGEN_BACKENDS if results.get(n, {}).get("passed")), key=lambda n: results[n]["ms"],
               default=None)
    return {"op": suite.op, "shape": asdict(shape), "pass": kind, "dtype": str(dtype).replace("torch.", ""),
            "layout": "nhwc" if channels_last else "nchw", "channels_last": channels_last, "ceiling": ceiling,
            "providers": results, "best": best, "passed": all(r.get("passed") for r in results.values())}


def credit(results: dict) -> None:
    """Speedups over eager and compile, for providers that passed (a wrong answer earns none)."""
    for r in results.values():
        for base in ("eager", "compile"):
            if r.get("passed") and results.get(base, {}).get("passed"):
                r[f"speedup_vs_{base}"] = results[base]["ms"] / r["ms"]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str | None:
    """The checkout's commit: git's answer, else FASTGEN_GIT_SHA, else the file .git_sha at the checkout's
    root (a copy of the tree without .git, as on a lent GPU machine: `git rev-parse HEAD > .git_sha`
    before copying it), else None."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    if not sha:
        stamp = root / ".git_sha"
        sha = os.environ.get("FASTGEN_GIT_SHA") or (stamp.read_text().strip() if stamp.is_file() else "")
    return sha or None


def environment() -> dict:
    sha = git_sha()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name()
    return {"device": device, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "fastgen": fastgen.__version__, "git_sha": sha, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
