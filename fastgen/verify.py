"""`python -m fastgen verify`: every op's backends run on a device against the float64 reference,
and the record that decides what `auto` may pick on CUDA (fastgen/gpu_verified.json).

For each op of the registry, each backend it has that runs on the device, and each dtype the backend
takes (float32, float16, bfloat16): every example of the op's spec, forward and the gradients of a
random cotangent, against the op's reference in float64: within the tolerance table for the dtype,
or else by the flash-attention rule (the backend's error at most 2x the reference's own in that
dtype, 3x for gradients). On a GPU, a backend that
passed is timed against the reference at the first shape of the op's benchmark suite, forward.
tools/gpu_check.sh runs it on the GPU; on the CPU it is its rehearsal (correctness only).
"""

from __future__ import annotations

import json
import platform
import time
import traceback

import torch

from fastgen.dispatch import DEVICES, backends
from fastgen.ops import REGISTRY
from fastgen.tolerances import judge

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _to(t, device, dtype):
    if torch.is_tensor(t) and t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device) if torch.is_tensor(t) else t


def _outputs(spec, example, device, dtype, backend):
    """The op's output and the gradients of a fixed cotangent, for one backend (None: the reference
    through `backend="reference"`) in one dtype."""
    torch.manual_seed(0)
    inputs = [_to(t, device, dtype) for t in example.inputs()]
    kwargs = {k: _to(v, device, dtype) for k, v in example.kwargs.items()}
    kwargs = {k: (v.float() if k == "resample_filter" and torch.is_tensor(v) else v) for k, v in kwargs.items()}
    leaves = [inputs[i].requires_grad_(True) for i in example.grad_of]
    out = spec.public(*inputs, **kwargs, backend=backend)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, out.dtype)
    grads = torch.autograd.grad(out, leaves, cotangent)
    return [out.detach()] + [g.detach() for g in grads]


def check(spec, backend: str, device: str, dtype: torch.dtype) -> list[str]:
    """What failed for this op, backend and dtype on the device (empty: it passed)."""
    problems = []
    for example in spec.examples:
        try:
            want = _outputs(spec, example, "cpu", torch.float64, "reference")
            eager = [t.cpu() for t in _outputs(spec, example, device, dtype, "reference")]
            got = [t.cpu() for t in _outputs(spec, example, device, dtype, backend)]
        except Exception as e:  # a backend that raises has failed; say how
            problems.append(f"{example.name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            continue
        problems += [f"{example.name} {p}" for p in judge(got, eager, want, dtype)]
    return problems


def speedup(spec, backend: str, dtype: torch.dtype, reps: int = 20) -> float | None:
    """The backend's forward speed over the reference's at the quick GPU shape of the op's suite."""
    from fastgen.bench import SUITES, make_inputs, time_ms

    suite = SUITES.get(spec.name)
    if suite is None:
        return None
    shape = next(s for s in suite.gpu_shapes if s.quick)
    inputs = make_inputs(suite, shape, dtype, "cuda", channels_last=False)
    ms = {}
    with torch.no_grad():
        for name in ("reference", backend):
            f = suite.fused(name)
            ms[name] = time_ms(lambda: f(*inputs, shape), "cuda", reps)  # noqa: B023
    return ms["reference"] / ms[backend]


def verify(device: str = "cuda", ops=None, dtypes=DTYPES, log=print, out: str | None = None,
           timed: bool = True) -> dict:
    """The record: device, capability, versions, and per op / backend / dtype whether it passed and
    (on a GPU, when `timed`) its speedup over the reference; rewritten to `out` after every entry, so that a run
    cut short by its time limit still leaves what it verified."""
    from fastgen.bench import environment

    env = environment()
    record = {"device": env["device"], "capability": list(torch.cuda.get_device_capability()) if device == "cuda"
              else None, "torch": env["torch"], "triton": env["triton"], "cuda": env["cuda"],
              "git_sha": env["git_sha"], "date": env["date"], "python": platform.python_version(), "ops": {}}
    available = backends()
    for spec in REGISTRY.values():
        if ops and spec.name not in ops:
            continue
        for backend in spec.impls:
            if device not in DEVICES[backend] or not available[backend].available:
                continue
            for dtype in dtypes:
                if dtype not in spec.impls[backend].dtypes:
                    continue
                t0 = time.perf_counter()
                try:
                    problems = check(spec, backend, device, dtype)
                except Exception:
                    problems = [traceback.format_exc().splitlines()[-1]]
                entry = {"passed": not problems, "problems": problems[:5]}
                if not problems and device == "cuda" and timed:
                    entry["speedup_vs_eager"] = speedup(spec, backend, dtype)
                name = str(dtype).replace("torch.", "")
                record["ops"].setdefault(spec.name, {}).setdefault(backend, {})[name] = entry
                if out:
                    with open(out, "w") as f:
                        json.dump(record, f, indent=1)
                log(f"{spec.name:24s} {backend:9s} {name:9s} {'PASS' if not problems else 'FAIL'} "
                    f"{time.perf_counter() - t0:5.1f}s {'; '.join(problems[:2])}")
    return record


def failures(record: dict) -> list[str]:
    return [f"{op}/{b}/{d}" for op, bs in record["ops"].items() for b, ds in bs.items() for d, e in ds.items()
            if not e["passed"]]


def main(device: str, out: str | None, ops=None, timed: bool = True) -> int:
    unknown = [op for op in ops or () if op not in REGISTRY]
    if unknown:
        print(f"fastgen verify: no op named {unknown}; the ops: {list(REGISTRY)}")
        return 2
    record = verify(device, ops, out=out, timed=timed)
    if out:
        print(f"wrote {out}")
    failed = failures(record)
    total = sum(len(ds) for bs in record["ops"].values() for ds in bs.values())
    print(f"verify on {record['device']}: {total - len(failed)} of {total} op/backend/dtype passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0

