"""`python -m fastgen bench --device xla` (fastgen/bench/xla.py), quick: the figures it reads from
torch_xla and from the HLO, for an op and a model, fused and unfused side by side."""

import json

import torch

from fastgen import xla
from fastgen.__main__ import main
from fastgen.bench import xla as bench_xla


def test_hlo_figures_count_instructions_and_the_largest_intermediate():
    x = torch.randn(2, 3).to(xla.device())
    y = (x * 2).repeat(4, 1)  # f32[8,3]: 96 bytes, the largest intermediate (x, a parameter, is not one)
    figures = bench_xla.hlo_figures([y])
    assert figures["hlo_ops"] >= 2 and figures["largest_mib"] == round(96 / 2 ** 20, 3)


def test_op_rows_side_by_side_and_the_upsampled_tensor_the_composite_never_makes():
    (row,) = bench_xla.op_rows(["upsample_conv2d"], full=False, passes=["fwd"], reps=1)
    unfused, fused = row["providers"]["unfused"], row["providers"]["fused"]
    assert fused["fallbacks"] == {} and fused["graphs"] >= 1 and fused["recompiled"] == 0
    assert row["max_abs_diff"] < 1e-3
    # nn.Upsample + Conv2d makes the 2x upsampled input (4x the elements); the composite does not
    assert fused["largest_mib"] < unfused["largest_mib"]


def test_the_command_writes_the_record(tmp_path):
    out = tmp_path / "models-xla.json"
    assert main(["bench", "--device", "xla", "--models", "dcgan-g", "--passes", "fwd", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert "not TPU times" in record["caveat"] and record["environment"]["torch_xla"]
    (row,) = record["rows"]
    assert row["model"] == "dcgan-g" and set(row["providers"]) == {"unfused", "fused"}
    assert row["max_abs_diff"] < 1e-3 and row["providers"]["fused"]["fallbacks"] == {}
