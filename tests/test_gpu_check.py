"""tools/gpu_check.sh rehearsed on the CPU (--dry-run): the plan fits the device tool's window, and the
three outcomes are told apart: a stage past its budget is `cut by time` (exit 0, INCOMPLETE), a 0.1%-off
kernel is FAILED (exit 1), a sticky CUDA-style error or a crash in one op fails that op alone. Faults
are planted through a sitecustomize module that every Python process of the rehearsal imports."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgen import verify
from fastgen.ops import REGISTRY
from fastgen.ops._registry import Impl

ROOT = Path(__file__).resolve().parents[1]

FAULTS = '''
import os, time
fault = os.environ.get("FASTGEN_TEST_FAULT")
if fault:
    import fastgen.ops as ops
    from fastgen.ops._registry import Impl
    poisoned = []

    def patch(op, backend, make):
        spec = ops.REGISTRY[op]
        good = spec.impls[backend]
        spec.impls[backend] = Impl(make(good.run), good.dtypes, good.kernels)

    if fault == "off":  # pixel_norm's composite 0.1% off
        patch("pixel_norm", "composite", lambda run: lambda *a: run(*a) * 1.001)
    if fault == "slow":  # pixel_norm's composite hangs
        patch("pixel_norm", "composite", lambda run: lambda *a: (time.sleep(600), run(*a))[1])
    if fault == "crash":
        # upsample_conv2d's triton kernel "faults": a CUDA error is sticky, every later call in the
        # process fails too; bias_act's triton kernel kills its process
        def sticky(run):
            def faulty(*a):
                poisoned.append(True)
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return faulty
        for spec in ops.REGISTRY.values():
            for name in list(spec.impls):
                patch(spec.name, name, lambda run: lambda *a, run=run: (_ for _ in ()).throw(
                    RuntimeError("CUDA error: an illegal memory access was encountered (sticky)"))
                    if poisoned else run(*a))
        patch("upsample_conv2d", "triton", sticky)
        patch("bias_act", "triton", lambda run: lambda *a: os.abort())
'''


def gpu_check(tmp_path, *args, fault=None):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = {**os.environ, "OUT": str(out)}
    if fault:
        (tmp_path / "sitecustomize.py").write_text(FAULTS)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["FASTGEN_TEST_FAULT"] = fault
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", *args], capture_output=True,
                          text=True, timeout=900, env=env, cwd=ROOT)
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


def test_the_plan_fits_the_window_riskiest_first():
    plan = load_plan()
    assert sum(s.budget for s in plan.PLAN) <= 480
    assert [s.name for s in plan.PLAN][:3] == ["build", "verify", "tests"]
    assert verify.RISK_ORDER[:5] == ("upsample_conv2d", "upsample_conv3d", "group_norm_act", "rms_norm_act",
                                    "batch_norm_act")
    assert set(verify.RISK_ORDER) == set(REGISTRY)


def test_dry_run_passes_prints_the_plan_and_writes_the_record(tmp_path):
    done, summary, out = gpu_check(tmp_path, "--ops", "pixel_norm,upsample_conv2d")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "total        480 s of 480" in done.stdout and "projected device time" in done.stdout
    assert "gpu_check: PASSED (PASSED)" in done.stdout and "INCOMPLETE" not in done.stdout
    assert [r["status"] for r in summary["stages"]] == ["passed"] * 5
    record = json.loads((out / "gpu_verified.json").read_text())
    assert record["format"] == 2 and set(record["ops"]) == {"pixel_norm", "upsample_conv2d"}
    keys = [k for k, _ in verify.entries(record)]
    assert "upsample_conv2d/triton/bfloat16/nhwc" in keys and "pixel_norm/composite/float32/nchw" in keys
    assert all(e["passed"] for _, e in verify.entries(record))
    assert (out / "bench_headline.json").exists() and (out / "models.json").exists()


def test_a_time_out_is_cut_by_time_and_exits_0(tmp_path):
    done, summary, _ = gpu_check(tmp_path, "--stages", "verify", "--ops", "pixel_norm", "--budget", "verify=5",
                                 fault="slow")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert status(summary, "verify") == "cut by time" and summary["outcome"] == "INCOMPLETE"
    assert "INCOMPLETE: verify" in done.stdout and "FAILED" not in done.stdout
    assert status(summary, "tests") == "not selected"


def test_a_kernel_off_by_a_thousandth_fails_the_gate(tmp_path):
    done, summary, out = gpu_check(tmp_path, "--stages", "verify", "--ops", "pixel_norm", fault="off")
    assert done.returncode == 1 and "gpu_check: FAILED" in done.stdout
    assert status(summary, "verify") == "FAILED"
    record = json.loads((out / "gpu_verified.json").read_text())
    assert not record["ops"]["pixel_norm"]["composite"]["float32"]["nchw"]["passed"]
    assert record["ops"]["pixel_norm"]["triton"]["float32"]["nchw"]["passed"]


def test_a_cuda_error_or_a_crash_in_one_op_leaves_the_others_verified(tmp_path):
    done, summary, out = gpu_check(tmp_path, "--stages", "verify", "--ops", "upsample_conv2d,bias_act,pixel_norm",
                                   fault="crash")
    assert done.returncode == 1 and status(summary, "verify") == "FAILED", done.stdout[-3000:]
    record = json.loads((out / "gpu_verified.json").read_text())
    results = dict(verify.entries(record))
    assert not results["upsample_conv2d/triton/float32/nchw"]["passed"]
    assert "illegal memory access" in results["upsample_conv2d/triton/float32/nchw"]["problems"][0]
    crashed = results["bias_act/triton/float32/nchw"]
    assert not crashed["passed"] and crashed["problems"][0].startswith("crashed: exit")
    # the entries before the fault stand; the other op, in its own process, is verified
    assert results["upsample_conv2d/composite/float32/nchw"]["passed"]
    assert all(e["passed"] for k, e in results.items() if k.startswith("pixel_norm/"))
    assert len([k for k in results if k.startswith("pixel_norm/")]) == 12


def test_junit_counts_tell_a_deadline_from_a_failure(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite><testcase name="a"/><testcase name="b"><failure message="x"/></testcase>'
                   '<testcase name="c"><skipped message="cut by time (FASTGEN_TEST_DEADLINE)"/></testcase>'
                   '<testcase name="d"><skipped message="needs a GPU"/></testcase></testsuite></testsuites>')
    assert load_plan()._junit_counts(xml) == {"tests": 4, "failed": 1, "cut": 1, "skipped": 1}


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
