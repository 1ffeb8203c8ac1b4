"""The training loop behind `python -m fastgen train`: one process, or several under torchrun
(torch.distributed: gloo on the CPU, NCCL on GPUs), or one process on an XLA device or SPMD over a
mesh of them (fastgen/xla.py); a progress bar, and on rank 0 only: a PNG grid of samples, a PNG loss
plot, a checkpoint that resumes exactly (networks, optimizers, the generators' state, the loss
history) and a JSON summary."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from fastgen import xla
from fastgen.dispatch import use_backend
from fastgen.train.data import Batches, digits
from fastgen.train.dcgan import DCGAN
from fastgen.train.stylegan2 import StyleGAN2
from fastgen.train.vae import VAE

RECIPES = {r.name: r for r in (DCGAN, StyleGAN2, VAE)}
GRID = 8  # an 8x8 grid of samples


def distributed() -> tuple[int, int]:
    """(rank, world) of this process; joins the process group when torchrun started several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("FASTGEN_DEVICE") == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)
    return int(os.environ.get("RANK", "0")), world


def train(model: str, steps: int | None = None, batch: int | None = None, backend: str = "auto",
          fused: bool = True, out: str | None = None, resume: bool = False, device: str = "cpu",
          dtype: torch.dtype = torch.float32, seed: int = 0, ranks: list[int] | None = None,
          world: int | None = None, progress: bool = True, xla_devices: int = 1, fsdp: bool = False) -> dict:
    """Train `model` ("dcgan", "stylegan2", "vae") on the digits; returns the run's summary. `batch` is
    per process (per XLA device with xla_devices > 1: SPMD over a mesh of them, the batch sharded,
    the networks replicated or, fsdp, sharded). `ranks`/`world` emulate a distributed run's ranks in
    this one process (tests: the ranks' batches concatenated are the distributed run's whole batch)."""
    recipe_cls = RECIPES[model]
    steps = steps or recipe_cls.defaults["steps"]
    batch = batch or recipe_cls.defaults["batch"]
    rank, real_world = distributed()
    if xla_devices > 1:  # SPMD: one program over the mesh, the whole batch of xla_devices ranks
        ranks, world = list(range(xla_devices)), xla_devices
    ranks, world = (ranks, world) if ranks is not None else ([rank], real_world)
    if device == "cuda":
        dev = torch.device(device, rank % torch.cuda.device_count())
    else:
        dev = xla.device(xla_devices) if device == "xla" else torch.device(device)
    out_dir = Path(out or f"runs/{model}")
    ckpt_path = out_dir / "checkpoint.pt"
    torch.manual_seed(seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    mesh = xla.mesh(xla_devices, "fsdp" if fsdp else "data") if xla_devices > 1 else None
    recipe = recipe_cls(fused, dev, dtype, real_world, mesh, fsdp)
    batches = Batches(digits(), batch, ranks, world, seed)
    history, start = {name: [] for name in recipe.losses}, 0
    torch.manual_seed(seed + 1 + rank)  # the models' own noise (StyleGAN2's noise inputs), per rank
    xla.manual_seed(dev, seed + 1 + rank)  # on XLA drawn by torch_xla's generator, which that does not seed
    if resume:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        recipe.load_state_dict(state["recipe"])
        history, start = state["history"], state["step"]
        torch.set_rng_state(state["rng"])
        if state.get("xla_rng") is not None:
            xla.manual_seed(dev, state["xla_rng"])
    t0 = time.perf_counter()
    bar = _bar(range(start, steps), rank == 0 and progress, f"{model} ({'fused, ' + backend if fused else 'unfused'})")
    step_ms = []
    watch = xla.Watch() if xla.is_xla(dev) else None
    with use_backend(backend):
        for t in bar:
            t1 = time.perf_counter()
            losses = recipe.step(t, recipe.cast(batches.reals(t)), batches)
            xla.end_step(dev)  # on XLA: the step's graph compiled (once per kind of step) and run
            losses = xla.fetch(losses)
            if watch:
                watch.mark()
            step_ms.append((time.perf_counter() - t1) * 1e3)
            for name in recipe.losses:
                history[name].append(losses[name])
            if hasattr(bar, "set_postfix"):
                bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)
    seconds = time.perf_counter() - t0
    summary = {"model": model, "fused": fused, "backend": backend, "steps": steps, "batch_per_process": batch,
               "processes": real_world, "xla_devices": xla_devices if device == "xla" else 0,
               "device": str(dev), "seconds": seconds,
               "median_step_ms": statistics.median(step_ms[1:] or step_ms) if step_ms else None,
               "final": {k: _tail_mean(v) for k, v in history.items()},
               **({"xla": watch.summary()} if watch else {})}
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"recipe": _on_cpu(recipe.state_dict()), "history": history, "step": steps, "rng": torch.get_rng_state(),
                    "xla_rng": xla.rng_state(dev),
                    "config": {"model": model, "batch": batch, "fused": fused, "seed": seed}}, ckpt_path)
        z = torch.randn(GRID * GRID, *recipe.sample_shape(), generator=torch.Generator().manual_seed(seed))
        save_grid(recipe.samples(z), out_dir / "samples.png")
        save_loss_plot(history, out_dir / "losses.png", f"{model} on digits, {real_world} process(es)")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return {**summary, "history": history, "recipe": recipe}


def _on_cpu(state):
    """A checkpoint's tensors on the CPU (XLA tensors do not pickle; any device loads these)."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: _on_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_on_cpu(v) for v in state)
    return state


def _tail_mean(values: list[float], n: int = 20) -> float:
    tail = [v for v in values[-n:] if v == v]  # NaN: a lazy regularizer not yet computed
    return sum(tail) / len(tail) if tail else float("nan")


def _bar(steps, show: bool, desc: str):
    if not show:
        return steps
    from tqdm import tqdm

    return tqdm(steps, desc=desc, unit="step", file=sys.stderr, mininterval=0.5, dynamic_ncols=True)


def save_grid(images: torch.Tensor, path: Path, zoom: int = 3) -> None:
    """images (n, 1, H, W) in [-1, 1] as one square grid, grey on black, 2 pixels apart, each pixel
    drawn zoom x zoom (32x32 digits are small on a screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, _, h, w = images.shape
    side = int(n ** 0.5)
    grid = torch.ones(side * (h + 2), side * (w + 2)) * -1
    for i, img in enumerate(images[: side * side].float().cpu()):
        r, c = divmod(i, side)
        grid[r * (h + 2) + 1: r * (h + 2) + 1 + h, c * (w + 2) + 1: c * (w + 2) + 1 + w] = img[0]
    grid = grid.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1)
    plt.imsave(path, ((grid + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)


def save_loss_plot(history: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in history.items():
        steps = [i for i, v in enumerate(values) if v == v]
        ax.plot(steps, [values[i] for i in steps], label=name, linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
