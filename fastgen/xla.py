"""fastgen on torch_xla (a TPU; torch_xla's CPU client in CI): the step boundary, a data-parallel mesh
of several XLA devices (SPMD), and the metrics that the tests and the training command read: the ops
that fell back to the CPU, the graphs compiled and their compile time.

torch_xla records a program lazily and compiles it when a step ends (torch_xla.sync()); a loop that
never ends its step grows one graph forever, and one that reads a value mid-step (.item()) cuts it
in two and compiles both. The training loop therefore reads its losses once, after the boundary.
"""

from __future__ import annotations

import torch


def is_xla(device) -> bool:
    return torch.device(device).type == "xla"


def device(spmd_devices: int = 1) -> torch.device:
    """The XLA device; with spmd_devices > 1 first SPMD over that many (torch_xla's single-program
    view: one device that stands for the mesh; it must be chosen before any XLA tensor exists)."""
    import torch_xla
    import torch_xla.runtime as xr

    if spmd_devices > 1:
        xr.use_spmd()
        if xr.global_runtime_device_count() < spmd_devices:
            raise ValueError(f"--xla-devices {spmd_devices}: torch_xla sees {xr.global_runtime_device_count()} "
                             "device(s) (on the CPU client set CPU_NUM_DEVICES)")
    return torch_xla.device()


def mesh(n: int, axis: str = "data"):
    """A 1-D mesh of the first n XLA devices; the batch is sharded along its one axis (torch_xla's
    SPMD FSDP shards the parameters along an axis it requires to be named "fsdp")."""
    import numpy as np
    import torch_xla.distributed.spmd as xs

    return xs.Mesh(np.arange(n), (n,), (axis,))


def shard_batch(t: torch.Tensor, data_mesh) -> torch.Tensor:
    """t sharded along its first (batch) dimension over the mesh, replicated along the others."""
    import torch_xla.distributed.spmd as xs

    xs.mark_sharding(t, data_mesh, (data_mesh.axis_names[0],) + (None,) * (t.dim() - 1))
    return t


def manual_seed(device, seed: int) -> None:
    """Seed torch_xla's random generator (what draws random tensors made on the device: StyleGAN2's
    noise inputs); torch.manual_seed does not reach it. Nothing off XLA."""
    if is_xla(device):
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(seed, str(device))


def rng_state(device) -> int | None:
    """torch_xla's random generator's state (an int: it advances with each draw), for a checkpoint;
    None off XLA."""
    if not is_xla(device):
        return None
    import torch_xla.core.xla_model as xm

    return xm.get_rng_state(str(device))


def end_step(device) -> None:
    """Compile (once per distinct graph) and run what this step recorded; nothing off XLA."""
    if is_xla(device):
        import torch_xla

        torch_xla.sync()


def fetch(values: dict) -> dict:
    """{name: float} of a step's losses (tensors or floats) with one device-to-host transfer: not
    .item() per value (torch_xla counts that as a CPU fallback, aten::_local_scalar_dense)."""
    names = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in values.items() if k not in names}
    if names:
        host = torch.stack([values[k].detach().float().reshape(()) for k in names]).cpu()
        out.update({k: float(v) for k, v in zip(names, host.tolist())})
    return {k: out[k] for k in values}


def fallbacks() -> dict[str, int]:
    """{op: times} that torch_xla ran on the CPU so far in this process (none is the goal)."""
    import torch_xla.debug.metrics as met

    return {op: int(met.counter_value(op) or 0) for op in met.executed_fallback_ops()}


def compiled() -> tuple[int, float]:
    """(graphs compiled, seconds spent compiling them) so far in this process."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return (0, 0.0) if data is None else (int(data[0]), data[1] / 1e9)


class Watch:
    """What torch_xla did between start and each mark(): graphs compiled (after each mark), compile
    seconds, and the ops that fell back to the CPU."""

    def __init__(self):
        self.graphs0, self.seconds0 = compiled()
        self.fallbacks0 = fallbacks()
        self.graphs_after: list[int] = []

    def mark(self) -> None:
        self.graphs_after.append(compiled()[0] - self.graphs0)

    def summary(self) -> dict:
        graphs, seconds = compiled()
        new = {op: n - self.fallbacks0.get(op, 0) for op, n in fallbacks().items()}
        return {"graphs_compiled": graphs - self.graphs0, "compile_seconds": round(seconds - self.seconds0, 3),
                "graphs_after_step": self.graphs_after, "fallbacks": {op: n for op, n in new.items() if n > 0}}
