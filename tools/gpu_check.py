"""The GPU gate (run by tools/gpu_check.sh): a plan of stages that fits an 8-minute window (450 s), riskiest
checks first, each with a budget, each ending `passed`, `FAILED` (a wrong result, a crash, a build error)
or `cut by time` (its budget ran out with nothing failed; `not reached` when the window closed before it).
$OUT keeps at most 8 files, what a lent machine brings back (summary.json, gpu_verified.json,
bench_headline and bench_full .json and .png, models.json, logs.tar.gz), summary and logs rewritten whole
after every stage, so a kill still leaves them. The
verdict: PASSED; INCOMPLETE (stages cut, nothing failed, something verified; exit 0); FAILED (exit 1);
NOT VERIFIED (the build did not pass or verify passed nothing: exit 2), printed before the tables.

    bash tools/gpu_check.sh [--dry-run] [--ops a,b] [--stages s1,s2] [--budget stage=seconds ...] [--full-tests]

--dry-run: the same plan on the CPU (no build; Triton through the interpreter; small CPU shapes), its
budgets scaled by --scale (default 3: the CPU is slower), the plan and the projected device time printed
first (tests/test_gpu_check.py runs it in CI). --stages runs only those (the others "not selected").
--budget overrides a stage's budget (rehearsals of a time-out). --full-tests: every CUDA test as the
test stage (3,500+; past the window on one GPU), instead of the subset.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# seconds of wall time on the GPU machine, the build included: the device tool's 8 minutes less 30 s for
# the verdict, the tables and the copy of $OUT back
WINDOW = 450
STARTUP = (60, 120)  # the machine's start, outside the command's time but inside the device budget
DEVICE_BUDGET = 900  # a session's device time

# The build's cost: CPU seconds per translation unit (nvcc 13.0, torch 2.14, FASTGEN_CUDA=1). On the
# GPU machine's 16 cores every unit compiles at once: the build takes about its slowest unit plus the link.
# Measured 2026-12-06 from build/.ninja_log (2 jobs on 2 cores, the default 8.0;9.0;10.0;12.0 targets,
# so the .cu units are conservative for the one architecture the gate builds): 634 CPU-seconds, 5.5
# minutes of wall here; on 16 cores about the slowest unit (77 s) plus the link and pip: ~100 s. The
# projection (build_projection) reads the sources in csrc/: a unit measured here counts its seconds, a
# newer one the slowest of its kind.
BUILD_CPU_SECONDS = {"batch_norm_act.cpp": 77.2, "batch_norm_act.cu": 72.9, "group_norm_act.cpp": 72.7,
                     "group_norm_act.cu": 70.3, "bias_act.cu": 69.0, "upsample_conv2d.cu": 68.4, "upfirdn2d.cu": 67.9,
                     "pixel_norm.cu": 65.2, "bias_act.cpp": 37.0, "upfirdn2d.cpp": 19.5, "pixel_norm.cpp": 7.4,
                     "upsample_conv2d.cpp": 6.7, "module.cpp": 0.3}


@dataclass(frozen=True)
class Stage:
    name: str
    budget: int  # seconds on the GPU machine
    what: str


PLAN = (
    Stage("build", 130, "fastgen._C for this GPU's architecture only (16 parallel jobs), fastgen.kernels importable"),
    Stage("verify", 140, "every op / backend / dtype / memory format against float64, riskiest first, a process "
                         "per op, then timed: writes gpu_verified.json (what auto may pick)"),
    Stage("tests", 60, "the CUDA test subset: every kernel variant family (forward dtypes and layouts, backward, "
                       "tiles, padding), riskiest files first"),
    Stage("sweep", 75, "the headline rows: SD-VAE decode upsample convs and GroupNorm+SiLU, DCGAN BatchNorm+ReLU, "
                       "StyleGAN2 modulated conv; bf16, NHWC and NCHW; eager vs compile (default mode) vs fastgen"),
    Stage("models", 45, "whole models: SD-VAE decode at 1024x1024 and StyleGAN2 1024x1024, bf16, converted vs "
                        "eager vs torch.compile"),
)
# while the window has time left after the plan
EXTRAS = (
    Stage("tests_huge", 0, "tensors past 2^31 elements, one at a time"),
    Stage("tests_full", 0, "every other CUDA test"),
    Stage("sweep_full", 0, "every shape of every op's GPU suite"),
)
assert sum(s.budget for s in PLAN) <= WINDOW

# riskiest first: the newest kernels (run nowhere yet), then the rest in verify's order
TEST_FILES = ("tests/test_rms_norm_act.py", "tests/test_upsample_conv3d.py", "tests/test_upsample_conv2d.py",
              "tests/test_group_norm_act.py", "tests/test_norm_backward.py", "tests/test_batch_norm_act.py",
              "tests/test_instance_norm_act.py", "tests/test_modulated_conv2d.py", "tests/test_upfirdn2d.py",
              "tests/test_bias_act.py", "tests/test_pixel_norm.py", "tests/test_hardening.py",
              "tests/test_registry.py")
# the subset: each test family once per backend/dtype/layout, the long activation sweeps left to tests_full
SUBSET = "not activations and not every_activation"
HEADLINE = dict(ops="upsample_conv2d,group_norm_act,batch_norm_act,modulated_conv2d",
                shapes="sdvae-up1,sdvae-up2,sdvae-512x128,sdvae-512x256,dcgan-256x16,sg1024-up-512x64")


def commands(stage: str, dry: bool, out: Path, ops: str | None, seconds: float, full_tests: bool,
             logs: Path) -> list[list[str]]:
    """The command lines of a stage (run in turn; the first that fails ends the stage)."""
    py = sys.executable
    opsarg = ["--ops", ops] if ops else []
    junit = ["--junitxml", str(logs / f"{stage}.xml")]
    if stage == "build":
        if dry:  # the rehearsal uses the install it runs in
            return [[py, "-c", "import fastgen, fastgen.kernels.bias_act; print(fastgen.summary())"]]
        return [["bash", str(ROOT / "tools" / "gpu_build.sh"), str(logs / "build.log")]]
    if stage == "verify":
        return [[py, "-m", "fastgen", "verify", "--device", "cpu" if dry else "cuda", "--out",
                 str(out / "gpu_verified.json"), "--budget", str(max(1, int(seconds) - 5)), *opsarg,
                 *(["--untimed"] if dry else [])]]
    if stage == "tests":
        if dry:
            return [[py, "-m", "pytest", "tests/test_launchers.py", "tests/test_backends.py", "-q", "-p",
                     "no:cacheprovider", *junit]]
        chosen = [] if full_tests else ["-k", SUBSET]
        return [[py, "-m", "pytest", "-m", "cuda", *TEST_FILES, *chosen, "-q", "-p", "no:cacheprovider", "-n", "8",
                 *junit]]
    if stage == "tests_huge":
        return [[py, "-m", "pytest", "-m", "cuda", "tests/test_huge.py", "-q", "-p", "no:cacheprovider", *junit]]
    if stage == "tests_full":
        return [[py, "-m", "pytest", "-m", "cuda", *TEST_FILES, "-k", f"not ({SUBSET})", "-q", "-p",
                 "no:cacheprovider", "-n", "8", *junit]]
    if stage == "sweep":
        if dry:
            return [[py, "-m", "fastgen", "bench", "--device", "cpu", "--passes", "fwd", "--layouts", "nchw",
                     "--compile-mode", "default", "--ops", ops or "pixel_norm", "--out", str(out / "bench_headline.json")]]
        return [[py, "-m", "fastgen", "bench", "--device", "cuda", "--dtype", "bfloat16", "--passes", "fwd",
                 "--layouts", "nhwc,nchw", "--compile-mode", "default", "--ops", ops or HEADLINE["ops"],
                 *([] if ops else ["--shapes", HEADLINE["shapes"]]), "--out", str(out / "bench_headline.json")]]
    if stage == "sweep_full":
        return [[py, "-m", "fastgen", "bench", "--full", "--device", "cuda", "--dtype", "bfloat16", "--passes",
                 "fwd,fwd+bwd", "--compile-mode", "default", *opsarg, "--out", str(out / "bench_full.json")]]
    if stage == "models":
        if dry:
            return [[py, "-m", "fastgen", "bench", "--models", "dcgan-64", "--device", "cpu", "--layouts", "nchw",
                     "--reps", "1", "--out", str(out / "models.json")]]
        names = "sd-vae-decode-1024,stylegan2-1024" if _has("diffusers") else "stylegan2-1024"
        return [[py, "-m", "fastgen", "bench", "--models", names, "--device", "cuda", "--reps", "3",
                 "--out", str(out / "models.json")]]
    raise ValueError(stage)


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def _run(cmd: list[str], log: Path, timeout: float, env: dict) -> int | None:
    """The command's exit status, or None when it ran past `timeout` (its whole process group killed)."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def _test_counts(path: Path) -> dict:
    """tests, failed (failures + errors), cut (skipped by the deadline), skipped (otherwise), from the
    results pytest writes as it goes (FASTGEN_TEST_LOG, tests/conftest.py: one JSON line per report), so
    a stage killed at its budget still counts the failures it saw."""
    state: dict = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:  # the last line, cut by a kill
            continue
        seen = state.setdefault(r["nodeid"], "passed")
        if r["outcome"] == "failed":
            state[r["nodeid"]] = "failed"
        elif r["outcome"] == "skipped" and seen != "failed":
            state[r["nodeid"]] = "cut" if "cut by time" in r.get("message", "") else "skipped"
    outcomes = list(state.values())
    return {"tests": len(outcomes), **{k: outcomes.count(k) for k in ("failed", "cut", "skipped")}}


def _verify_counts(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    sys.path.insert(0, str(ROOT))
    from fastgen.verify import entries
    results = [e["passed"] for _, e in entries(record)]
    return {"entries": len(results), "failed": results.count(False), "not_reached": len(record.get("not_reached", []))}


def run_stage(stage: Stage, dry: bool, out: Path, ops, seconds: float, full_tests: bool, logs: Path) -> dict:
    """Runs one stage within `seconds`: its status and counts."""
    log = logs / f"{stage.name}.log"
    log.write_text("")
    env = dict(os.environ)
    if stage.name.startswith("tests"):  # end in time, with a report, and every result written as it comes
        env["FASTGEN_TEST_DEADLINE"] = str(time.time() + max(1.0, seconds - 15))
        env["FASTGEN_TEST_LOG"] = str(logs / f"{stage.name}.jsonl")
        (logs / f"{stage.name}.jsonl").write_text("")
    if stage.name in ("sweep", "sweep_full", "models") and (out / "gpu_verified.json").exists():
        env["FASTGEN_GPU_RECORD"] = str(out / "gpu_verified.json")  # auto takes what verify just passed
    t0 = time.monotonic()
    status, rc = "passed", 0
    for cmd in commands(stage.name, dry, out, ops, seconds, full_tests, logs):
        rc = _run(cmd, log, seconds - (time.monotonic() - t0), env)
        if rc != 0:
            break
    counts = {}
    if stage.name == "verify":
        counts = _verify_counts(out / "gpu_verified.json")
    elif stage.name.startswith("tests"):
        counts = _test_counts(logs / f"{stage.name}.jsonl")
    if rc is None:  # killed at its budget: FAILED only if it had already seen a failure
        status = "FAILED" if counts.get("failed") else "cut by time"
    elif rc == 3 and stage.name == "verify":
        status = "cut by time"
    elif rc != 0:
        status = "FAILED"
    elif counts.get("cut"):
        status = "cut by time"
    return {"stage": stage.name, "status": status, "seconds": round(time.monotonic() - t0, 1),
            "budget": round(seconds, 1), "exit": rc, "counts": counts, "log": log.name}


def _write_summary(out: Path, summary: dict, logs: Path):
    """summary.json, and every log packed as logs.tar.gz: the device tool brings back at most 8 files from
    $OUT, so the logs travel as one."""
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "summary.json")  # a kill mid-write leaves the previous summary whole
    with tarfile.open(out / "logs.tar.gz.tmp", "w:gz") as tar:
        for f in sorted(logs.iterdir()):
            tar.add(f, arcname=f"gpu-logs/{f.name}")
    (out / "logs.tar.gz.tmp").replace(out / "logs.tar.gz")


def _git_sha() -> str:
    sys.path.insert(0, str(ROOT))
    from fastgen.bench.harness import git_sha
    return git_sha() or "unknown"


def outcome(stages: list[dict]) -> tuple[str, str]:
    """The verdict and its reason: FAILED (a stage failed), NOT VERIFIED (the build did not pass, or
    verify passed no entry: nothing is known about the kernels), INCOMPLETE (stages cut or not reached,
    nothing failed) or PASSED."""
    status = {r["stage"]: r["status"] for r in stages}
    failed = [n for n, st in status.items() if st == "FAILED"]
    if failed:
        return "FAILED", f"failed: {', '.join(failed)}"
    if status.get("build") not in ("passed", "not selected", None):
        return "NOT VERIFIED", f"the build was {status['build']}"
    verified = next((r for r in stages if r["stage"] == "verify"), {})
    if verified.get("status") not in ("not selected", None):
        counts = verified.get("counts") or {}
        if not counts.get("entries", 0) - counts.get("failed", 0):
            return "NOT VERIFIED", f"verify passed no entry ({verified['status']})"
    cut = [r["stage"] for r in stages if r["status"] in ("cut by time", "not reached")]
    return ("INCOMPLETE", f"cut or not reached: {', '.join(cut)}") if cut else ("PASSED", "every stage passed")


def build_projection() -> tuple[dict, list]:
    """CPU seconds per translation unit of the sources in csrc/: measured (BUILD_CPU_SECONDS) or, for a
    unit not measured here, the slowest measured unit of its kind (.cu or .cpp); and the unmeasured ones."""
    sources = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cpp"))
    slowest = {kind: max(v for k, v in BUILD_CPU_SECONDS.items() if k.endswith(kind)) for kind in (".cu", ".cpp")}
    unmeasured = [u for u in sources if u not in BUILD_CPU_SECONDS]
    return {u: BUILD_CPU_SECONDS.get(u, slowest[Path(u).suffix]) for u in sources}, unmeasured


def print_plan(plan, scale: float, dry: bool):
    total = sum(s.budget for s in plan)
    print(f"plan (budgets on the GPU machine; the window is {WINDOW} s, the build included):")
    for s in plan:
        print(f"  {s.name:11s} {s.budget:4d} s  {s.what}")
    print(f"  {'total':11s} {total:4d} s of {WINDOW}; then while time is left: {', '.join(s.name for s in EXTRAS)}")
    print(f"projected device time: machine start {STARTUP[0]}-{STARTUP[1]} s + at most {WINDOW} s = "
          f"{STARTUP[0] + WINDOW}-{STARTUP[1] + WINDOW} s of the session's {DEVICE_BUDGET} s "
          f"(left for a rerun of a stage: {DEVICE_BUDGET - STARTUP[1] - WINDOW} s or more)")
    units, unmeasured = build_projection()
    slowest = max(units, key=units.get)
    print(f"build projection: {len(units)} units in csrc/, {sum(units.values()):.0f} CPU-seconds"
          f"{f' ({len(unmeasured)} not measured here, each taken as the slowest of its kind)' if unmeasured else ''}, "
          f"the slowest {units[slowest]:.0f} s ({slowest}): on 16 cores about that plus the link and pip, "
          f"~{units[slowest] + 25:.0f} s of the build's {PLAN[0].budget} s")
    if dry:
        print(f"dry run: on the CPU, each budget x{scale:g}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--ops", default=None)
    parser.add_argument("--stages", default=None, help="comma-separated: run only these")
    parser.add_argument("--budget", action="append", default=[], help="stage=seconds (a rehearsal of a time-out)")
    parser.add_argument("--scale", type=float, default=None, help="budgets x this (default 3 in a dry run, else 1)")
    parser.add_argument("--full-tests", action="store_true")
    args = parser.parse_args(argv)
    dry = args.dry_run
    scale = args.scale or (3.0 if dry else 1.0)
    out = Path(os.environ.get("OUT") or "/tmp/fastgen-gpu")
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(os.environ.get("FASTGEN_GPU_LOGS") or tempfile.mkdtemp(prefix="fastgen-gpu-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    overrides = dict(b.split("=") for b in args.budget)
    unknown = set(overrides) - {s.name for s in PLAN + EXTRAS}
    if unknown:
        parser.error(f"--budget: no stage named {sorted(unknown)}")
    chosen = set(args.stages.split(",")) if args.stages else None
    print_plan(PLAN, scale, dry)
    start = time.monotonic()
    summary = {"device": "cpu (dry run)" if dry else _device(logs), "git_sha": _git_sha(), "dry_run": dry,
               "window_s": WINDOW * scale, "stages": [], "outcome": "running"}
    _write_summary(out, summary, logs)
    failed_build = False
    for stage in PLAN + (() if dry else EXTRAS):
        left = WINDOW * scale - (time.monotonic() - start)
        if chosen is not None and stage.name not in chosen:
            result = {"stage": stage.name, "status": "not selected"}
        elif failed_build:
            result = {"stage": stage.name, "status": "not reached", "why": "the build did not pass"}
        elif stage in EXTRAS and left < 30:
            result = {"stage": stage.name, "status": "not reached", "why": f"{left:.0f} s left in the window"}
        elif stage in PLAN and left < 5:
            result = {"stage": stage.name, "status": "not reached", "why": "the window closed"}
        else:
            budget = float(overrides.get(stage.name, stage.budget)) * scale if stage in PLAN else left
            if stage.name in overrides and stage in EXTRAS:
                budget = float(overrides[stage.name]) * scale
            budget = min(budget, left)
            print(f"== {stage.name} (at {time.monotonic() - start:.0f} s, budget {budget:.0f} s)", flush=True)
            result = run_stage(stage, dry, out, args.ops, budget, args.full_tests, logs)
            print(f"   {result['status']} in {result['seconds']} s {result['counts'] or ''}", flush=True)
            if result["status"] != "passed":
                tail = (logs / result["log"]).read_text().splitlines()[-6:]
                print("   " + "\n   ".join(tail), flush=True)
            failed_build = stage.name == "build" and result["status"] != "passed"
        summary["stages"].append(result)
        _write_summary(out, summary, logs)
    summary["outcome"], why = outcome(summary["stages"])
    summary["incomplete"] = [r["stage"] for r in summary["stages"] if r["status"] in ("cut by time", "not reached")]
    summary["seconds"] = round(time.monotonic() - start, 1)
    _write_summary(out, summary, logs)
    print(f"\n{'stage':12s} {'status':12s} {'seconds':>8s} {'budget':>8s}  counts")
    for r in summary["stages"]:
        print(f"{r['stage']:12s} {r['status']:12s} {r.get('seconds', ''):>8} {r.get('budget', ''):>8}  {r.get('counts', '')}")
    verdict = f"gpu_check: {summary['outcome']} ({why}) in {summary['seconds']:.0f} s"
    print(verdict, flush=True)  # before the tables: a kill while they print still leaves it
    _print_tables(out)
    print(verdict)
    return EXIT[summary["outcome"]]


EXIT = {"PASSED": 0, "INCOMPLETE": 0, "FAILED": 1, "NOT VERIFIED": 2}


def _device(out: Path) -> str:
    done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv"],
                          capture_output=True, text=True)
    (out / "device.txt").write_text(done.stdout + done.stderr)
    lines = done.stdout.strip().splitlines()
    return lines[-1] if len(lines) > 1 else "unknown GPU"


def _print_tables(out: Path):
    try:
        sys.path.insert(0, str(ROOT))
        from fastgen.bench.report import summary_table
    except Exception as e:  # the table is a convenience; the JSON is the record
        print(f"(no table: {e})")
        return
    for f in sorted(out.glob("bench_*.json")):
        try:
            print(f"{f.name}:\n{summary_table(json.loads(f.read_text())['rows'])}")
        except Exception as e:
            print(f"{f.name}: unreadable ({e})")
    if (out / "models.json").exists():
        from fastgen.bench.models import format_row
        for row in json.loads((out / "models.json").read_text()).get("models", []):
            print(format_row(row))


if __name__ == "__main__":
    sys.exit(main())
