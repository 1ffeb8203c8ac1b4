"""What a training recipe (fastgen/train/<model>.py) is, and the helpers they share.

A recipe subclasses Recipe and has:
    name, defaults ({"steps": ..., "batch": ...}), losses (the names step() returns, in order)
    build(fused)            makes its networks through self.module(...) and its optimizers
    step(t, reals, batches) one training step on this process's batch; returns {loss name: float};
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

from fastgen.nn import BatchNormAct2d


class Recipe:
    name = ""
    defaults: dict = {}
    losses: tuple = ()

    def __init__(self, fused: bool, device: torch.device, dtype: torch.dtype = torch.float32, world: int = 1):
        self.device, self.dtype, self.world = device, dtype, world
        self.build(fused)

    def module(self, m: nn.Module) -> nn.Module:
        """m on the run's device and dtype; in a distributed run its batch norms synchronized
        (fastgen's BatchNormAct2d(sync=True), nn.SyncBatchNorm for the plain build) and the whole
        wrapped in DistributedDataParallel."""
        m = m.to(self.device, self.dtype)
        if self.world == 1:
            return m
        m = _synchronized(m)
        return DistributedDataParallel(m, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @staticmethod
    def plain(m: nn.Module) -> nn.Module:
        return m.module if isinstance(m, DistributedDataParallel) else m

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype)

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
