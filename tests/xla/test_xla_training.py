"""`python -m fastgen train --device xla`: the recipes on one XLA device follow the CPU run with the
same seeds, compile one graph per kind of step (not per step) and run nothing on the CPU; with
--xla-devices 4 (SPMD: the batch sharded over 4 XLA CPU devices, one process) and --fsdp (torch_xla's
SPMD FSDP: the parameters sharded too) the parameters equal a one-device run on the whole batch.

Run by tools/test_xla.sh in the XLA environment (torch_xla on the CPU); README's TPU section."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastgen import xla
from fastgen.train.loop import train

DEVICE = xla.device()


def assert_losses_close(got: dict, want: dict, tol: float, atol: float | None = None, label: str = "",
                        equal_nan: bool = False) -> None:
    """Every loss history of want (a run's "history") in got's, step by step (equal_nan: StyleGAN2's
    lazy regularizers are NaN until first computed)."""
    for name, values in want.items():
        torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(values), rtol=tol,
                                   atol=tol if atol is None else atol, equal_nan=equal_nan,
                                   msg=lambda m: f"{label}{name}: {m}")


def assert_networks_close(got: dict, want: dict, rtol: float, atol: float) -> None:
    """A checkpoint's networks (its "parts", optimizers left out) against a recipe's state: the same
    keys, every floating tensor within the tolerance."""
    for net, state in want.items():
        if net.startswith("opt"):
            continue
        assert got[net].keys() == state.keys(), net
        for key, value in state.items():
            if value.is_floating_point():
                torch.testing.assert_close(got[net][key], value.cpu(), rtol=rtol, atol=atol, msg=lambda m: f"{net}.{key}: {m}")


# (model, dtype, tolerance of the losses over 20 steps). float64: XLA's run is the CPU's (bit for bit
# here). float32: XLA:CPU's float32 rounding differs from eager's by more than eager's own (DCGAN's
# losses 1e-5 apart at step 3, 2e-2 at step 18, where eager float32 vs float64 stays under 4e-4;
# the same run in float64 is exact), and a GAN's 20 Adam steps amplify it; the VAE stays within 2e-3.
# (XLA:CPU's float64 is slow: 8 steps there.)
FOLLOWS = [("dcgan", torch.float64, 8, 1e-9), ("dcgan", torch.float32, 20, 5e-2), ("vae", torch.float32, 20, 2e-3)]


@pytest.mark.parametrize("model,dtype,steps,tol", FOLLOWS, ids=["dcgan-float64", "dcgan-float32", "vae-float32"])
def test_training_on_xla_follows_the_cpu_run(model, dtype, steps, tol, tmp_path):
    cpu = train(model, steps, 4, out=tmp_path / "cpu", device="cpu", dtype=dtype, progress=False)
    run = train(model, steps, 4, out=tmp_path / "xla", device="xla", dtype=dtype, progress=False)
    assert_losses_close(run["history"], cpu["history"], tol, label=f"{model} ")
    report = run["xla"]
    assert report["fallbacks"] == {}
    # the first step's graph, the second's (the optimizer's state exists from then on), then no more
    graphs = report["graphs_after_step"]
    assert graphs[2] == graphs[-1], f"graphs compiled after each step: {graphs}"
    summary = json.loads((tmp_path / "xla" / "summary.json").read_text())
    assert summary["xla"]["graphs_compiled"] == graphs[-1]
    assert (tmp_path / "xla" / "samples.png").stat().st_size > 0


def test_stylegan2_follows_the_cpu_run_and_compiles_a_graph_per_kind_of_step(tmp_path):
    """20 steps in float32. Lazy regularization: R1 every 16 steps, the path-length penalty every 4;
    a new graph for each kind of step only: 0 (both, no optimizer state yet), 1 (neither), 4 (path
    length), 16 (both, with the optimizer state); none for steps 2-3, 5-15, 17-19. The losses follow
    the CPU run within 5e-2: float32 as DCGAN's, and G's noise inputs, drawn inside the model, come
    from XLA's random generator there (the same seed, other numbers) and enter as the noise
    strengths grow from 0 (measured: the first loss equal, 4e-4 at step 1, 6e-2 at step 19): the first
    5 steps against the CPU, the graph counts over all 20."""
    run = train("stylegan2", 20, 4, out=tmp_path / "xla", device="xla", progress=False)
    cpu = train("stylegan2", 5, 4, out=tmp_path / "cpu", device="cpu", progress=False)  # the first 5 steps
    graphs = run["xla"]["graphs_after_step"]
    assert run["xla"]["fallbacks"] == {}
    assert graphs[0] < graphs[1] < graphs[4] < graphs[16], f"graphs after each step: {graphs}"
    assert graphs[1] == graphs[3] and graphs[4] == graphs[15] and graphs[16] == graphs[19], f"graphs: {graphs}"
    assert_losses_close({k: v[:5] for k, v in run["history"].items()}, cpu["history"], 5e-2, equal_nan=True)
    assert run["history"]["loss_G"][0] == pytest.approx(cpu["history"]["loss_G"][0], rel=1e-5)  # no noise yet


def test_stylegan2_resumes_on_xla_to_the_uninterrupted_run(tmp_path):
    """A checkpoint keeps torch_xla's generator's state: after a resume G draws the noise the
    uninterrupted run drew (restored from the seed instead, the losses were 1e-3 apart at step 3)."""
    whole = train("stylegan2", 4, 4, out=tmp_path / "whole", device="xla", progress=False)
    train("stylegan2", 2, 4, out=tmp_path / "parts", device="xla", progress=False)
    resumed = train("stylegan2", 4, 4, out=tmp_path / "parts", device="xla", resume=True, progress=False)
    assert_losses_close(resumed["history"], whole["history"], 1e-6, atol=1e-7, equal_nan=True)


def _spmd_run(tmp_path, model, steps, fsdp, dtype="float64"):
    """`python -m fastgen train ... --device xla --xla-devices 4` in its own process (SPMD must be chosen
    before the process's first XLA tensor; this one has them), 2 images per device."""
    out = tmp_path / ("fsdp" if fsdp else "spmd")
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"}
    cmd = [sys.executable, "-m", "fastgen", "train", "--model", model, "--device", "xla", "--xla-devices", "4",
           "--steps", str(steps), "--batch", "2", "--dtype", dtype, "--out", str(out)] + (["--fsdp"] if fsdp else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("model,steps,fsdp", [("dcgan", 3, False), ("dcgan", 3, True)], ids=["dcgan-spmd", "dcgan-fsdp"])
def test_four_xla_devices_equal_one_device_on_the_whole_batch(model, steps, fsdp, tmp_path):
    """Batch statistics included: DCGAN's BatchNormAct2d sees the global batch under SPMD (the running
    statistics are compared too), as sync=True makes it under DDP. (FSDP over the VAE, float64 on four
    XLA:CPU devices, took a minute of the test command: FSDP is DCGAN's here and StyleGAN2's below.)"""
    out = _spmd_run(tmp_path, model, steps, fsdp)
    one = train(model, steps, 2, out=tmp_path / "one", device="cpu", dtype=torch.float64, ranks=[0, 1, 2, 3], world=4,
                progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["xla_devices"] == 4 and summary["xla"]["fallbacks"] == {}
    spmd = torch.load(out / "checkpoint.pt", weights_only=False)["recipe"]["parts"]
    # 1e-9: float64 through a few Adam steps (which amplify rounding)
    assert_networks_close(spmd, one["recipe"].state_dict()["parts"], rtol=1e-9, atol=1e-9)
    assert one["final"] == pytest.approx(summary["final"], rel=1e-9)


def test_stylegan2_under_fsdp_on_four_xla_devices_equals_one_device_on_the_whole_batch(tmp_path):
    """SPMD FSDP only: the batch sharded as plain SPMD shards it (DCGAN's case above runs plain SPMD
    through the same training loop), the parameters sharded too. Steps 0-4: R1 + path length, plain,
    path length with the optimizer state. Against one XLA device, not the CPU: G's noise comes from XLA's random generator, the same numbers on one device
    and under SPMD with the same seed (the losses agree to 1.2e-7, measured), and in float32:
    XLA:CPU had not finished one float64 StyleGAN2 step on 4 devices in 17 minutes (8 GB). The
    parameters within 1e-3 (float32 rounding moved them by up to 4e-5, measured; Adam's steps are
    +-2e-3 here wherever a gradient is not tiny, so a wrong batch or a wrong reduction moves many
    parameters by up to twice that), the losses within 1e-5."""
    out = _spmd_run(tmp_path, "stylegan2", 5, True, dtype="float32")
    one = train("stylegan2", 5, 2, out=tmp_path / "one", device="xla", ranks=[0, 1, 2, 3], world=4, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["xla_devices"] == 4 and summary["xla"]["fallbacks"] == {}
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert_losses_close(checkpoint["history"], one["history"], 1e-5, atol=1e-7, equal_nan=True)
    # the same keys too: G's checkpoint is a plain generator's, FSDP or not
    assert_networks_close(checkpoint["recipe"]["parts"], one["recipe"].state_dict()["parts"], rtol=0, atol=1e-3)


def test_stylegan2_unfused_under_spmd_is_refused_with_the_reason():
    from fastgen.train.stylegan2 import StyleGAN2

    with pytest.raises(NotImplementedError, match="partitioner"):
        StyleGAN2(False, torch.device("cpu"), mesh=object())
