"""The kernel-by-kernel comparison behind `python -m fastgen bench` and benchmarks/bench_*.py.

Providers, side by side in one run: `eager` (the op's `_ref`, the unfused torch layers),
`compile` (torch.compile of eager; max-autotune on a GPU) and each fastgen backend the device
has. Each row: median ms, useful TFLOP/s (the unfused conv's FLOPs), speedup over eager and over
compile, max error against the float64 oracle next to eager's own, and peak memory (CUDA).
"""

from __future__ import annotations

import math
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fastgen
from fastgen.dispatch import backends
from fastgen.ops.upsample_conv import upsample_conv2d, upsample_conv2d_ref


@dataclass(frozen=True)
class UpsampleConvShape:
    name: str
    n: int
    c: int
    co: int
    h: int
    w: int
    k: int = 3
    mode: str = "nearest"
    scale: int = 2

    def flops(self) -> float:
        """Multiply-adds x 2 of the unfused convolution (what eager computes)."""
        return 2.0 * self.n * self.co * self.c * self.k ** 2 * self.h * self.w * self.scale ** 2


# Real generator layers. SD-VAE decoder: Upsample2D (nearest 2x + 3x3 conv) at 64, 128, 256.
GPU_SHAPES = [
    UpsampleConvShape("sdvae-up1", 1, 512, 512, 64, 64),
    UpsampleConvShape("sdvae-up2", 1, 512, 512, 128, 128),
    UpsampleConvShape("sdvae-up3", 1, 256, 256, 256, 256),
    UpsampleConvShape("dcgan-up", 64, 256, 128, 16, 16),
    UpsampleConvShape("sdvae-up2-bilinear", 1, 512, 512, 128, 128, mode="bilinear"),
]
CPU_SHAPES = [
    UpsampleConvShape("c128-64x64", 1, 128, 128, 64, 64),
    UpsampleConvShape("dcgan-up", 16, 256, 128, 8, 8),
    UpsampleConvShape("c64-32x32-bilinear", 1, 64, 64, 32, 32, mode="bilinear"),
]


def make_inputs(shape: UpsampleConvShape, dtype, device, channels_last: bool, requires_grad=False):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape.n, shape.c, shape.h, shape.w, generator=g)
    w = torch.randn(shape.co, shape.c, shape.k, shape.k, generator=g) / math.sqrt(shape.c * shape.k ** 2)
    b = torch.randn(shape.co, generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(device=device, dtype=dtype).to(memory_format=fmt)
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (x, w, b)]


def providers(device: str) -> dict:
    """name -> f(x, w, b, shape): every way this device can run the op."""
    def eager(x, w, b, s):
        return upsample_conv2d_ref(x, w, b, scale_factor=s.scale, mode=s.mode)

    compiled = torch.compile(eager, mode="max-autotune-no-cudagraphs" if device == "cuda" else None,
                             dynamic=False)
    table = {"eager": eager, "compile": compiled}
    # the fastgen backends that run here; on the CPU triton is the interpreter (correctness only)
    names = ["composite"] + (["cuda", "triton"] if device == "cuda" else [])
    for name in names:
        if backends()[name].available:
            table[name] = (lambda be: lambda x, w, bias, s: upsample_conv2d(
                x, w, bias, scale_factor=s.scale, mode=s.mode, backend=be))(name)
    return table


def _time_ms(fn, device: str, reps: int) -> float:
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(f, inputs, shape, need_grad: bool, oracle, device: str, reps: int) -> dict:
    """One provider at one shape: median ms, TFLOP/s, max error vs the oracle, peak MiB (CUDA)."""
    def step():
        out = f(*inputs, shape)
        if need_grad:
            out.backward(torch.ones_like(out))
        return out

    err = (step().double() - oracle).abs().max().item()
    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    ms = _time_ms(step, device, reps)
    flops = shape.flops() * (3 if need_grad else 1)
    return {"ms": ms, "tflops": flops / ms / 1e9, "max_err": err, "peak_mib": peak}


def run(device: str = "cpu", dtype=torch.float32, channels_last=False, shapes=None, passes=("fwd",),
        reps: int = 10, log=print, on_row=None) -> list[dict]:
    shapes = shapes or (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    rows = []
    for shape in shapes:
        for kind in passes:
            # a fresh torch.compile per row: one compiled graph per shape, never the recompile
            # limit's silent fall back to eager
            torch._dynamo.reset()
            table = providers(device)
            need_grad = kind != "fwd"
            inputs = make_inputs(shape, dtype, device, channels_last, need_grad)
            x64, w64, b64 = (t.detach().double() for t in inputs)
            oracle = upsample_conv2d_ref(x64, w64, b64, scale_factor=shape.scale, mode=shape.mode)
            results = {}
            for name, f in table.items():
                try:
                    results[name] = measure(f, inputs, shape, need_grad, oracle, device, reps)
                except Exception as e:  # a provider that fails is reported, not hidden
                    results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                    log(f"  {shape.name} {kind} {name}: FAILED {results[name]['error']}")
            for r in results.values():
                for base in ("eager", "compile"):
                    if "ms" in r and "ms" in results.get(base, {}):
                        r[f"speedup_vs_{base}"] = results[base]["ms"] / r["ms"]
            rows.append({"shape": asdict(shape), "pass": kind, "dtype": str(dtype).replace("torch.", ""),
                         "channels_last": channels_last, "providers": results})
            log(format_row(rows[-1]))
            if on_row:
                on_row(rows[-1])
    return rows


def format_row(row: dict) -> str:
    s = row["shape"]
    head = (f"{s['name']:>20s} N{s['n']} {s['c']}->{s['co']} {s['h']}x{s['w']} {s['mode']} "
            f"{row['dtype']} {'NHWC' if row['channels_last'] else 'NCHW'} {row['pass']}")
    cells = []
    for name, r in row["providers"].items():
        if "ms" not in r:
            cells.append(f"{name}=FAIL")
            continue
        cell = f"{name} {r['ms']:.3f}ms"
        if name not in ("eager",) and "speedup_vs_eager" in r:
            cell += f" x{r['speedup_vs_eager']:.2f}"
        cells.append(cell)
    return head + "\n    " + " | ".join(cells)


def summary_table(rows: list[dict]) -> str:
    """One line per row: each provider's median ms and its speedup over eager and compile."""
    first = ("eager", "compile")
    names = sorted({n for r in rows for n in r["providers"]}, key=lambda n: (first.index(n) if n in first else 2, n))
    lines = [f"{'shape':>22s} {'layout':6s} {'pass':7s} " + " ".join(f"{n:>20s}" for n in names)]
    for r in rows:
        cells = []
        for n in names:
            p = r["providers"].get(n, {})
            if "ms" not in p:
                cells.append(f"{'-' if not p else 'FAIL':>20s}")
            elif n in ("eager", "compile"):
                cells.append(f"{p['ms']:>12.3f}ms      ")
            else:
                cells.append(f"{p['ms']:8.3f}ms x{p.get('speedup_vs_eager', 0):.2f}/{p.get('speedup_vs_compile', 0):.2f}")
        lines.append(f"{r['shape']['name']:>22s} {'nhwc' if r['channels_last'] else 'nchw':6s} {r['pass']:7s} "
                     + " ".join(cells))
    return "median ms; fastgen cells: x speedup over eager / over compile\n" + "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name()
    return {"device": device, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "fastgen": fastgen.__version__, "git_sha": sha, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
