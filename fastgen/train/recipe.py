"""What a training recipe (fastgen/train/<model>.py) is, and the helpers they share.

A recipe subclasses Recipe and has:
    name, defaults ({"steps": ..., "batch": ...}), losses (the names step() returns, in order)
    build(fused)            makes its networks through self.module(...) and its optimizers
    step(t, reals, batches) one training step on this process's batch; returns {loss name: a detached
                            scalar tensor or float} (the loop reads them after the step ends: no
                            .item() mid-step, which would cut an XLA step's graph in two);
                            every random draw comes from batches.randn(t, salt, ...) (reproducible,
                            sharded like the data) or, inside the models, the global generator
    samples(z)              images in [-1, 1] from latents of shape (n, *sample_shape())
    state()                 {name: module or optimizer} to checkpoint; extra_state() / load_extra_state()
                            for anything else (StyleGAN2's path-length mean)
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastgen import xla
from fastgen.nn import BatchNormAct2d


class Recipe:
    name = ""
    defaults: dict = {}
    losses: tuple = ()

    def __init__(self, fused: bool, device: torch.device, dtype: torch.dtype = torch.float32, world: int = 1,
                 mesh=None, fsdp: bool = False):
        self.device, self.dtype, self.world, self.mesh, self.fsdp = device, dtype, world, mesh, fsdp
        self.build(fused)

    def module(self, m: nn.Module) -> nn.Module:
        """m on the run's device and dtype; in a distributed run its batch norms synchronized
        (fastgen's BatchNormAct2d(sync=True), nn.SyncBatchNorm for the plain build) and the whole
        wrapped in DistributedDataParallel. Under SPMD (a mesh of XLA devices) the program is the
        whole batch's: batch statistics are already global; the parameters are replicated, or with
        fsdp sharded by torch_xla's SPMD FSDP."""
        m = m.to(self.device, self.dtype)
        if self.mesh is not None:
            return _spmd_fsdp(m, self.mesh) if self.fsdp else m
        if self.world == 1:
            return m
        m = _synchronized(m)
        return DistributedDataParallel(m, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @staticmethod
    def plain(m: nn.Module) -> nn.Module:
        return m.module if isinstance(m, DistributedDataParallel) or type(m).__name__ == "SpmdFullyShardedDataParallel" else m

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        """A batch (images, noise) on the run's device; under SPMD sharded along the batch."""
        t = t.to(self.device, self.dtype)
        return t if self.mesh is None else xla.shard_batch(t, self.mesh)

    @staticmethod
    @contextlib.contextmanager
    def frozen(m: nn.Module):
        """m's parameters need no gradient inside (a network used, not trained, in this phase)."""
        flags = [(p, p.requires_grad) for p in m.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {"parts": {k: v.state_dict() for k, v in self.state().items()}, "extra": self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in self.state().items():
            v.load_state_dict(state["parts"][k])
        self.load_extra_state(state["extra"])


def _spmd_fsdp(m: nn.Module, mesh) -> nn.Module:
    from torch_xla.experimental.spmd_fully_sharded_data_parallel import SpmdFullyShardedDataParallel

    def shard_output(out, mesh):  # every batched output along the batch (FSDP's default: the first one,
        # scalars too: the VAE's loss module returns two)
        for t in out if isinstance(out, tuple) else (out,):
            if t.dim() > 0:
                xla.shard_batch(t, mesh)

    return SpmdFullyShardedDataParallel(m, mesh=mesh, shard_output=shard_output)


def _synchronized(m: nn.Module) -> nn.Module:
    """Batch norms that compute their statistics over the whole process group."""
    for layer in m.modules():
        if isinstance(layer, BatchNormAct2d):
            layer.sync = True
    for name, child in m.named_children():
        if type(child) is nn.BatchNorm2d:  # exactly: BatchNormAct2d is a BatchNorm2d too, and is already synced
            setattr(m, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        else:
            _synchronized(child)
    return m
