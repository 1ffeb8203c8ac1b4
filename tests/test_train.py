"""python -m fastgen train: fused and unfused trainings agree, StyleGAN2's regularizers agree, two
DistributedDataParallel processes equal one process on the whole batch, a checkpoint resumes exactly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the training data is scikit-learn's digits")

from fastgen.__main__ import main  # noqa: E402
from fastgen.train.data import Batches, digits  # noqa: E402
from fastgen.train.loop import train  # noqa: E402
from fastgen.train.stylegan2 import StyleGAN2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def _params(run) -> dict:
    return {f"{part}.{k}": v for part, sd in run["recipe"].state_dict()["parts"].items() if not part.startswith("opt")
            for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point()}


def _assert_same_run(a, b, rtol, atol):
    for name in a["history"]:
        assert torch.allclose(torch.tensor(a["history"][name]), torch.tensor(b["history"][name]), rtol=rtol, atol=atol,
                              equal_nan=True), name
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.allclose(pa[k], pb[k], rtol=rtol, atol=atol), k


@pytest.mark.parametrize("model", ["dcgan", "stylegan2", "vae"])
def test_fused_and_unfused_trainings_match(model, tmp_path):
    """20 steps from the same seed and weights, in float64: the fused layers' training follows the
    plain torch layers' to float64 precision (losses and every parameter)."""
    runs = [train(model, 20, 8, fused=fused, out=str(tmp_path / str(fused)), dtype=F64, progress=False)
            for fused in (True, False)]
    _assert_same_run(*runs, rtol=1e-7, atol=1e-9)
    assert all(v == v for v in runs[0]["history"][runs[0]["recipe"].losses[0]])


def test_stylegan2_penalties_match_unfused():
    """R1 (through D: a double backward through bias_act, upfirdn2d, the convolutions) and the path
    length (through G's modulated convolutions): values and parameter gradients, fused vs unfused."""
    batches = Batches(digits(), 4, [0], 1, seed=0)
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        recipe = StyleGAN2(fused, torch.device("cpu"), F64)
        real = batches.reals(0).to(F64).requires_grad_(True)
        r1 = recipe.r1_penalty(recipe.D(real, None), real)
        r1.sum().backward()
        torch.manual_seed(1)
        img, ws = recipe.G(batches.randn(0, 2, 64).to(F64))
        lengths = recipe.pl_lengths(img, ws, torch.randn(img.shape, dtype=F64) / 32)
        lengths.sum().backward()
        # a parameter the penalty does not reach has no gradient (None) or a zero one: the same
        grads = {f"{i}.{n}": torch.zeros_like(p) if p.grad is None else p.grad.clone()
                 for i, m in enumerate((recipe.D, recipe.G)) for n, p in m.named_parameters()}
        results.append((r1.detach(), lengths.detach(), grads))
    (r1_f, pl_f, g_f), (r1_u, pl_u, g_u) = results
    assert torch.allclose(r1_f, r1_u, rtol=1e-9) and torch.allclose(pl_f, pl_u, rtol=1e-9)
    assert r1_f.abs().min() > 0 and pl_f.abs().min() > 0
    assert g_f.keys() == g_u.keys() and sum(g.abs().sum() > 0 for g in g_f.values()) > 50
    for name in g_f:
        assert torch.allclose(g_f[name], g_u[name], rtol=1e-8, atol=1e-12), name


@pytest.mark.serial
def test_two_processes_equal_one_on_the_whole_batch(tmp_path):
    """torchrun, 2 processes (gloo), DCGAN with synchronized BatchNormAct2d: after 3 steps the
    parameters equal one process's on the two processes' batches together."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "fastgen",
                           "train", "--model", "dcgan", "--steps", "3", "--batch", "8", "--dtype", "float64",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    one = train("dcgan", 3, 8, out=str(tmp_path / "one"), dtype=F64, ranks=[0, 1], world=2, progress=False)
    for part in ("G", "D"):
        mine = one["recipe"].state_dict()["parts"][part]
        for k, v in state["recipe"]["parts"][part].items():
            if v.is_floating_point():
                assert torch.allclose(v, mine[k], rtol=1e-9, atol=1e-12), f"{part}.{k}"
    assert "BatchNormAct2d" in repr(one["recipe"].G)  # the fused build: BatchNorm + ReLU fused


def test_a_checkpoint_resumes_to_the_same_run(tmp_path):
    whole = train("stylegan2", 6, 4, out=str(tmp_path / "whole"), progress=False)
    train("stylegan2", 3, 4, out=str(tmp_path / "parts"), progress=False)
    resumed = train("stylegan2", 6, 4, out=str(tmp_path / "parts"), resume=True, progress=False)
    _assert_same_run(whole, resumed, rtol=0, atol=0)


def test_the_command_writes_samples_a_loss_plot_and_a_checkpoint(tmp_path, capsys):
    assert main(["train", "--model", "vae", "--steps", "3", "--batch", "4", "--out", str(tmp_path)]) == 0
    for name in ("samples.png", "losses.png", "checkpoint.pt", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert "vae: 3 steps, 1 process(es)" in capsys.readouterr().out
