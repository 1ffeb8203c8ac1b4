"""GPU code checked without a GPU: every Triton kernel variant our launchers produce, compiled ahead of
time for sm_80 and sm_90 by the real Triton compiler and ptxas, with a resource report; the CUDA C++
kernels' resources from the built extension (cuobjdump); launch grids at the largest shapes users run.

    python tools/triton_aot.py [--arch 80,90] [--report-arch 100,120] [--out benchmarks/results/gpu-resources.json]
                               [--quick]

How, on a machine with no GPU (shared/TOOLCHAIN.md): Triton's active driver is replaced by one whose
target is the GPU asked for, and every `kernel[grid](...)` launch becomes `kernel.run(..., warmup=True)`,
which compiles (to PTX and a cubin) without launching. The launches come from the real launchers:
the public ops are called with backend="triton" on CPU tensors (only dtypes, strides and pointer
alignment matter to the compiler; nothing is computed), across every dtype, memory format, constexpr
choice (activations, modes, scales, affine/bias, training/eval) and size class Triton specializes on
(1, a multiple of 16, other), forward and backward; and every block size a launcher derives from
channel counts and map sizes (`size_cases`: K tiles, output-channel blocks, channel chunks, split
merges), at the channel counts of SD-VAE and StyleGAN2 too. `ptxas -v` on each variant's PTX gives
registers and spills; Triton's metadata gives shared memory and warps. `--report-arch 100,120`
compiles for Blackwell too and reports what it finds without failing (no GPU of ours ran there).

Fails (exit 1) on: a compile error; a spill or any local memory (stack frame) in any kernel (all of
ours run per element or per tile);
shared memory above what a block may have (Triton opts in above 48 KB itself; the CUDA C++ kernels
use static shared memory, so 48 KB); a block above 1024 threads; a launch grid over its limits
(x < 2^31, y and z < 2^16) at the large shapes; a kernel that indexes a tensor of 2^31 or more
elements through an int32 pointer offset (its TTIR: `tt.addptr` with i32 offsets). Must run with the
interpreter off (the script unsets TRITON_INTERPRET before importing Triton).
"""

import argparse
import contextlib
import importlib
import importlib.metadata
import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler; must precede importing triton or torch

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import aot_record  # noqa: E402

TRITON_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

# Per-SM limits (CUDA programming guide, occupancy): A100 (sm_80) and H100/H200 (sm_90).
LIMITS = {
    80: {"name": "A100", "sms": 108, "regs": 65536, "max_warps": 64, "max_blocks": 32,
         "smem_sm": 164 * 1024, "smem_block_optin": 163 * 1024},
    90: {"name": "H200", "sms": 132, "regs": 65536, "max_warps": 64, "max_blocks": 32,
         "smem_sm": 228 * 1024, "smem_block_optin": 227 * 1024},
    # Blackwell, reported (not gated: no GPU of ours has run there): B200 and RTX 50xx / RTX PRO
    100: {"name": "B200", "sms": 148, "regs": 65536, "max_warps": 64, "max_blocks": 32,
          "smem_sm": 228 * 1024, "smem_block_optin": 227 * 1024},
    120: {"name": "RTX 5090", "sms": 170, "regs": 65536, "max_warps": 48, "max_blocks": 32,
          "smem_sm": 128 * 1024, "smem_block_optin": 99 * 1024},
}
SMEM_STATIC = 48 * 1024  # a block's static shared memory without the dynamic opt-in
SMEM_RESERVED = 1024  # per block, reserved by the runtime (sm_80 and later)


# ---------------------------------------------------------------------------------------------
# compile only

class CompileOnlyDriver:
    """Triton's driver for a GPU that is not here: the target, device 0, stream 0; nothing else."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def __getattr__(self, name):
        raise AttributeError(f"compile-only driver: no {name} (nothing may launch here)")


class Recorder:
    """Turns every kernel[grid](...) into a compile, and keeps each launch: kernel, grid, args."""

    def __init__(self):
        self.launches = []
        self._saved = JITFunction.__getitem__

    def __enter__(self):
        recorder = self

        def getitem(fn, grid):
            def launch(*args, **kwargs):
                log, t0 = io.StringIO(), time.perf_counter()
                with contextlib.redirect_stdout(log):  # Triton prints its own ptxas -v log (dump_ptxas_log)
                    compiled = fn.run(*args, grid=grid, warmup=True, **kwargs)
                g = grid(kwargs) if callable(grid) else grid
                named = {**dict(zip(fn.arg_names, args)), **kwargs}
                sizes = {k: v.numel() for k, v in named.items() if isinstance(v, torch.Tensor)}
                recorder.launches.append({"kernel": fn.fn.__name__, "compiled": compiled, "ptxas_log": log.getvalue(),
                                          "seconds": time.perf_counter() - t0, "grid": tuple(int(v) for v in g),
                                          "largest_tensor": max(sizes.values(), default=0), "sizes": sizes})
                return compiled
            return launch

        JITFunction.__getitem__ = getitem
        return self

    def __exit__(self, *exc):
        JITFunction.__getitem__ = self._saved


def _allow_triton_on_cpu_tensors():
    """The dispatcher runs backend="triton" on CPU tensors only under the interpreter; here the
    launchers run for their compiles alone."""
    from fastgen import dispatch
    unavailable = dispatch._unavailable
    dispatch._unavailable = lambda name, device: "" if name == "triton" else unavailable(name, device)


# ---------------------------------------------------------------------------------------------
# the launches: every public op with backend="triton", across what makes a distinct variant

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("nchw", "nhwc")
SIZES = {"one": (1, 1, 1, 1), "x16": (2, 16, 16, 16), "other": (3, 5, 7, 9)}  # Triton's size classes


def _tensor(shape, dtype, layout, grad=False, lazy=False):
    """Random values; or, `lazy`, memory never touched (the large shapes: only sizes and strides count)."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape)) if layout == "nhwc" else None
    fmt = fmt or torch.contiguous_format
    if lazy:
        return torch.empty(shape, dtype=dtype, memory_format=fmt)
    return torch.randn(shape).to(dtype).contiguous(memory_format=fmt).requires_grad_(grad)


def _run(fn, grad_of):
    """Forward, and the backward (its kernels too) when inputs need gradients."""
    out = fn()
    if grad_of:
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out, grad_of, torch.ones_like(out), allow_unused=True)


def configs(full: bool, axes: dict, first: str | None = None):
    """Settings of an op's options. full: every combination. Otherwise every value of the `first`
    axis (the activation: the whole epilogue changes), each with the other axes at their first value,
    then every other value of each other axis once (one factor at a time): every constexpr value
    compiles in every dtype, layout and size class, without the full product's hour."""
    names = list(axes)
    if full:
        yield from (dict(zip(names, combo)) for combo in itertools.product(*axes.values()))
        return
    base = {k: v[0] for k, v in axes.items()}
    seen = []
    for name in ([first] if first else []) + [n for n in names if n != first]:
        for value in axes[name]:
            c = {**base, name: value}
            if c not in seen:
                seen.append(c)
                yield c


def cases(full=False, quick=False):
    """(op, description, thunk) for every launch configuration (see configs). Each thunk binds the
    loop's values (a list of them, taken at once, still compiles what each names)."""
    from fastgen import ops
    from fastgen.activations import NAMES
    from fastgen.ops.upfirdn2d import setup_filter

    bias_acts = ["lrelu", "linear", "relu", "tanh", "sigmoid", "elu", "selu", "softplus", "swish", "gelu"]
    norm_acts = ["silu", *[a for a in NAMES if a != "silu"]]
    sizes = {"x16": SIZES["x16"]} if quick else SIZES
    if quick:
        bias_acts, norm_acts = bias_acts[:1], norm_acts[:1]
    for dtype, layout, (size, shape) in itertools.product(DTYPES, LAYOUTS, sizes.items()):
        tag = f"{str(dtype)[6:]}/{layout}/{size}"
        n, c, h, w = shape

        for o in configs(full, {"act": bias_acts, "bias": (True, False), "clamp": (None, 256.0)}, "act"):
            def bias_act(o=o, dtype=dtype, layout=layout, shape=shape, c=c):
                x, b = _tensor(shape, dtype, layout, True), _tensor((c,), dtype, "", True) if o["bias"] else None
                _run(lambda: ops.bias_act(x, b, act=o["act"], clamp=o["clamp"], backend="triton"),
                     [x] + ([b] if o["bias"] else []))
            yield "bias_act", f"{tag}/{o}", bias_act

        gshape = (n, 2 * c, max(h, 2), w)  # 2 values per group at least
        for o in configs(full, {"act": norm_acts, "affine": ("channel", "none", "sample")}, "act"):
            def group_norm(o=o, dtype=dtype, layout=layout, gshape=gshape, c=c, n=n):
                x = _tensor(gshape, dtype, layout, True)
                wshape = {"none": None, "channel": (2 * c,), "sample": (n, 2 * c)}[o["affine"]]
                wb = [_tensor(wshape, dtype, "", True) for _ in range(2)] if wshape else [None, None]
                _run(lambda: ops.group_norm_act(x, c, *wb, activation=o["act"], backend="triton"),
                     [x] + [t for t in wb if t is not None])
            yield "group_norm_act", f"{tag}/{o}", group_norm

        bshape = (max(n, 2), c, h, w)
        for o in configs(full, {"act": norm_acts, "training": (True, False), "affine": (True, False)}, "act"):
            def batch_norm(o=o, dtype=dtype, layout=layout, bshape=bshape, c=c):
                x = _tensor(bshape, dtype, layout, True)
                wb = [_tensor((c,), dtype, "", True) for _ in range(2)] if o["affine"] else [None, None]
                stats = (torch.zeros(c), torch.ones(c))
                _run(lambda: ops.batch_norm_act(x, *stats, *wb, o["training"], activation=o["act"], backend="triton"),
                     [x] + [t for t in wb if t is not None])
            yield "batch_norm_act", f"{tag}/{o}", batch_norm

        def pixel_norm(dtype=dtype, layout=layout, shape=shape):
            x = _tensor(shape, dtype, layout, True)
            _run(lambda: ops.pixel_norm(x, backend="triton"), [x])
        yield "pixel_norm", tag, pixel_norm

        for o in configs(full, {"act": norm_acts, "affine": (True, False), "clamp": (True, False),
                                "x_grad": (True, False)}, "act"):
            def rms_norm(o=o, dtype=dtype, layout=layout, shape=shape):
                x = _tensor(shape, dtype, layout, o["x_grad"] or not o["affine"])  # the backward without dx too
                wb = [_tensor((shape[1],), dtype, "", True) for _ in range(2)] if o["affine"] else [None, None]
                _run(lambda: ops.rms_norm_act(x, *wb, 1e-6, o["act"], clamp=o["clamp"], backend="triton"),
                     [t for t in (x, *wb) if t is not None and t.requires_grad])
            yield "rms_norm_act", f"{tag}/{o}", rms_norm

        ushape = (n, c, max(h, 4), max(w, 4))
        for o in configs(full, {"up_down": ((2, 1), (1, 1), (1, 2), (2, 2)), "taps": (4, 2, 3), "pad": (2, 0)}):
            def upfirdn(o=o, dtype=dtype, layout=layout, ushape=ushape):
                x = _tensor(ushape, dtype, layout, True)
                f = setup_filter({2: [1, 1], 3: [1, 2, 1], 4: [1, 3, 3, 1]}[o["taps"]])
                up, down = o["up_down"]
                _run(lambda: ops.upfirdn2d(x, f, up, down, o["pad"], gain=up * up, backend="triton"), [x])
            yield "upfirdn2d", f"{tag}/{o}", upfirdn

        for o in configs(full, {"mode": (("nearest", 2), ("nearest", 3), ("nearest", 4), ("bilinear", 2)),
                                "k": (3, 1), "bias": (True, False), "co": (c + 2, 1, 16)}):
            def upsample_conv(o=o, dtype=dtype, layout=layout, shape=shape, c=c):
                x = _tensor(shape, dtype, layout, True)
                wt = _tensor((o["co"], c, o["k"], o["k"]), dtype, "", True)
                b = _tensor((o["co"],), dtype, "", True) if o["bias"] else None
                mode, scale = o["mode"]
                _run(lambda: ops.upsample_conv2d(x, wt, b, scale_factor=scale, mode=mode, padding=o["k"] // 2,
                                                 backend="triton"), [x, wt] + ([b] if o["bias"] else []))
            yield "upsample_conv2d", f"{tag}/{o}", upsample_conv

        vshape = (n, c, 2, max(h, 2), max(w, 2))  # a clip of the size class's channels and map
        for o in configs(full, {"scale_pad": (((1, 1, 1), (1, 1, 1, 1, 2, 0)), ((1, 2, 2), (1, 1, 1, 1, 2, 0)),
                                              ((2, 2, 2), (1, 1, 1, 1, 1, 1))),
                                "k": ((3, 3, 3), (3, 1, 1), (1, 1, 1)), "bias": (True, False)}):
            def upsample_conv3d(o=o, dtype=dtype, layout=layout, vshape=vshape, c=c):
                x = _tensor(vshape, dtype, layout, True)
                wt = _tensor((c + 2, c, *o["k"]), dtype, "", True)
                b = _tensor((c + 2,), dtype, "", True) if o["bias"] else None
                scale, pads = o["scale_pad"]
                pads = tuple(p if k > 1 else 0 for p, k in zip(pads, (o["k"][2],) * 2 + (o["k"][1],) * 2 + (o["k"][0],) * 2))
                _run(lambda: ops.upsample_conv3d(x, wt, b, scale, pads, backend="triton"),
                     [x, wt] + ([b] if o["bias"] else []))
            yield "upsample_conv3d", f"{tag}/{o}", upsample_conv3d

        for up, down in ((1, 1), (2, 1), (1, 2)):
            def modulated(up=up, down=down, dtype=dtype, layout=layout, ushape=ushape, c=c):
                x = _tensor(ushape, dtype, layout, True)
                wt, s = _tensor((3, c, 3, 3), dtype, "", True), _tensor((ushape[0], c), dtype, "", True)
                _run(lambda: ops.modulated_conv2d(x, wt, s, True, up, down, setup_filter([1, 3, 3, 1]), 1,
                                                  flip_weight=up == 1, backend="triton"), [x, wt, s])
            yield "modulated_conv2d", f"{tag}/up={up}/down={down}", modulated


def size_cases(dtypes=DTYPES):
    """Launches whose block sizes the launchers derive from channel counts and map sizes, one of each
    branch, in every dtype and layout (the default options; every mode for upsample_conv2d): group norm's
    channels per group (tile width 1 to 64, then the chunk loop: CG = 1, 3, 32, 512 and SD-VAE's 4, 8, 16)
    and its statistics split (1, a few, 1024); batch norm's channel block (2 to 64, several blocks) and
    the partials it merges per step (1 to 32); pixel norm's channel tile (up to StyleGAN's 512);
    upsample_conv2d's output-channel block (16, 32, 64) and K tile (16, 32). The norms' fp16 variants
    are left out (they load, then compute in fp32: fp16 compiles as bf16 does)."""
    from fastgen import ops

    for dtype, layout in itertools.product(dtypes, LAYOUTS):
        tag = f"{str(dtype)[6:]}/{layout}/sizes"
        norms = dtype != torch.float16  # the norms load, then compute in fp32: fp16 compiles as bf16 does
        for shape, groups in (((2, 3, 4, 4), 3), ((2, 12, 4, 4), 4), ((2, 64, 4, 4), 2), ((1, 512, 4, 4), 1),
                              ((2, 128, 4, 4), 32), ((2, 256, 4, 4), 32), ((2, 512, 4, 4), 32),
                              ((1, 64, 64, 64), 32), ((1, 1, 1024, 1024), 1)):
            def group_norm(shape=shape, groups=groups, dtype=dtype, layout=layout):
                x = _tensor(shape, dtype, layout, True)
                wb = [_tensor((shape[1],), dtype, "", True) for _ in range(2)]
                _run(lambda: ops.group_norm_act(x, groups, *wb, activation="silu", backend="triton"), [x, *wb])
            if norms:
                yield "group_norm_act", f"{tag}/{shape}/G={groups}", group_norm

        for shape in ((2, 3, 4, 4), (2, 32, 4, 4), (2, 64, 4, 4), (2, 100, 4, 4), (2, 64, 64, 64), (8, 8, 64, 64)):
            def batch_norm(shape=shape, dtype=dtype, layout=layout):
                x = _tensor(shape, dtype, layout, True)
                wb = [_tensor((shape[1],), dtype, "", True) for _ in range(2)]
                stats = (torch.zeros(shape[1]), torch.ones(shape[1]))
                _run(lambda: ops.batch_norm_act(x, *stats, *wb, True, activation="relu", backend="triton"), [x, *wb])
            if norms:
                yield "batch_norm_act", f"{tag}/{shape}", batch_norm

        for shape in ((2, 64, 4, 4), (2, 512, 4, 4)):
            def pixel_norm(shape=shape, dtype=dtype, layout=layout):
                x = _tensor(shape, dtype, layout, True)
                _run(lambda: ops.pixel_norm(x, backend="triton"), [x])
            if norms:
                yield "pixel_norm", f"{tag}/{shape}", pixel_norm

        # video clips (N, C, T, H, W): channel tiles of 4 (3 channels) up to chunks of 64 (Wan's 96, 384,
        # LTX's 1024), and HunyuanVideo's GroupNorm(32) at its decoder's widths
        for shape in ((1, 3, 2, 4, 4), (1, 96, 2, 4, 4), (1, 384, 2, 4, 4), (1, 1024, 2, 2, 2)):
            def rms_norm(shape=shape, dtype=dtype, layout=layout):
                x = _tensor(shape, dtype, layout, True)
                wb = [_tensor((shape[1],), dtype, "", True) for _ in range(2)]
                _run(lambda: ops.rms_norm_act(x, *wb, 1e-12 / shape[1] ** 0.5, clamp=True, backend="triton"), [x, *wb])
            if norms:
                yield "rms_norm_act", f"{tag}/{shape}", rms_norm
        for shape in ((1, 128, 3, 8, 8), (1, 512, 2, 4, 4)):
            def group_norm_video(shape=shape, dtype=dtype, layout=layout):
                x = _tensor(shape, dtype, layout, True)
                wb = [_tensor((shape[1],), dtype, "", True) for _ in range(2)]
                _run(lambda: ops.group_norm_act(x, 32, *wb, 1e-6, activation="silu", backend="triton"), [x, *wb])
            if norms:
                yield "group_norm_act", f"{tag}/{shape}/G=32", group_norm_video

        for (c, co), (mode, scale, k) in itertools.product(
                ((16, 64), (64, 16), (64, 32), (64, 64)),
                (("nearest", 2, 3), ("nearest", 3, 3), ("nearest", 4, 3), ("bilinear", 2, 3), ("bilinear", 2, 1),
                 ("nearest", 2, 1))):
            def upsample_conv(c=c, co=co, mode=mode, scale=scale, k=k, dtype=dtype, layout=layout):
                x = _tensor((2, c, 8, 8), dtype, layout, True)
                wt, b = _tensor((co, c, k, k), dtype, "", True), _tensor((co,), dtype, "", True)
                _run(lambda: ops.upsample_conv2d(x, wt, b, scale_factor=scale, mode=mode, padding=k // 2,
                                                 backend="triton"), [x, wt, b])
            yield "upsample_conv2d", f"{tag}/{c}->{co}/{mode}x{scale}/k{k}", upsample_conv
        for c, co in ((16, 64), (64, 16), (64, 32), (64, 64)):
            def upsample_conv3d(c=c, co=co, dtype=dtype, layout=layout):
                x = _tensor((1, c, 2, 4, 4), dtype, layout, True)
                wt, b = _tensor((co, c, 3, 3, 3), dtype, "", True), _tensor((co,), dtype, "", True)
                _run(lambda: ops.upsample_conv3d(x, wt, b, (1, 2, 2), (1, 1, 1, 1, 2, 0), backend="triton"), [x, wt, b])
            yield "upsample_conv3d", f"{tag}/{c}->{co}", upsample_conv3d


def large_cases():
    """The largest shapes users run, forward only, tensors allocated lazily (never touched here):
    SD-VAE decode at 1024x1024 and 2048x2048, batch 1 and 4 (its biggest maps: 128 channels at full
    size, the last upsample from 256 channels), StyleGAN2 at 1024x1024, batch 32 (the last layers)."""
    from fastgen import ops
    from fastgen.ops.upfirdn2d import setup_filter

    bf = torch.bfloat16
    for side, batch, layout in itertools.product((1024, 2048), (1, 4), LAYOUTS):
        tag = f"sdvae-{side}/batch={batch}/{layout}"
        big = (batch, 128, side, side)
        half = (batch, 256, side // 2, side // 2)
        yield "group_norm_act", tag, lambda big=big, layout=layout: ops.group_norm_act(
            _tensor(big, bf, layout, lazy=True), 32, activation="silu", backend="triton")
        yield "upsample_conv2d", tag, lambda half=half, layout=layout: ops.upsample_conv2d(
            _tensor(half, bf, layout, lazy=True), _tensor((256, 256, 3, 3), bf, ""), padding=1, backend="triton")
        yield "bias_act", tag, lambda big=big, layout=layout: ops.bias_act(_tensor(big, bf, layout, lazy=True), act="swish",
                                                            backend="triton")
        yield "pixel_norm", tag, lambda big=big, layout=layout: ops.pixel_norm(_tensor(big, bf, layout, lazy=True), backend="triton")
        yield "batch_norm_act", tag, lambda big=big, layout=layout: ops.batch_norm_act(
            _tensor(big, bf, layout, lazy=True), torch.zeros(128), torch.ones(128), training=True, backend="triton")
    # video VAE decodes: HunyuanVideo's widest map at 720p (512 channels, 16 latent frames, 1/4 size) and a
    # 21-frame 720p clip at 128 channels (2.5e9 elements: offsets past 2^31), both layouts
    for shape, layout in itertools.product(((1, 512, 16, 180, 320), (1, 128, 21, 720, 1280)), LAYOUTS):
        tag = f"video-{'x'.join(map(str, shape))}/{layout}"
        yield "group_norm_act", tag, lambda shape=shape, layout=layout: ops.group_norm_act(
            _tensor(shape, bf, layout, lazy=True), 32, activation="silu", backend="triton")
        yield "rms_norm_act", tag, lambda shape=shape, layout=layout: ops.rms_norm_act(
            _tensor(shape, bf, layout, lazy=True), clamp=True, backend="triton")
        yield "upsample_conv3d", tag, lambda shape=shape, layout=layout: ops.upsample_conv3d(
            _tensor(shape, bf, layout, lazy=True), _tensor((shape[1], shape[1], 3, 3, 3), bf, ""), None, 1,
            (1, 1, 1, 1, 2, 0), backend="triton")
    # 2^31 rows and more (N * H * W, one channel): batch norm's int64 row branch
    yield "batch_norm_act", "rows=2^31+2^16/nchw", lambda: ops.batch_norm_act(
        _tensor((2, 1, 2 ** 15, 2 ** 15 + 1), bf, "nchw", lazy=True), torch.zeros(1), torch.ones(1), training=True,
        backend="triton")
    # upsample_conv2d's int64 pixel indices (over 2^31 output pixels per phase), forced at a small shape
    uc = importlib.import_module("fastgen.ops.upsample_conv2d")  # the module (fastgen.ops's name is the op)

    def int64_pixels(mode):
        saved, uc.INT32_INDICES = uc.INT32_INDICES, 0
        try:
            ops.upsample_conv2d(_tensor((2, 64, 8, 8), bf, "nchw"), _tensor((64, 64, 3, 3), bf, ""), mode=mode,
                                padding=1, backend="triton")
        finally:
            uc.INT32_INDICES = saved
    for mode in ("nearest", "bilinear"):
        yield "upsample_conv2d", f"int64 pixel indices/{mode}", lambda mode=mode: int64_pixels(mode)

    u3 = importlib.import_module("fastgen.ops.upsample_conv3d")

    def int64_positions():
        saved, u3.INT32_INDICES = u3.INT32_INDICES, 0
        try:
            ops.upsample_conv3d(_tensor((1, 64, 2, 8, 8), bf, "nchw"), _tensor((64, 64, 3, 3, 3), bf, ""), None, (1, 2, 2),
                                (1, 1, 1, 1, 2, 0), backend="triton")
        finally:
            u3.INT32_INDICES = saved
    yield "upsample_conv3d", "int64 position indices", int64_positions
    tag = "stylegan2-1024/batch=32/nchw"
    x = (32, 32, 512, 512)
    yield "upfirdn2d", tag, lambda: ops.upfirdn2d(_tensor(x, bf, "nchw", lazy=True), setup_filter([1, 3, 3, 1]), up=2,
                                                  padding=[2, 1, 2, 1], gain=4, backend="triton")
    yield "bias_act", tag, lambda: ops.bias_act(_tensor((32, 32, 1024, 1024), bf, "nchw", lazy=True),
                                                _tensor((32,), bf, ""), act="lrelu", backend="triton")


# ---------------------------------------------------------------------------------------------
# resources

def ptxas_report(ptx: str, arch: int, log: str = "") -> dict:
    """Registers, spill stores/loads and stack from `ptxas -v`: the log of Triton's own ptxas run when
    it compiled the kernel here, else (a kernel from Triton's disk cache) ptxas again, as Triton runs it."""
    if "Used" not in log:
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx)
            f.flush()
            # Triton's own command line (backends/nvidia/compiler.py make_cubin): -lineinfo changes the
            # register allocation a little, so a rerun without it can disagree with the real compile
            ptxas = TRITON_BIN / ("ptxas-blackwell" if arch >= 100 and (TRITON_BIN / "ptxas-blackwell").exists()
                                  else "ptxas")
            done = subprocess.run([str(ptxas), "-lineinfo", "-v", "--regAllocOptLevel=2",
                                   f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}", "-o", os.devnull, f.name],
                                  capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"ptxas failed: {done.stderr[-500:]}")
        log = done.stderr
    text = log
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "stack": number(r"(\d+) bytes stack frame")}


def occupancy(registers: int, threads: int, smem: int, arch: int) -> dict:
    """Blocks and warps one SM holds for this kernel, and what limits them (CUDA occupancy rules:
    registers allocated per warp in units of 256, a block's shared memory plus 1 KB reserved)."""
    lim = LIMITS[arch]
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by = {"warps": lim["max_warps"] // warps, "blocks": lim["max_blocks"],
          "registers": (lim["regs"] // regs_per_warp) // warps,
          "shared memory": lim["smem_sm"] // (smem + SMEM_RESERVED) if smem else lim["max_blocks"]}
    blocks = min(by.values())
    return {"blocks_per_sm": blocks, "occupancy": round(blocks * warps / lim["max_warps"], 3),
            "limited_by": min(by, key=by.get)}


def int32_offsets(ttir: str) -> list[str]:
    """The pointer each int32 tensor offset (`tt.addptr %p, %o : ..., tensor<...xi32>`) is added to,
    traced back through splat/broadcast/expand_dims/addptr to the kernel argument it starts from
    ('?' where the trace ends elsewhere, e.g. at a loop-carried value)."""
    params = set(re.findall(r"(%\w+): !tt\.ptr", ttir))
    defs, roots = {}, []  # names repeat across regions: a use sees the latest definition above it

    def root(value):
        for _ in range(200):
            if value in params:
                return value[1:]
            op, operands = defs.get(value, (None, []))
            if op not in ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.addptr", "tt.reshape") or not operands:
                return "?"
            value = operands[0]
        return "?"

    for line in ttir.splitlines():
        use = re.search(r"tt\.addptr (%[\w.]+), [^:]+: tensor<[^>]*!tt\.ptr<[^>]*>>, tensor<[0-9x]*xi32>", line)
        if use:
            roots.append(root(use.group(1)))
        m = re.match(r"\s*(%[\w.]+) = ([\w.]+) (.*)", line)
        if m:
            defs[m.group(1)] = (m.group(2), re.findall(r"%[\w.]+", m.group(3)))
    return roots


def triton_report(arch: int, full: bool, quick: bool) -> tuple[dict, list[str]]:
    """Compile every variant for `arch`; the report and the problems found."""
    driver.set_active(CompileOnlyDriver(arch))
    triton.knobs.nvidia.dump_ptxas_log = True
    problems, variants, launches = [], {}, 0
    with Recorder() as rec:
        # the quick profile: the size-derived variants in bf16 (fp16's codegen is bf16's) and fp32
        sized = size_cases((torch.float32, torch.bfloat16) if quick else DTYPES)
        for op, what, thunk in itertools.chain(cases(full, quick), sized):
            try:
                thunk()
            except Exception as e:  # a compile error (or a launcher that cannot run): a failure
                problems.append(f"sm_{arch} {op} {what}: {_one_line(e)}")
            for launch in rec.launches:
                compiled = launch["compiled"]
                key = compiled.hash
                if key not in variants:
                    meta = compiled.metadata
                    threads = meta.num_warps * 32 * getattr(meta, "num_ctas", 1)
                    res = ptxas_report(compiled.asm["ptx"], arch, launch["ptxas_log"])
                    variants[key] = {"kernel": launch["kernel"], "op": op, "example": what, "threads": threads,
                                     "compile_s": round(launch["seconds"], 2),
                                     "shared": meta.shared, **res, **occupancy(res["registers"], threads,
                                                                              meta.shared, arch)}
            launches += len(rec.launches)
            rec.launches.clear()
        grids = []
        for op, what, thunk in large_cases():
            try:
                thunk()
            except Exception as e:
                problems.append(f"sm_{arch} large {op} {what}: {_one_line(e)}")
            for launch in rec.launches:
                g = launch["grid"] + (1,) * (3 - len(launch["grid"]))
                # an int32 offset into a tensor of 2^31 or more elements (or into what the trace cannot name)
                risky = sorted({p for p in int32_offsets(launch["compiled"].asm["ttir"])
                                if p == "?" or launch["sizes"].get(p, 0) >= 2 ** 31})
                grids.append({"op": op, "shape": what, "kernel": launch["kernel"], "grid": g,
                              "largest_tensor": launch["largest_tensor"], "int32_offsets_into_large": risky})
                if g[0] >= 2 ** 31 or g[1] >= 2 ** 16 or g[2] >= 2 ** 16:
                    problems.append(f"sm_{arch} {op} {what}: {launch['kernel']} grid {g} over the limits")
                if risky:
                    problems.append(f"sm_{arch} {op} {what}: {launch['kernel']} adds int32 offsets to {risky} "
                                    f"(largest tensor {launch['largest_tensor']} elements)")
            rec.launches.clear()
    lim = LIMITS[arch]
    for v in variants.values():
        where = f"sm_{arch} {v['kernel']} ({v['op']} {v['example']})"
        if v["spill_stores"] or v["spill_loads"] or v["stack"]:
            problems.append(f"{where}: spills {v['spill_stores']} B stored, {v['spill_loads']} B loaded, "
                            f"{v['stack']} B stack ({v['registers']} registers)")
        if v["shared"] > lim["smem_block_optin"]:
            problems.append(f"{where}: {v['shared']} B of shared memory, over the {lim['smem_block_optin']} B a block may have")
        if v["threads"] > 1024:
            problems.append(f"{where}: {v['threads']} threads per block")
    return {"arch": f"sm_{arch}", "launches": launches, "variants": list(variants.values()), "grids": grids}, problems


def _one_line(e: Exception) -> str:
    """A compile error's gist: its type and last line (Triton's first lines are source positions)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    cause = e.__cause__ or e.__context__
    if cause is not None:
        lines += [f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"]
    return f"{type(e).__name__}: {(lines[-1] if lines else '')[:300]}"


def cuda_report(arch: int, lib: Path | None) -> tuple[list, list[str]]:
    """The CUDA C++ kernels of the built fastgen._C: registers, local memory (spills and stack),
    static shared memory, from `cuobjdump --dump-resource-usage`; threads per block from csrc/."""
    if lib is None:
        return [], []
    done = subprocess.run([str(TRITON_BIN / "cuobjdump"), "--dump-resource-usage", str(lib)], capture_output=True,
                          text=True)
    if done.returncode or "Fatbin" not in done.stdout:
        return [], []  # a CPU-only build: no CUDA kernels in it
    divisions = int64_division_calls(lib, arch)
    threads, suffix = {}, {}
    for cu in [*(ROOT / "csrc").glob("*.cu"), *(ROOT / "csrc").glob("*.cuh")]:
        m = re.search(r"constexpr int (?:kThreads|THREADS) = (\d+);", cu.read_text())
        threads[cu.stem] = int(m.group(1)) if m else 1024
        suffix[cu.stem] = cu.suffix
    kernels, problems, current = [], [], None
    for block in done.stdout.split("Fatbin elf code:")[1:]:
        if f"arch = sm_{arch}" not in block:
            continue
        for name, usage in re.findall(r"Function (\S+):\n\s+(REG:.*)", block):
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", usage))
            # a .cu file's kernels live in its anonymous namespace (its name in the mangled one); a
            # .cuh header's in the namespace named after it (fastgen::norm_backward)
            source = next((s for s in threads if f"_{s}_cu_" in name or f"{len(s)}{s}" in name), None)
            t = threads.get(source, 1024)
            regs, local, shared = int(fields["REG"]), int(fields["LOCAL"]), int(fields["SHARED"])
            current = {"kernel": _demangle(name), "source": f"csrc/{source}{suffix.get(source, '.cu')}", "threads": t,
                       "registers": regs, "int64_division_calls": divisions.get(name, 0),
                       "local": local, "shared": shared, **occupancy(regs, t, shared, arch)}
            kernels.append(current)
            if local:
                problems.append(f"sm_{arch} {current['kernel']}: {local} B of local memory (spills or stack)")
            if shared > SMEM_STATIC:
                problems.append(f"sm_{arch} {current['kernel']}: {shared} B of static shared memory")
    return kernels, problems


def int64_division_calls(lib: Path, arch: int) -> dict[str, int]:
    """Per CUDA kernel (mangled name), the calls in its SASS to a 64-bit integer division/remainder
    routine (~70 instructions each; recognised by the I2F.U64.RP its body starts its reciprocal with:
    cuobjdump strips the routines' names). The per-element divisions go through csrc/index.cuh, in 32
    bits below 2^31 elements, so each call counted here is on the >= 2^31 path or per block."""
    done = subprocess.run([str(TRITON_BIN / "cuobjdump"), "-sass", "-arch", f"sm_{arch}", str(lib)],
                          capture_output=True, text=True)
    functions, current = {}, None
    for line in done.stdout.splitlines():
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(2).strip()))
    calls = {}
    for name, code in functions.items():
        at = {address: k for k, (address, _) in enumerate(code)}

        def divides(target):  # the routine at `target` up to its RET
            for _, text in code[at.get(target, len(code)):]:
                if "I2F.U64.RP" in text:
                    return True
                if text.startswith("RET"):
                    return False
            return False
        targets = [int(m.group(1), 16) for _, text in code if (m := re.search(r"CALL\.REL\.NOINC (0x[0-9a-f]+)", text))]
        calls[name] = sum(divides(t) for t in targets)
    return calls


def _demangle(name: str) -> str:
    done = subprocess.run(["c++filt", name], capture_output=True, text=True)
    out = done.stdout.strip() or name
    return re.sub(r"\(anonymous namespace\)::|c10::", "", out)


# ---------------------------------------------------------------------------------------------

def summary(report: dict) -> str:
    lines = []
    for arch in report["archs"]:
        tri = arch["triton"]
        by_kernel = defaultdict(list)
        for v in tri["variants"]:
            by_kernel[v["kernel"]].append(v)
        lines.append(f"{arch['arch']}: {len(tri['variants'])} Triton variants from {tri['launches']} launches; "
                     f"{len(arch['cuda'])} CUDA C++ kernels")
        lines.append(f"  {'kernel':44s} {'variants':>8s} {'regs':>9s} {'spill B':>7s} {'smem KB':>9s} {'threads':>7s} "
                     f"{'occupancy':>13s}  limited by")
        rows = [(k, vs) for k, vs in by_kernel.items()]
        rows += [(re.sub(r"^void ", "", c["kernel"]).split("(")[0] + " [cuda]",
                  [dict(c, spill_stores=c["local"], spill_loads=0)]) for c in arch["cuda"]]
        for kernel, vs in rows:
            worst = min(vs, key=lambda v: v["occupancy"])
            regs = [v["registers"] for v in vs]
            smem = [v["shared"] for v in vs]
            occ = [v["occupancy"] for v in vs]
            lines.append(f"  {kernel[:44]:44s} {len(vs):8d} {min(regs):4d}-{max(regs):<4d} "
                         f"{max(v['spill_stores'] + v['spill_loads'] for v in vs):7d} "
                         f"{min(smem) / 1024:4.0f}-{max(smem) / 1024:<4.0f} {max(v['threads'] for v in vs):7d} "
                         f"{min(occ):5.2f}-{max(occ):<5.2f}  {worst['limited_by']}")
        calls = {c["kernel"]: c.get("int64_division_calls", 0) for c in arch["cuda"]}
        if calls:
            lines.append(f"  CUDA C++: {sum(calls.values())} call sites of a 64-bit division/remainder routine in "
                         f"{sum(1 for v in calls.values() if v)} of {len(calls)} kernels; none per element below 2^31 "
                         f"elements (csrc/index.cuh divides there in 32 bits): the >= 2^31 branch, or per block")
    return "\n".join(lines)


def one_arch(arch: int, full: bool, quick: bool, lib: Path | None) -> tuple[dict, list[str]]:
    tri, p1 = triton_report(arch, full, quick)
    cuda, p2 = cuda_report(arch, lib)
    return {"arch": f"sm_{arch}", "limits": LIMITS[arch], "triton": tri, "cuda": cuda}, p1 + p2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,90")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu-resources.json"))
    parser.add_argument("--full", action="store_true", help="every combination of every op's options (an hour)")
    parser.add_argument("--quick", action="store_true", help="one activation and size class (a smoke run)")
    parser.add_argument("--extension", default=None, help="the fastgen._C to read the CUDA kernels from "
                        "(default: the one fastgen imports)")
    parser.add_argument("--report-arch", default="", help="architectures compiled with the quick profile and "
                        "reported, not gated (Blackwell: 100,120)")
    parser.add_argument("--part", action="store_true", help=argparse.SUPPRESS)  # one arch, for the parallel run
    args = parser.parse_args(argv)
    if args.extension is None:
        import fastgen
        args.extension = next(iter(Path(fastgen.__file__).parent.glob("_C*.so")), None)
    archs = [int(a) for a in args.arch.split(",")]
    reported = [int(a) for a in args.report_arch.split(",") if a]
    t0 = time.perf_counter()
    if args.part:
        _allow_triton_on_cpu_tensors()
        part, problems = one_arch(archs[0], args.full, args.quick, Path(args.extension) if args.extension else None)
        Path(args.out).write_text(json.dumps({"part": part, "problems": problems}))
        return 0
    # one process per architecture, side by side (each keeps its own Triton driver)
    with tempfile.TemporaryDirectory() as tmp:
        flags = [*(["--full"] if args.full else []), *(["--quick"] if args.quick else []),
                 *(["--extension", str(args.extension)] if args.extension else [])]
        procs = [subprocess.Popen([sys.executable, __file__, "--part", "--arch", str(a), "--out", f"{tmp}/{a}.json",
                                   *flags, *(["--quick"] if a in reported and not args.quick else [])])
                 for a in archs + reported]
        codes = [p.wait() for p in procs]
        parts = [json.loads(Path(f"{tmp}/{a}.json").read_text()) if c == 0 else None
                 for a, c in zip(archs + reported, codes)]
    report = {"triton": triton.__version__, "torch": torch.__version__, "git_sha": _git_sha(),
              "extension": str(args.extension),
              "profile": "full" if args.full else "quick" if args.quick else "ci",
              "seconds": round(time.perf_counter() - t0, 1), "archs": [], "problems": [], "reported": []}
    for a, part in zip(archs + reported, parts):
        where = "reported" if a in reported else "problems"
        if part is None:
            report[where].append(f"sm_{a}: the compile process failed")
            continue
        report["archs"].append(part["part"])
        report[where] += part["problems"]
        tri = part["part"]["triton"]
        print(f"sm_{a}: {len(tri['variants'])} Triton variants compiled ({tri['launches']} launches), "
              f"{len(part['part']['cuda'])} CUDA kernels")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    Path(args.out).with_suffix(".txt").write_text(summary(report) + "\n")
    print(summary(report))
    print(f"wrote {args.out}")
    for p in report["reported"]:
        print("REPORT (not gated)", p)
    if reported:
        print(f"reported architectures {', '.join(f'sm_{a}' for a in reported)}: {len(report['reported'])} findings")
    for p in report["problems"]:
        print("PROBLEM", p)
    print(f"triton_aot: {'FAILED' if report['problems'] else 'PASSED'} ({len(report['problems'])} problems) "
          f"in {report['seconds']} s")
    if not report["problems"]:  # what the test command's AOT stage need not compile again (tools/aot_record.py)
        aot_record.remember(aot_record.key(triton.__version__, report["profile"], args.arch),
                            importlib.metadata.version("torch"),
                            {"git_sha": report["git_sha"], "date": time.strftime("%Y-%m-%d"),
                             "seconds": report["seconds"]})
    return 1 if report["problems"] else 0


def _git_sha() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
