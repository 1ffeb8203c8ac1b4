"""tools/gpu_check.sh rehearsed on the CPU (--dry-run): the plan fits the device tool's window, and the
three outcomes are told apart: a stage past its budget is `cut by time` (exit 0, INCOMPLETE), a 0.1%-off
kernel is FAILED (exit 1), a sticky CUDA-style error or a crash in one op fails that op alone. Faults
are planted through a sitecustomize module that every Python process of the rehearsal imports."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from fastgen import verify
from fastgen.ops import REGISTRY
from fastgen.ops._registry import Impl

ROOT = Path(__file__).resolve().parents[1]

# Planted through a sitecustomize module that every Python process of the rehearsal imports: pixel_norm's
# composite 0.1% off; upsample_conv2d's triton kernel raising a CUDA error, sticky as on a GPU (every
# later call in its process fails too); bias_act's triton kernel killing its process.
FAULTS = '''
import os
if os.environ.get("FASTGEN_TEST_FAULT"):
    import fastgen.ops as ops
    from fastgen.ops._registry import Impl
    poisoned = []

    def patch(op, backend, make):
        spec = ops.REGISTRY[op]
        good = spec.impls[backend]
        spec.impls[backend] = Impl(make(good.run), good.dtypes, good.kernels)

    def sticky(run):
        def faulty(*a):
            poisoned.append(True)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return faulty

    for spec in ops.REGISTRY.values():
        for name in list(spec.impls):
            patch(spec.name, name, lambda run: lambda *a, run=run: (_ for _ in ()).throw(
                RuntimeError("CUDA error: an illegal memory access was encountered (sticky)")) if poisoned else run(*a))
    patch("pixel_norm", "composite", lambda run: lambda *a: run(*a) * 1.001)
    patch("upsample_conv2d", "triton", sticky)
    patch("bias_act", "triton", lambda run: lambda *a: os.abort())
'''


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """One dry run of the whole plan with the faults planted and the tests stage given 1 s (x3): the
    outcomes a real run can have, seen once (a dry run costs about a minute)."""
    tmp = tmp_path_factory.mktemp("gpu")
    out = tmp / "out"
    out.mkdir()
    (tmp / "sitecustomize.py").write_text(FAULTS)
    env = {**os.environ, "OUT": str(out), "FASTGEN_TEST_FAULT": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", "--ops",
                           "upsample_conv2d,bias_act,pixel_norm", "--budget", "tests=1"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    summary = json.loads((out / "summary.json").read_text())
    return done, summary, out


def status(summary, stage):
    return next(r["status"] for r in summary["stages"] if r["stage"] == stage)


def load_plan():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_plan_fits_the_window_newest_kernels_first():
    plan = load_plan()
    assert plan.WINDOW == 450 and sum(s.budget for s in plan.PLAN) <= plan.WINDOW
    assert [s.name for s in plan.PLAN][:3] == ["build", "verify", "tests"]
    assert verify.RISK_ORDER[:2] == ("rms_norm_act", "upsample_conv3d")
    assert plan.TEST_FILES[:2] == ("tests/test_rms_norm_act.py", "tests/test_upsample_conv3d.py")
    assert set(verify.RISK_ORDER) == set(REGISTRY)


def test_the_build_projection_reads_every_source_in_csrc():
    units, unmeasured = load_plan().build_projection()
    sources = {p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cpp")}
    assert set(units) == sources and set(unmeasured) == sources - set(load_plan().BUILD_CPU_SECONDS)
    assert all(units[u] >= 60 for u in unmeasured if u.endswith(".cu"))


def test_the_rehearsal_prints_the_plan_and_the_verdict_before_the_tables(rehearsal):
    done, summary, out = rehearsal
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-2000:]
    assert "total        450 s of 450" in done.stdout and "projected device time" in done.stdout
    assert "build projection: " in done.stdout
    verdict = done.stdout.index("gpu_check: FAILED (failed: verify")
    assert verdict < done.stdout.index("bench_headline.json:")
    assert summary["outcome"] == "FAILED" and status(summary, "build") == "passed"
    # at most 8 files come back from a lent machine: the logs travel packed
    assert {p.name for p in out.iterdir()} <= {"summary.json", "gpu_verified.json", "bench_headline.json",
                                              "bench_headline.png", "bench_full.json", "bench_full.png",
                                              "models.json", "logs.tar.gz"}
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"gpu-logs/verify.log", "gpu-logs/tests.log"} <= set(tar.getnames())


def test_a_kernel_off_by_a_thousandth_fails_and_the_others_pass(rehearsal):
    _, summary, out = rehearsal
    assert status(summary, "verify") == "FAILED"
    record = json.loads((out / "gpu_verified.json").read_text())
    assert record["format"] == 3 and set(record["ops"]) == {"pixel_norm", "upsample_conv2d", "bias_act"}
    pixel = record["ops"]["pixel_norm"]
    assert not pixel["composite"]["float32"]["nchw"]["passed"]
    assert all(e["passed"] for d in pixel["triton"].values() for e in d.values())
    assert len([k for k, _ in verify.entries(record) if k.startswith("pixel_norm/")]) == 12


def test_a_cuda_error_or_a_crash_in_one_op_leaves_the_others_verified(rehearsal):
    _, _, out = rehearsal
    results = dict(verify.entries(json.loads((out / "gpu_verified.json").read_text())))
    assert not results["upsample_conv2d/triton/float32/nchw"]["passed"]
    assert "illegal memory access" in results["upsample_conv2d/triton/float32/nchw"]["problems"][0]
    crashed = results["bias_act/triton/float32/nchw"]
    assert not crashed["passed"] and crashed["problems"][0].startswith("crashed: exit")
    # the entries before the fault stand; the other op, in its own process, is verified
    assert results["upsample_conv2d/composite/float32/nchw"]["passed"]
    assert results["upsample_conv2d/composite/bfloat16/nhwc"]["passed"]


def test_a_stage_past_its_budget_is_cut_by_time(rehearsal):
    _, summary, _ = rehearsal
    assert status(summary, "tests") == "cut by time" and "tests" in summary["incomplete"]


@pytest.mark.parametrize("stages,verdict", [
    ([("build", "passed"), ("verify", "passed", 10), ("tests", "passed")], "PASSED"),
    ([("build", "passed"), ("verify", "passed", 10), ("tests", "cut by time")], "INCOMPLETE"),
    ([("build", "cut by time"), ("verify", "not reached"), ("tests", "not reached")], "NOT VERIFIED"),
    ([("build", "passed"), ("verify", "cut by time", 0), ("tests", "passed")], "NOT VERIFIED"),
    ([("build", "passed"), ("verify", "passed", 10), ("tests", "FAILED")], "FAILED"),
    ([("build", "FAILED"), ("verify", "not reached")], "FAILED"),
    ([("build", "not selected"), ("verify", "not selected"), ("tests", "passed")], "PASSED"),
], ids=["passed", "cut", "build-cut", "nothing-verified", "failed", "build-failed", "tests-alone"])
def test_the_verdict_is_never_passed_when_nothing_was_verified(stages, verdict):
    rows = [{"stage": s[0], "status": s[1], **({"counts": {"entries": s[2], "failed": 0}} if len(s) > 2 else {})}
            for s in stages]
    assert load_plan().outcome(rows)[0] == verdict


def test_test_counts_are_read_as_written_and_survive_a_kill(tmp_path):
    log = tmp_path / "t.jsonl"
    rows = [{"nodeid": "a", "when": "call", "outcome": "passed"},
            {"nodeid": "b", "when": "call", "outcome": "failed"},
            {"nodeid": "b", "when": "teardown", "outcome": "passed"},
            {"nodeid": "c", "when": "setup", "outcome": "skipped", "message": "cut by time (FASTGEN_TEST_DEADLINE)"},
            {"nodeid": "d", "when": "setup", "outcome": "skipped", "message": "no CUDA GPU"}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"nodeid": "e", "wh')  # killed mid-line
    assert load_plan()._test_counts(log) == {"tests": 4, "failed": 1, "cut": 1, "skipped": 1}


def test_verify_catches_a_broken_backend(monkeypatch):
    spec = REGISTRY["pixel_norm"]
    good = spec.impls["composite"].run
    monkeypatch.setitem(spec.impls, "composite", Impl(lambda x, eps: good(x, eps) * 1.001))  # 0.1% off
    record = verify.verify("cpu", ["pixel_norm"], (torch.float32,), log=lambda *a: None, isolate=False)
    assert record["ops"]["pixel_norm"]["composite"]["float32"]["nhwc"]["passed"] is False
    assert verify.failures(record) == ["pixel_norm/composite/float32/nchw", "pixel_norm/composite/float32/nhwc"]
    assert verify.outcome(record) == "FAILED"


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_verify_runs_each_memory_format(layout):
    spec = REGISTRY["group_norm_act"]
    example = verify.TILING["group_norm_act"][1]
    out = verify._outputs(spec, example, "cpu", torch.float32, "composite", layout)
    x_layout = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    assert out[0].is_contiguous(memory_format=x_layout) and out[1].is_contiguous(memory_format=x_layout)


def test_sanitize_rehearsal_runs_memcheck_and_racecheck_stages(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", "--sanitize", "--ops",
                           "pixel_norm"], capture_output=True, text=True, timeout=600, env={**os.environ, "OUT": str(out)},
                          cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "== memcheck" in done.stdout and "== racecheck" in done.stdout
    assert "gpu_check --sanitize: PASSED" in done.stdout
    log = (out / "memcheck.log").read_text()
    assert "pixel_norm               triton" in log and "pixel_norm               composite" in log
