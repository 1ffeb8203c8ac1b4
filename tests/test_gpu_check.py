"""tools/gpu_check.sh rehearsed on the CPU (--dry-run): the same stages as on the GPU, a record
written, and the gate closing on a failing stage. fastgen verify catches a broken backend."""

import json
import os
import subprocess
from pathlib import Path

import torch

from fastgen import verify
from fastgen.ops import REGISTRY
from fastgen.ops._registry import Impl

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(tmp_path, *args):
    env = {**os.environ, "OUT": str(tmp_path)}
    return subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", *args], capture_output=True,
                          text=True, timeout=600, env=env, cwd=ROOT)


def test_dry_run_passes_and_writes_the_record(tmp_path):
    done = gpu_check(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "gpu_check: PASSED" in done.stdout
    record = json.loads((tmp_path / "gpu_verified.json").read_text())
    assert set(record["ops"]) == set(REGISTRY)
    assert all(e["passed"] for bs in record["ops"].values() for ds in bs.values() for e in ds.values())
    assert (tmp_path / "bench_ops.json").exists()


def test_the_gate_fails_when_a_stage_fails(tmp_path):
    done = gpu_check(tmp_path, "--ops", "no_such_op")
    assert done.returncode != 0 and "gpu_check: FAILED" in done.stdout
    assert "verify FAILED" in done.stdout and "sweep_ops FAILED" in done.stdout


def test_verify_catches_a_broken_backend(monkeypatch):
    spec = REGISTRY["pixel_norm"]
    good = spec.impls["composite"].run
    monkeypatch.setitem(spec.impls, "composite", Impl(lambda x, eps: good(x, eps) * 1.001))  # 0.1% off
    record = verify.verify("cpu", ["pixel_norm"], (torch.float32,), log=lambda *a: None)
    assert record["ops"]["pixel_norm"]["composite"]["float32"]["passed"] is False
    assert verify.failures(record) == ["pixel_norm/composite/float32"]


def test_sanitize_rehearsal_runs_memcheck_and_racecheck_stages(tmp_path):
    done = gpu_check(tmp_path, "--sanitize", "--ops", "pixel_norm")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "== memcheck" in done.stdout and "== racecheck" in done.stdout
    assert "gpu_check --sanitize: PASSED" in done.stdout
    log = (tmp_path / "memcheck.log").read_text()
    assert "pixel_norm               triton" in log and "pixel_norm               composite" in log
