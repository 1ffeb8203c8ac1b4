"""`python -m fastgen verify`: every op's backends run on a device against the float64 reference,
and the record that decides what `auto` may pick on CUDA (fastgen/gpu_verified.json).

For each op of the registry (the riskiest kernels first), each backend it has that runs on the
device, each dtype the backend takes (float32, float16, bfloat16) and each memory format (NCHW and
channels_last, for ops on 4-D maps): the op's small examples and the TILING examples below (sizes
that reach several K tiles and output-channel blocks, split statistics, channel chunks), forward and
the gradients of a random cotangent laid out like the output, against the op's reference in float64:
within the tolerance table for the dtype, or else by the flash-attention rule (the backend's error at
most 2x the reference's own in that dtype, 3x for gradients), TF32 off so that an fp32 baseline is
fp32. On a GPU, a backend that passed is then timed against the reference at the quick GPU shape of
the op's benchmark suite, in the same protection: a fault there fails the entry.

Each op runs in a process of its own (`isolate`): a CUDA error is sticky in a process and would fail
every later op; a crash fails that op's entries only. The record (rewritten after every op) is keyed
op -> backend -> dtype -> memory format; `auto` on CUDA reads it that way (fastgen.dispatch).
Outcomes: every entry passed (exit 0), some entry FAILED (exit 1), or the budget ran out first with
nothing failed (exit 3: "cut by time"; the ops not reached have no entries).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from fastgen.dispatch import CHANNELS_LAST, DEVICES, RECORD_FORMAT, backends, record_layout
from fastgen.ops import REGISTRY
from fastgen.ops._registry import Example
from fastgen.ops.upfirdn2d import setup_filter
from fastgen.tolerances import judge

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHANNELS_LAST_KEYS = ("nhwc", "ndhwc")  # fastgen.dispatch.record_layout's channels-last keys (4-D, 5-D)
EXIT_CUT = 3  # verify's exit status when the budget ran out before every op ran and nothing failed
# riskiest first: a run cut short by its budget has verified what most needs it. The newest kernels,
# which have run nowhere yet, lead (the two upsample_convs share one CUDA kernel)
RISK_ORDER = ("rms_norm_act", "upsample_conv3d", "upsample_conv2d", "group_norm_act", "batch_norm_act",
              "instance_norm_act", "adaptive_instance_norm", "modulated_conv2d", "upfirdn2d", "bias_act", "pixel_norm")

# Sizes past the small examples, where the kernels take their other tiling branches: upsample_conv2d
# with 80 input channels (three K tiles of 32, the last partial) and 150 output channels (three blocks
# of 64); group norm with 96 channels per group (two chunks of 64, the second partial) and positions
# split over 25 programs per group; batch norm with 96 channels (two blocks) and rows split into 25
# chunks; pixel norm over 512 channels; bias_act and upfirdn2d over several blocks.
TILING = {
    "upsample_conv2d": (
        Example("upsample_conv2d_tiles_nearest", lambda: (torch.randn(2, 80, 9, 11), torch.randn(150, 80, 3, 3) / 20,
                                                          torch.randn(150)), grad_of=(0, 1, 2)),
        Example("upsample_conv2d_tiles_bilinear", lambda: (torch.randn(1, 80, 7, 6), torch.randn(150, 80, 3, 3) / 20,
                                                           torch.randn(150)), {"mode": "bilinear"}, (0, 1, 2)),
        Example("upsample_conv2d_tiles_nearest3_k1", lambda: (torch.randn(2, 40, 5, 4), torch.randn(70, 40, 1, 1) / 6,
                                                              None), {"scale_factor": 3, "padding": 0}, (0, 1))),
    "group_norm_act": (
        Example("group_norm_act_split_chunks", lambda: (torch.randn(1, 192, 40, 40), 2, torch.randn(192),
                                                        torch.randn(192)), grad_of=(0, 2, 3)),
        Example("group_norm_act_split", lambda: (torch.randn(1, 8, 64, 64), 4, torch.randn(8), torch.randn(8)),
                grad_of=(0, 2, 3))),
    "batch_norm_act": (
        Example("batch_norm_act_split", lambda: (torch.randn(4, 96, 20, 20), None, None, torch.randn(96),
                                                 torch.randn(96), True), grad_of=(0, 3, 4)),),
    "instance_norm_act": (
        Example("instance_norm_act_split", lambda: (torch.randn(1, 3, 96, 96), torch.randn(3), torch.randn(3)),
                grad_of=(0, 1, 2)),),
    "rms_norm_act": (
        Example("rms_norm_act_video_chunks", lambda: (torch.randn(1, 192, 3, 12, 10), torch.randn(192),
                                                      torch.randn(192)), {"clamp": True}, (0, 1, 2)),),
    "upsample_conv3d": (
        Example("upsample_conv3d_tiles_spatial2x_causal", lambda: (torch.randn(1, 80, 3, 5, 6),
                                                                   torch.randn(150, 80, 3, 3, 3) / 40, torch.randn(150)),
                {"scale_factor": (1, 2, 2), "padding": (1, 1, 1, 1, 2, 0)}, (0, 1, 2)),),
    "pixel_norm": (Example("pixel_norm_512", lambda: (torch.randn(2, 512, 6, 5),)),),
    "bias_act": (Example("bias_act_blocks", lambda: (torch.randn(2, 64, 9, 10), torch.randn(64)), {"act": "lrelu"},
                         (0, 1)),),
    "upfirdn2d": (Example("upfirdn2d_blocks", lambda: (torch.randn(2, 16, 20, 18), setup_filter((1, 3, 3, 1))),
                          {"up": 2, "padding": [2, 1, 2, 1], "gain": 4.0}),),
}


def _to(t, device, dtype, layout="nchw"):
    if torch.is_tensor(t) and t.is_floating_point():
        t = t.to(device=device, dtype=dtype)
        cl = layout in CHANNELS_LAST_KEYS and t.dim() in CHANNELS_LAST
        return t.contiguous(memory_format=CHANNELS_LAST[t.dim()]) if cl else t
    return t.to(device) if torch.is_tensor(t) else t


def examples(spec) -> tuple:
    return tuple(spec.examples) + TILING.get(spec.name, ())


def _layouts_of(x: torch.Tensor) -> tuple[str, ...]:
    """The record's memory-format keys an input of x's rank runs in (fastgen.dispatch.record_layout)."""
    if x.dim() not in CHANNELS_LAST:
        return (record_layout(x),)
    return (record_layout(x), record_layout(x.contiguous(memory_format=CHANNELS_LAST[x.dim()])))


def layouts(spec) -> tuple[str, ...]:
    """The memory-format keys of the op's examples (their first input): both formats of 4-D maps
    (nchw, nhwc) and of 5-D clips (ncdhw, ndhwc), which take different kernel paths, else nchw alone."""
    return tuple(dict.fromkeys(k for e in examples(spec) for k in _layouts_of(e.inputs()[0])))


def _outputs(spec, example, device, dtype, backend, layout="nchw"):
    """The op's output and the gradients of a fixed cotangent, for one backend (None: the reference
    through `backend="reference"`) in one dtype, x (the first input) in `layout`."""
    torch.manual_seed(0)
    inputs = [_to(t, device, dtype, layout if i == 0 else "nchw") for i, t in enumerate(example.inputs())]
    kwargs = {k: _to(v, device, dtype) for k, v in example.kwargs.items()}
    kwargs = {k: (v.float() if k == "resample_filter" and torch.is_tensor(v) else v) for k, v in kwargs.items()}
    leaves = [inputs[i].requires_grad_(True) for i in example.grad_of]
    out = spec.public(*inputs, **kwargs, backend=backend)
    noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    cotangent = torch.empty_like(out).copy_(noise)  # laid out like the output, as autograd hands it over
    grads = torch.autograd.grad(out, leaves, cotangent)
    return [out.detach()] + [g.detach() for g in grads]


@functools.lru_cache(maxsize=64)
def _baselines(op: str, example_name: str, device: str, dtype: torch.dtype, layout: str):
    """The float64 oracle and the unfused layers' own result in dtype (both through the reference, from
    the same seeded inputs): one computation for every backend checked against them."""
    example = next(e for e in examples(REGISTRY[op]) if e.name == example_name)
    want = _outputs(REGISTRY[op], example, "cpu", torch.float64, "reference", layout)
    eager = [t.cpu() for t in _outputs(REGISTRY[op], example, device, dtype, "reference", layout)]
    return want, eager


def check(spec, backend: str, device: str, dtype: torch.dtype, layout: str = "nchw") -> list[str]:
    """What failed for this op, backend, dtype and memory format on the device (empty: it passed)."""
    problems = []
    for example in examples(spec):
        if layout not in _layouts_of(example.inputs()[0]):  # another rank's entry
            continue
        try:
            want, eager = _baselines(spec.name, example.name, device, dtype, layout)
            got = [t.cpu() for t in _outputs(spec, example, device, dtype, backend, layout)]
        except Exception as e:  # a backend that raises has failed; say how
            problems.append(f"{example.name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            continue
        problems += [f"{example.name} {p}" for p in judge(got, eager, want, dtype)]
    return problems


def speedup(spec, backend: str, dtype: torch.dtype, layout: str = "nchw", reps: int = 20) -> float | None:
    """The backend's forward speed over the reference's at the quick GPU shape of the op's suite, or
    its first shape of the entry's rank (None: the suite has none)."""
    from fastgen.bench import SUITES, make_inputs, time_ms

    suite = SUITES.get(spec.name)
    if suite is None:
        return None
    for shape in sorted(suite.gpu_shapes, key=lambda s: not s.quick):
        inputs = make_inputs(suite, shape, dtype, "cuda", channels_last=layout in CHANNELS_LAST_KEYS)
        if record_layout(inputs[0]) == layout:
            break
    else:
        return None
    ms = {}
    with torch.no_grad():
        for name in ("reference", backend):
            f = suite.fused(name)
            ms[name] = time_ms(lambda: f(*inputs, shape), "cuda", reps)  # noqa: B023
    return ms["reference"] / ms[backend]


def no_tf32():
    """fp32 baselines in fp32: cuDNN's convolutions and cuBLAS's matmuls default to TF32 on Ampere and
    later, and an fp32 rule judged against a TF32 eager would pass errors near 2e-3."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def planned(spec, device: str, dtypes=DTYPES) -> list[tuple[str, str, str]]:
    """(backend, dtype name, layout) of every entry verify makes for this op on the device."""
    available = backends()
    return [(b, str(d).replace("torch.", ""), layout) for b in spec.impls
            if device in DEVICES[b] and available[b].available
            for d in dtypes if d in spec.impls[b].dtypes for layout in layouts(spec)]


def verify_op(spec, device: str, dtypes=DTYPES, timed: bool = True, log=print, on_entry=None) -> dict:
    """backend -> dtype -> layout -> entry for one op, in this process."""
    no_tf32()
    result: dict = {}
    for backend, name, layout in planned(spec, device, dtypes):
        dtype = getattr(torch, name)
        t0 = time.perf_counter()
        entry: dict = {}
        try:
            problems = check(spec, backend, device, dtype, layout)
            if not problems and device == "cuda" and timed:
                entry["speedup_vs_eager"] = speedup(spec, backend, dtype, layout)
        except Exception:
            problems = [traceback.format_exc().splitlines()[-1][:300]]
        entry = {"passed": not problems, "problems": problems[:5], **(entry if not problems else {}),
                 "seconds": round(time.perf_counter() - t0, 2)}
        result.setdefault(backend, {}).setdefault(name, {})[layout] = entry
        log(f"{spec.name:24s} {backend:9s} {name:9s} {layout:4s} {'PASS' if not problems else 'FAIL'} "
            f"{entry['seconds']:5.1f}s {'; '.join(problems[:2])}")
        if on_entry:
            on_entry(result)
    return result


def _header(device: str) -> dict:
    from fastgen.bench import environment

    env = environment()
    return {"format": RECORD_FORMAT, "device": env["device"],
            "capability": list(torch.cuda.get_device_capability()) if device == "cuda" else None,
            "torch": env["torch"], "triton": env["triton"], "cuda": env["cuda"], "git_sha": env["git_sha"],
            "date": env["date"], "python": platform.python_version(), "ops": {}, "not_reached": []}


def _in_child(spec, device: str, timed: bool, timeout: float, log) -> tuple[dict, str]:
    """verify_op for one op in a fresh process: its entries and how the process ended ('' when it
    exited; 'crashed: ...' or 'cut by time')."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "op.json")
        cmd = [sys.executable, "-m", "fastgen", "verify", "--in-process", "--device", device, "--ops", spec.name,
               "--out", out, *([] if timed else ["--untimed"])]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout))
            ended = "" if done.returncode in (0, 1) else (
                f"crashed: exit {done.returncode}: "
                f"{(done.stderr.strip().splitlines() or [''])[-1][:300]}")
            text = done.stdout
        except subprocess.TimeoutExpired as e:
            ended, text = "cut by time", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        for line in text.splitlines():
            if line.startswith(spec.name):
                log(line)
        try:
            with open(out) as f:
                return json.load(f)["ops"].get(spec.name, {}), ended
        except (OSError, ValueError, KeyError):
            return {}, ended


def verify(device: str = "cuda", ops=None, dtypes=DTYPES, log=print, out: str | None = None,
           timed: bool = True, isolate: bool = True, budget: float | None = None) -> dict:
    """The record: device, capability, versions, and per op / backend / dtype / memory format whether
    it passed and (on a GPU, when `timed`) its speedup over the reference; rewritten to `out` after
    every op (in-process: every entry), so that a run cut short still leaves what it verified.
    `budget` (seconds): no op starts after it, and a running one is stopped at it (cut by time)."""
    no_tf32()
    deadline = time.monotonic() + budget if budget else None
    record = _header(device)

    def save(*_):
        if out:  # whole or not at all: a kill mid-write leaves the previous record
            with open(f"{out}.tmp", "w") as f:
                json.dump(record, f, indent=1)
            os.replace(f"{out}.tmp", out)

    order = [n for n in RISK_ORDER if n in REGISTRY] + [n for n in REGISTRY if n not in RISK_ORDER]
    for name in order:
        spec = REGISTRY[name]
        if ops and name not in ops:
            continue
        left = deadline - time.monotonic() if deadline else None
        if left is not None and left <= 1:
            record["not_reached"].append(name)
            continue
        if not isolate:
            record["ops"][name] = {}
            verify_op(spec, device, dtypes, timed, log, on_entry=lambda r, name=name: (record["ops"].update({name: r}),
                                                                                      save()))
            continue
        entries, ended = _in_child(spec, device, timed, left if left is not None else 3600, log)
        for backend, dname, layout in planned(spec, device, dtypes):
            if layout in entries.get(backend, {}).get(dname, {}):
                continue
            if ended == "cut by time":
                record["not_reached"].append(f"{name}/{backend}/{dname}/{layout}")
            else:  # the process died before this entry: the op failed (a crash, or a sticky CUDA error)
                why = ended or "the op's process ended without this entry"
                entries.setdefault(backend, {}).setdefault(dname, {})[layout] = {"passed": False, "problems": [why]}
                log(f"{name:24s} {backend:9s} {dname:9s} {layout:4s} FAIL {why}")
        if entries:
            record["ops"][name] = entries
        save()
    save()
    return record


def entries(record: dict):
    """(op/backend/dtype/layout, entry) for every entry of a record."""
    for op, bs in record["ops"].items():
        for b, ds in bs.items():
            for d, ls in ds.items():
                for layout, e in ls.items():
                    yield f"{op}/{b}/{d}/{layout}", e


def failures(record: dict) -> list[str]:
    return [key for key, e in entries(record) if not e["passed"]]


def outcome(record: dict) -> str:
    """passed, FAILED (an entry failed) or cut by time (nothing failed, something not reached)."""
    return "FAILED" if failures(record) else "cut by time" if record.get("not_reached") else "passed"


def main(device: str, out: str | None, ops=None, timed: bool = True, isolate: bool = True,
         budget: float | None = None) -> int:
    unknown = [op for op in ops or () if op not in REGISTRY]
    if unknown:
        print(f"fastgen verify: no op named {unknown}; the ops: {list(REGISTRY)}")
        return 2
    record = verify(device, ops, out=out, timed=timed, isolate=isolate, budget=budget)
    if out:
        print(f"wrote {out}")
    failed = failures(record)
    total = sum(1 for _ in entries(record))
    state = outcome(record)
    print(f"verify on {record['device']}: {total - len(failed)} of {total} op/backend/dtype/layout passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else "")
          + (f"; not reached (cut by time): {', '.join(record['not_reached'])}" if record["not_reached"] else ""))
    return {"passed": 0, "FAILED": 1, "cut by time": EXIT_CUT}[state]
