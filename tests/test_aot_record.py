"""The Triton AOT stage compiles again exactly when what it compiles changed (tools/aot_record.py)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("aot_record", ROOT / "tools" / "aot_record.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["aot_record"] = module
    spec.loader.exec_module(module)
    return module


def test_a_passing_run_is_remembered_until_an_input_or_a_version_changes(tmp_path, monkeypatch):
    aot = load()
    tree = tmp_path / "tree"
    (tree / "kernels").mkdir(parents=True)
    (tree / "kernels" / "op.py").write_text("BLOCK = 64\n")
    (tree / "README.md").write_text("not an input\n")
    monkeypatch.setattr(aot, "ROOT", tree)
    record, key = tmp_path / "passed.json", aot.key("3.8.0", "ci", "80,90")
    assert aot.passed_before(key, "2.14.1", record) is None  # nothing recorded
    aot.remember(key, "2.14.1", {"git_sha": "abc"}, record)
    assert aot.passed_before(key, "2.14.1", record)["git_sha"] == "abc"
    assert aot.passed_before(aot.key("3.6.0", "quick", "90"), "2.14.1", record) is None  # another run
    assert aot.passed_before(key, "2.15.0", record) is None  # another torch
    (tree / "README.md").write_text("changed, still not an input\n")
    assert aot.passed_before(key, "2.14.1", record)
    (tree / "kernels" / "op.py").write_text("BLOCK = 128\n")
    assert aot.passed_before(key, "2.14.1", record) is None  # a kernel changed: compile again


def test_the_committed_record_names_its_runs():
    aot = load()
    assert aot.key("3.8.0", "ci", "80,90") == "triton 3.8.0 ci sm_80,sm_90"
    assert {"kernels/*.py", "csrc/*", "tools/triton_aot.py"} <= set(aot.INPUTS)


def test_the_huge_tests_record_reads_its_own_inputs(tmp_path, monkeypatch):
    aot = load()
    tree = tmp_path / "tree"
    (tree / "tests").mkdir(parents=True)
    (tree / "kernels").mkdir()
    (tree / "tests" / "test_huge.py").write_text("S = 16385\n")
    (tree / "kernels" / "op.py").write_text("BLOCK = 64\n")
    monkeypatch.setattr(aot, "ROOT", tree)
    record = tmp_path / "huge.json"
    aot.remember(aot.HUGE_KEY, "2.14.1", {}, record, aot.HUGE_INPUTS)
    assert aot.passed_before(aot.HUGE_KEY, "2.14.1", record, aot.HUGE_INPUTS)
    (tree / "kernels" / "op.py").write_text("BLOCK = 128\n")  # a Triton kernel: not what the CPU cases run
    assert aot.passed_before(aot.HUGE_KEY, "2.14.1", record, aot.HUGE_INPUTS)
    (tree / "tests" / "test_huge.py").write_text("S = 16387\n")
    assert aot.passed_before(aot.HUGE_KEY, "2.14.1", record, aot.HUGE_INPUTS) is None
