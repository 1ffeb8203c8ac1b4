"""The kernel-by-kernel comparison behind `python -m fastgen bench` and benchmarks/bench_*.py.

For each op (a Suite), providers side by side in one run: `eager` (the op's `_ref`, the unfused
torch layers), `compile` (torch.compile of eager; max-autotune on a GPU) and each fastgen backend
the device has. Each row: median ms, achieved TFLOP/s (for convolutions, counting the unfused
conv's FLOPs) or GB/s (for normalizations, counting the fused minimum of reads and writes: 2 + 1,
pixel norm 1 + 1), speedup over eager and over compile, max error against the float64 oracle, and peak
memory (CUDA). On a GPU each row also measures the device-to-device copy bandwidth, the ceiling.
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
from fastgen.ops.batch_norm_act import batch_norm_act, batch_norm_act_ref
from fastgen.ops.bias_act import bias_act, bias_act_ref
from fastgen.ops.group_norm_act import group_norm_act, group_norm_act_ref
from fastgen.ops import REGISTRY
from fastgen.ops.modulated_conv2d import _modulated_conv2d, modulated_conv2d, modulated_conv2d_ref
from fastgen.ops.pixel_norm import pixel_norm, pixel_norm_ref
from fastgen.ops.upfirdn2d import upfirdn2d, upfirdn2d_ref
from fastgen.ops.upsample_conv2d import upsample_conv2d, upsample_conv2d_ref


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    c: int
    h: int
    w: int
    co: int = 0  # output channels (convolutions)
    k: int = 3  # kernel size (convolutions)
    mode: str = "nearest"  # upsampling mode
    scale: int = 2  # upsampling factor
    groups: int = 32  # GroupNorm groups
    activation: str = "silu"
    up: int = 1  # StyleGAN2 resampling
    down: int = 1
    padding: tuple = (0, 0, 0, 0)  # upfirdn2d's (px0, px1, py0, py1)
    gain: float = 1.0


_SUITES: list = []


def suite(cls):
    """Registers a benchmark suite: a class naming its `op` (its backends are the op's spec's) with
    cpu_shapes, gpu_shapes, inputs(shape), eager(*inputs, shape), fused(backend) and work(shape, itemsize)."""
    _SUITES.append(cls)
    return cls


def _generator():
    return torch.Generator(device="cpu").manual_seed(0)


def _norm_inputs(s: "Shape"):
    """x, and a per-channel weight near 1 and bias near 0, as trained norm layers have."""
    g = _generator()
    return (torch.randn(s.n, s.c, s.h, s.w, generator=g), 1 + 0.1 * torch.randn(s.c, generator=g),
            0.1 * torch.randn(s.c, generator=g))


@suite
class UpsampleConv2d:
    op = "upsample_conv2d"
    # Real generator layers. SD-VAE decoder: Upsample2D (nearest 2x + 3x3 conv) at 64, 128, 256.
    gpu_shapes = [
        Shape("sdvae-up1", 1, 512, 64, 64, co=512),
        Shape("sdvae-up2", 1, 512, 128, 128, co=512),
        Shape("sdvae-up3", 1, 256, 256, 256, co=256),
        Shape("dcgan-up", 64, 256, 16, 16, co=128),
        Shape("sdvae-up2-bilinear", 1, 512, 128, 128, co=512, mode="bilinear"),
    ]
    cpu_shapes = [
        Shape("c128-64x64", 1, 128, 64, 64, co=128),
        Shape("dcgan-up", 16, 256, 8, 8, co=128),
        Shape("c64-32x32-bilinear", 1, 64, 32, 32, co=64, mode="bilinear"),
    ]

    @staticmethod
    def inputs(s: Shape):
        g = _generator()
        return (torch.randn(s.n, s.c, s.h, s.w, generator=g),
                torch.randn(s.co, s.c, s.k, s.k, generator=g) / math.sqrt(s.c * s.k ** 2),
                torch.randn(s.co, generator=g))

    @staticmethod
    def eager(x, w, b, s: Shape):
        return upsample_conv2d_ref(x, w, b, scale_factor=s.scale, mode=s.mode)

    @staticmethod
    def fused(backend):
        return lambda x, w, b, s: upsample_conv2d(x, w, b, scale_factor=s.scale, mode=s.mode, backend=backend)

    @staticmethod
    def work(s: Shape, itemsize: int) -> dict:
        return {"flops": 2.0 * s.n * s.co * s.c * s.k ** 2 * s.h * s.w * s.scale ** 2}


@suite
class GroupNormAct:
    op = "group_norm_act"
    # SD-VAE decoder GroupNorm(32) + SiLU at its largest maps; a batch; instance norm + ReLU
    # (style transfer), which runs on the same op with one channel per group
    gpu_shapes = [
        Shape("sdvae-512x128", 1, 512, 128, 128),
        Shape("sdvae-512x256", 1, 512, 256, 256),
        Shape("sdvae-256x512", 1, 256, 512, 512),
        Shape("batch-64x64x64", 32, 64, 64, 64),
        Shape("instance-norm-256x128", 8, 256, 128, 128, groups=256, activation="relu"),  # G = C
    ]
    cpu_shapes = [
        Shape("c256-64x64", 1, 256, 64, 64),
        Shape("c128-128x128", 1, 128, 128, 128),
        Shape("batch-8x64x32", 8, 64, 32, 32),
        Shape("instance-norm-64x32", 8, 64, 32, 32, groups=64, activation="relu"),  # G = C
    ]

    inputs = staticmethod(_norm_inputs)

    @staticmethod
    def eager(x, w, b, s: Shape):
        return group_norm_act_ref(x, s.groups, w, b, activation=s.activation)

    @staticmethod
    def fused(backend):
        return lambda x, w, b, s: group_norm_act(x, s.groups, w, b, activation=s.activation, backend=backend)

    @staticmethod
    def work(s: Shape, itemsize: int) -> dict:
        return {"bytes": 3.0 * s.n * s.c * s.h * s.w * itemsize}


@suite
class BatchNormAct2d:
    op = "batch_norm_act"
    # DCGAN generator BatchNorm + ReLU layers, training mode (batch statistics)
    gpu_shapes = [Shape("dcgan-256x16", 128, 256, 16, 16, activation="relu"),
                  Shape("dcgan-128x32", 128, 128, 32, 32, activation="relu"),
                  Shape("dcgan-64x64", 128, 64, 64, 64, activation="relu")]
    cpu_shapes = [Shape("dcgan-128x16", 16, 128, 16, 16, activation="relu"),
                  Shape("dcgan-64x32", 16, 64, 32, 32, activation="relu")]

    inputs = staticmethod(_norm_inputs)

    @staticmethod
    def eager(x, w, b, s: Shape):
        return batch_norm_act_ref(x, None, None, w, b, True, activation=s.activation)

    @staticmethod
    def fused(backend):
        return lambda x, w, b, s: batch_norm_act(x, None, None, w, b, True, activation=s.activation, backend=backend)

    @staticmethod
    def work(s: Shape, itemsize: int) -> dict:
        return {"bytes": 3.0 * s.n * s.c * s.h * s.w * itemsize}


@suite
class PixelNorm:
    op = "pixel_norm"
    # 512- and 256-channel maps, as in the synthesis networks of ProGAN and StyleGAN1
    gpu_shapes = [Shape("stylegan-512x64", 16, 512, 64, 64), Shape("stylegan-256x256", 16, 256, 256, 256)]
    cpu_shapes = [Shape("c512-32x32", 4, 512, 32, 32)]

    @staticmethod
    def inputs(s: Shape):
        return (torch.randn(s.n, s.c, s.h, s.w, generator=_generator()),)

    @staticmethod
    def eager(x, s: Shape):
        return pixel_norm_ref(x)

    @staticmethod
    def fused(backend):
        return lambda x, s: pixel_norm(x, backend=backend)

    @staticmethod
    def work(s: Shape, itemsize: int) -> dict:
        return {"bytes": 2.0 * s.n * s.c * s.h * s.w * itemsize}


@suite
class BiasAct:
    op = "bias_act"
    # StyleGAN2 synthesis layers (bias + lrelu * sqrt 2, conv_clamp 256): 1024x1024 and 256x256 configs
    gpu_shapes = [Shape("sg1024-128x256", 16, 128, 256, 256, activation="lrelu"),
                  Shape("sg1024-32x1024", 16, 32, 1024, 1024, activation="lrelu"),
                  Shape("sg256-64x256", 32, 64, 256, 256, activation="lrelu")]
    cpu_shapes = [Shape("sg256-128x128", 4, 128, 128, 128, activation="lrelu"),
                  Shape("sg256-64x256", 4, 64, 256, 256, activation="lrelu")]

    @staticmethod
    def inputs(s: Shape):
        g = _generator()
        return torch.randn(s.n, s.c, s.h, s.w, generator=g), 0.1 * torch.randn(s.c, generator=g)

    @staticmethod
    def eager(x, b, s: Shape):
        return bias_act_ref(x, b, act=s.activation, clamp=256.0)

    @staticmethod
    def fused(backend):
        return lambda x, b, s: bias_act(x, b, act=s.activation, clamp=256.0, backend=backend)

    @staticmethod
    def work(s: Shape, itemsize: int) -> dict:
        return {"bytes": 2.0 * s.n * s.c * s.h * s.w * itemsize}


def _fir_filter():
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    return torch.outer(f, f) / 64


@suite
class Upfirdn2d:
    op = "upfirdn2d"
    # StyleGAN2's three uses: the FIR after an upsampling (transposed) conv, the ToRGB skip
    # upsample of the image, the discriminator's downsample; 1024x1024 and 256x256 configs
    gpu_shapes = [Shape("sg1024-fir-after-up", 16, 128, 257, 257, padding=(1, 1, 1, 1), gain=4.0),
                  Shape("sg1024-torgb-up", 16, 3, 512, 512, up=2, padding=(2, 1, 2, 1), gain=4.0),
                  Shape("sg1024-disc-down", 16, 64, 512, 512, down=2, padding=(1, 1, 1, 1))]
    cpu_shapes = [Shape("sg256-fir-after-up", 4, 128, 129, 129, padding=(1, 1, 1, 1), gain=4.0),
                  Shape("sg256-torgb-up", 4, 3, 128, 128, up=2, padding=(2, 1, 2, 1), gain=4.0),
                  Shape("sg256-disc-down", 4, 64, 128, 128, down=2, padding=(1, 1, 1, 1))]

    @staticmethod
    def inputs(s: Shape):
        return torch.randn(s.n, s.c, s.h, s.w, generator=_generator()), _fir_filter()

    @staticmethod
    def eager(x, f, s: Shape):
        return upfirdn2d_ref(x, f.detach(), s.up, s.down, list(s.padding), gain=s.gain)

    @staticmethod
    def fused(backend):
        return lambda x, f, s: upfirdn2d(x, f.detach(), s.up, s.down, list(s.padding), gain=s.gain, backend=backend)

    @staticmethod
    def work(s: Shape, itemsize: int) -> dict:
        out = s.n * s.c * (s.h * s.up + s.padding[2] + s.padding[3] - 3) // s.down * (
            (s.w * s.up + s.padding[0] + s.padding[1] - 3) // s.down)
        return {"bytes": float(s.n * s.c * s.h * s.w + out) * itemsize}


@suite
class ModulatedConv2d:
    op = "modulated_conv2d"
    # StyleGAN2 synthesis conv0 (3x3, up 2, fused modconv) and conv1 (3x3) layers. `stylegan2` is
    # StyleGAN2's own formulation: the same fast paths with its plain-torch upfirdn2d
    gpu_shapes = [Shape("sg1024-up-512x64", 16, 512, 64, 64, co=256, up=2),
                  Shape("sg1024-up-256x128", 16, 256, 128, 128, co=128, up=2),
                  Shape("sg1024-conv-128x256", 16, 128, 256, 256, co=128)]
    cpu_shapes = [Shape("sg256-up-256x64", 4, 256, 64, 64, co=128, up=2),
                  Shape("sg256-conv-128x128", 4, 128, 128, 128, co=128)]

    @staticmethod
    def inputs(s: Shape):
        g = _generator()
        return (torch.randn(s.n, s.c, s.h, s.w, generator=g), torch.randn(s.co, s.c, s.k, s.k, generator=g),
                1 + 0.2 * torch.randn(s.n, s.c, generator=g), _fir_filter())

    @staticmethod
    def eager(x, w, styles, f, s: Shape):
        return modulated_conv2d_ref(x, w, styles, True, s.up, s.down, f.detach(), s.k // 2, flip_weight=s.up == 1)

    @staticmethod
    def fused(backend):
        return lambda x, w, styles, f, s: modulated_conv2d(x, w, styles, True, s.up, s.down, f.detach(), s.k // 2,
                                                           flip_weight=s.up == 1, backend=backend)

    @staticmethod
    def stylegan2(x, w, styles, f, s: Shape):
        return _modulated_conv2d(x, w, styles, True, s.up, s.down, f.detach(), (s.k // 2,) * 4, True, s.up == 1,
                                 upfirdn2d_ref)

    baselines = ("stylegan2",)

    @staticmethod
    def work(s: Shape, itemsize: int) -> dict:
        return {"flops": 2.0 * s.n * s.co * s.c * s.k ** 2 * s.h * s.w}


# in the registry's order (fastgen.ops.REGISTRY)
SUITES = {name: cls for name in REGISTRY for cls in _SUITES if cls.op == name}


def make_inputs(suite, shape: Shape, dtype, device, channels_last: bool, requires_grad=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, *rest = suite.inputs(shape)
    x = x.to(device=device, dtype=dtype).to(memory_format=fmt)
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (x, *rest)]


def providers(suite, device: str, compile_mode: str | None = "auto") -> dict:
    """name -> f(*inputs, shape): every way this device can run the op. compile_mode "auto" is
    max-autotune (without CUDA graphs) on a GPU and the default elsewhere."""
    if compile_mode == "auto":
        compile_mode = "max-autotune-no-cudagraphs" if device == "cuda" else None
    compiled = torch.compile(suite.eager, mode=compile_mode, dynamic=False)
    table = {"eager": suite.eager, "compile": compiled}
    table.update({name: getattr(suite, name) for name in getattr(suite, "baselines", ())})
    # the fastgen backends that run here; on the CPU triton is the interpreter (correctness only)
    runs_here = {"composite"} | ({"cuda", "triton"} if device == "cuda" else {"cpu"})
    for name in REGISTRY[suite.op].impls:
        if name in runs_here and backends()[name].available:
            table[name] = suite.fused(name)
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


def copy_gbps(x: torch.Tensor) -> float:
    """Measured device-to-device copy bandwidth (read + write) on a tensor of x's size."""
    y = torch.empty_like(x)
    ms = _time_ms(lambda: y.copy_(x), x.device.type, 20)
    return 2 * x.numel() * x.element_size() / ms / 1e6


def measure(f, inputs, shape, need_grad: bool, oracle, device: str, reps: int, work: dict) -> dict:
    """One provider at one shape: median ms, TFLOP/s or GB/s, max error vs the oracle, peak MiB (CUDA)."""
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
    row = {"ms": ms, "max_err": err, "peak_mib": peak}
    if "flops" in work:
        row["tflops"] = work["flops"] * (3 if need_grad else 1) / ms / 1e9
    if "bytes" in work and not need_grad:
        row["gbps"] = work["bytes"] / ms / 1e6
    return row


def run(suite, device: str = "cpu", dtype=torch.float32, channels_last=False, shapes=None, passes=("fwd",),
        reps: int = 10, log=print, on_row=None, compile_mode: str | None = "auto") -> list[dict]:
    shapes = shapes or (suite.gpu_shapes if device == "cuda" else suite.cpu_shapes)
    rows = []
    for shape in shapes:
        for kind in passes:
            # a fresh torch.compile per row: one compiled graph per shape, never the recompile
            # limit's silent fall back to eager
            torch._dynamo.reset()
            table = providers(suite, device, compile_mode)
            need_grad = kind != "fwd"
            inputs = make_inputs(suite, shape, dtype, device, channels_last, need_grad)
            oracle = suite.eager(*(t.detach().double() for t in inputs), shape)
            work = suite.work(shape, inputs[0].element_size())
            results = {}
            for name, f in table.items():
                try:
                    results[name] = measure(f, inputs, shape, need_grad, oracle, device, reps, work)
                except Exception as e:  # a provider that fails is reported, not hidden
                    results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                    log(f"  {shape.name} {kind} {name}: FAILED {results[name]['error']}")
            for r in results.values():
                for base in ("eager", "compile"):
                    if "ms" in r and "ms" in results.get(base, {}):
                        r[f"speedup_vs_{base}"] = results[base]["ms"] / r["ms"]
            row = {"op": suite.op, "shape": asdict(shape), "pass": kind, "dtype": str(dtype).replace("torch.", ""),
                   "channels_last": channels_last, "compile_mode": compile_mode, "providers": results}
            if device == "cuda":
                row["copy_gbps"] = copy_gbps(inputs[0].detach())
            rows.append(row)
            log(format_row(row))
            if on_row:
                on_row(row)
    return rows


def format_row(row: dict) -> str:
    s = row["shape"]
    head = (f"{row['op']} {s['name']:>18s} N{s['n']} C{s['c']} {s['h']}x{s['w']} {row['dtype']} "
            f"{'NHWC' if row['channels_last'] else 'NCHW'} {row['pass']}")
    cells = []
    for name, r in row["providers"].items():
        if "ms" not in r:
            cells.append(f"{name}=FAIL")
            continue
        cell = f"{name} {r['ms']:.3f}ms"
        if "gbps" in r:
            cell += f" {r['gbps']:.0f}GB/s"
        if name != "eager" and "speedup_vs_eager" in r:
            cell += f" x{r['speedup_vs_eager']:.2f}"
        cells.append(cell)
    return head + "\n    " + " | ".join(cells)


def summary_table(rows: list[dict]) -> str:
    """One line per row: each provider's median ms and its speedup over eager and compile."""
    first = ("eager", "compile")
    names = sorted({n for r in rows for n in r["providers"]}, key=lambda n: (first.index(n) if n in first else 2, n))
    lines = [f"{'op / shape':>34s} {'layout':6s} {'pass':7s} " + " ".join(f"{n:>20s}" for n in names)]
    for r in rows:
        cells = []
        for n in names:
            p = r["providers"].get(n, {})
            if "ms" not in p:
                cells.append(f"{'-' if not p else 'FAIL':>20s}")
            elif n in first:
                cells.append(f"{p['ms']:>12.3f}ms      ")
            else:
                cells.append(f"{p['ms']:8.3f}ms x{p.get('speedup_vs_eager', 0):.2f}/{p.get('speedup_vs_compile', 0):.2f}")
        label = f"{r['op']} {r['shape']['name']}"
        lines.append(f"{label:>34s} {'nhwc' if r['channels_last'] else 'nchw':6s} {r['pass']:7s} " + " ".join(cells))
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
