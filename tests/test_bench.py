"""python -m fastgen bench: the suites, the correctness gate, the table, the chart; and `auto` checked
against the committed CPU measurements (benchmarks/results/bench-cpu*.json: the full float32 sweep
and the quick float32, bfloat16 and float16 runs)."""

import json
from pathlib import Path

import pytest
import torch

from fastgen.__main__ import main
from fastgen.bench import SUITES, Shape, make_inputs, providers
from fastgen.bench.harness import FASTGEN_BACKENDS, peak_mib
from fastgen.dispatch import auto_choices
from fastgen.ops import REGISTRY
from fastgen.ops._registry import Impl

ROOT = Path(__file__).resolve().parents[1]
CPU_RESULTS = ROOT / "benchmarks" / "results" / "bench-cpu.json"


def bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    code = main(["bench", "--ops", "pixel_norm", "--layouts", "nchw", "--out", str(out), *args])
    return code, json.loads(out.read_text())


def test_the_quick_run_writes_rows_a_table_and_a_chart(tmp_path, capsys):
    code, record = bench(tmp_path)
    assert code == 0
    assert [(r["op"], r["shape"]["name"], r["pass"]) for r in record["rows"]] == [
        ("pixel_norm", "c512-32x32", "fwd"), ("pixel_norm", "c512-32x32", "fwd+bwd")]
    for r in record["rows"]:
        p = r["providers"]
        assert {"eager", "compile", "auto", "composite"} <= set(p) and r["passed"]
        assert p["auto"]["backend"] in REGISTRY["pixel_norm"].backends
        assert all(q["ms"] > 0 and q["peak_mib"] >= 0 and 0 < q["of_peak"] for q in p.values())
    assert set(record["rows"][1]["providers"]["composite"]["grad_err"]) == {"x"}  # fwd+bwd checks gradients
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "verdict" in table and "PASS" in table and "FAIL" not in table


def test_a_wrong_backend_fails_the_run_and_earns_no_speedup(tmp_path, monkeypatch, capsys):
    spec = REGISTRY["pixel_norm"]
    good = spec.impls["composite"].run
    monkeypatch.setitem(spec.impls, "composite", Impl(lambda x, eps: good(x, eps) * 1.001))  # 0.1% off
    code, record = bench(tmp_path, "--passes", "fwd")
    assert code == 1
    bad = record["rows"][0]["providers"]["composite"]
    assert bad["passed"] is False and "speedup_vs_eager" not in bad and bad["problems"]
    assert record["rows"][0]["best"] is None
    assert "FAIL: composite" in capsys.readouterr().out  # auto runs the reference for pixel_norm on the CPU


def test_every_backend_that_can_run_is_timed():
    for suite in SUITES.values():
        spec = REGISTRY[suite.op]
        for device, shapes in (("cpu", suite.cpu_shapes), ("cuda", suite.gpu_shapes)):
            runs_here = {"composite"} | ({"cuda", "triton"} if device == "cuda" else {"cpu"})
            for shape in shapes:
                worth = suite.backends(shape) if hasattr(suite, "backends") else None
                names = set(providers(suite, device, shape))
                assert {"eager", "compile", "auto"} <= names
                from fastgen.dispatch import backends
                want = {b for b in spec.impls if b in runs_here and backends()[b].available}
                assert names >= (want if worth is None else want & set(worth)), (suite.op, device, shape.name)


def test_peak_memory_counts_what_is_held_at_once():
    x = torch.randn(1024, 1024)  # 4 MiB

    def step():
        y = x * 2
        z = y + 1  # y and z held together: 8 MiB
        del y
        return z.sum()

    assert 7.9 < peak_mib(step, "cpu") < 8.5


def _rows(paths):
    return [dict(r, file=p.name) for p in sorted(paths) for r in json.loads(p.read_text())["rows"]]


@pytest.mark.parametrize("row", _rows(CPU_RESULTS.parent.glob("bench-cpu*.json")),
                         ids=lambda r: f"{r['file']}-{r['op']}-{r['shape']['name']}-{r['layout']}-{r['pass']}")
def test_auto_takes_the_fastest_backend_measured(row):
    """For every committed CPU row: the backend auto takes today for that op, shape, layout and pass
    is the fastest fastgen backend of the row, or within 10% of it."""
    suite = SUITES[row["op"]]
    shape = Shape(**{**row["shape"], "padding": tuple(row["shape"]["padding"])})
    inputs = make_inputs(suite, shape, getattr(torch, row["dtype"]), "cpu", row["channels_last"], row["pass"] != "fwd")
    with auto_choices() as picked:  # with the row's inputs, requires_grad included
        suite.fused(None)(*inputs, shape)
    choice = next(b for op, b in picked if op == row["op"])
    timed = {n: p["ms"] for n, p in row["providers"].items() if n in FASTGEN_BACKENDS and p.get("passed")}
    timed["reference"] = row["providers"]["eager"]["ms"]  # the reference backend runs the eager layers
    if row["providers"]["auto"].get("backend") == choice:
        timed.setdefault(choice, row["providers"]["auto"]["ms"])
    assert choice in timed, f"auto takes {choice}, which this row did not time"
    fastest = min(ms for n, ms in timed.items() if n != "reference")
    assert timed[choice] <= 1.1 * fastest, (
        f"auto takes {choice} ({timed[choice]:.3f} ms); the fastest measured: "
        f"{min(timed, key=timed.get)} ({fastest:.3f} ms): {timed}")


def test_the_committed_cpu_results_cover_every_suite_and_pass():
    rows = _rows([CPU_RESULTS])
    assert {(r["op"], r["shape"]["name"]) for r in rows} == {(s.op, shape.name) for s in SUITES.values()
                                                             for shape in s.cpu_shapes}
    assert {r["layout"] for r in rows} == {"nchw", "nhwc"} and {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r["passed"] for r in _rows(CPU_RESULTS.parent.glob("bench-cpu*.json"))), "a committed row failed"
