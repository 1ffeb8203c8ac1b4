"""StyleGAN2 on the digits, with its loss as the official training code has it (StyleGAN2-ADA's
loss.StyleGAN2Loss and training_loop): the non-saturating logistic loss; lazy R1 regularization of D
every 16 steps (the gradient of D's output with respect to the real images: a double backward
through bias_act, upfirdn2d and the modulated convolutions); lazy path-length regularization of G
every 4 steps; Adam(0.0025, betas (0, 0.99)) with the lazy-regularization correction of the learning
rate and betas; an exponential moving average of G for the samples; fp16 in the 4 highest
resolutions on CUDA (the official default), float32 on the CPU."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fastgen import xla
from fastgen.models import StyleGAN2Discriminator, StyleGAN2Generator
from fastgen.train.recipe import Recipe

Z_DIM = 64
R1_GAMMA, R1_EVERY = 0.05, 16  # small images, small gamma (the official CIFAR-10 config: 0.01)
PL_WEIGHT, PL_EVERY, PL_DECAY = 2.0, 4, 0.01
EMA_BETA = 0.99


class _WithWs(nn.Module):
    """G's forward returning the images and the dlatents ws, so that the path-length penalty can
    differentiate through the one forward DistributedDataParallel sees. wrap, when given, wraps G's
    mapping and synthesis each (torch_xla's SPMD FSDP: a wrapper around the pair would put both
    outputs behind one backward hook, which cuts ws from the images); G itself stays unwrapped, its
    state dict that of a plain generator."""

    def __init__(self, G: StyleGAN2Generator, wrap=None):
        super().__init__()
        self.G = G
        self.wrapped = nn.ModuleList([wrap(G.mapping), wrap(G.synthesis)]) if wrap else None

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mapping, synthesis = self.wrapped if self.wrapped is not None else (self.G.mapping, self.G.synthesis)
        ws = mapping(z, None)
        return synthesis(ws), ws


def _adam(params, lr: float, every: int) -> torch.optim.Adam:
    ratio = every / (every + 1)  # lazy regularization: the same effective rate over the interval
    return torch.optim.Adam(params, lr=lr * ratio, betas=(0.0, 0.99 ** ratio), eps=1e-8)


class StyleGAN2(Recipe):
    name = "stylegan2"
    defaults = {"steps": 900, "batch": 16}
    losses = ("loss_D", "loss_G", "r1", "pl")

    def build(self, fused: bool):
        if self.mesh is not None and not fused:
            # the reference formulation convolves per sample as one grouped convolution (groups = the
            # batch), which XLA's SPMD partitioner (torch_xla 2.9) cannot split along the batch
            raise NotImplementedError("stylegan2 --unfused does not train under SPMD (--xla-devices > 1): its "
                                      "reference modulated convolution is one grouped convolution over the batch, "
                                      "which XLA's SPMD partitioner cannot shard; train it fused, or on one device")
        # "inference_only": G trains with the per-sample modulation as activation scales around one
        # shared-weight convolution and samples with the grouped one, as the official StyleGAN2
        # training configs do (StyleGAN2-ADA's default, StyleGAN3's --cfg=stylegan2); the grouped
        # form, sharded along the batch, is what XLA's SPMD partitioner cannot split
        G = StyleGAN2Generator(Z_DIM, 0, Z_DIM, 32, 1, mapping_kwargs={"num_layers": 2}, channel_base=1024,
                               channel_max=32, fused=fused, fused_modconv_default="inference_only")
        self.G_ema = copy.deepcopy(G).eval().requires_grad_(False).to(self.device, self.dtype)
        self.G = _WithWs(G.to(self.device, self.dtype), self.module) if self.fsdp else self.module(_WithWs(G))
        self.D = self.module(StyleGAN2Discriminator(0, 32, 1, channel_base=1024, channel_max=32, fused=fused))
        self.opt_G = _adam(self.G.parameters(), 0.0025, PL_EVERY)
        self.opt_D = _adam(self.D.parameters(), 0.0025, R1_EVERY)
        self.pl_mean = torch.zeros((), device=self.device, dtype=self.dtype)
        self.last = {"r1": float("nan"), "pl": float("nan")}

    def step(self, t: int, reals: torch.Tensor, batches) -> dict:
        n = reals.shape[0]
        D_plain = self.plain(self.D)
        # G: the main loss; every PL_EVERY steps the path-length penalty, on half the batch
        self.opt_G.zero_grad(set_to_none=True)
        img, _ = self.G(self.cast(batches.randn(t, 1, Z_DIM)))
        with self.frozen(self.D):
            loss_G = F.softplus(-D_plain(img, None)).mean()
        loss_G.backward()
        if t % PL_EVERY == 0:
            self.last["pl"] = self.path_length(t, batches, n).detach()
        self.opt_G.step()
        # D: generated images, then the real ones (with R1 every R1_EVERY steps)
        self.opt_D.zero_grad(set_to_none=True)
        with torch.no_grad():  # this pass also tracks the mapping's w average, as the official D phase does
            fake = self.plain(self.G).G(self.cast(batches.randn(t, 4, Z_DIM)), None, update_emas=True)
        loss_fake = F.softplus(self.D(fake, None)).mean()
        loss_fake.backward()
        do_r1 = t % R1_EVERY == 0
        real = reals.detach().requires_grad_(do_r1)
        logits = self.D(real, None)
        loss_real = F.softplus(-logits).mean()
        loss = loss_real
        if do_r1:
            r1 = self.r1_penalty(logits, real)
            loss = loss + (r1 * (R1_GAMMA / 2)).mean() * R1_EVERY
            self.last["r1"] = r1.mean().detach()
        loss.backward()
        self.opt_D.step()
        with torch.no_grad():
            for p_ema, p in zip(self.G_ema.parameters(), self.plain(self.G).G.parameters()):
                p_ema.lerp_(p, 1 - EMA_BETA)
            for b_ema, b in zip(self.G_ema.buffers(), self.plain(self.G).G.buffers()):
                b_ema.copy_(b)
        return {"loss_D": (loss_fake + loss_real).detach(), "loss_G": loss_G.detach(), **self.last}

    @staticmethod
    def r1_penalty(logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """|dD(x)/dx|^2 per real image (StyleGAN2Loss's loss_Dr1 before its gamma / 2)."""
        (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
        return grad.square().sum(dim=(1, 2, 3))

    def path_length(self, t: int, batches, n: int) -> torch.Tensor:
        """The path-length penalty (StyleGAN2Loss's Gpl phase), backpropagated into G's gradients."""
        z = self.cast(batches.randn(t, 2, Z_DIM))[: max(n // 2, 1)]
        img, ws = self.G(z)
        noise = self.cast(batches.randn(t, 3, *img.shape[1:]))[: img.shape[0]] / (img.shape[2] * img.shape[3]) ** 0.5
        lengths = self.pl_lengths(img, ws, noise)
        mean = lengths.mean().detach()
        if self.world > 1:
            torch.distributed.all_reduce(mean)
            mean /= self.world
        self.pl_mean = self.pl_mean.lerp(mean, PL_DECAY)
        penalty = (lengths - self.pl_mean).square()
        (penalty * PL_WEIGHT).mean().mul(PL_EVERY).backward()
        return penalty.mean()

    @staticmethod
    def pl_lengths(img: torch.Tensor, ws: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """|J_w^T y| per sample: the norm of the gradient of <img, noise> with respect to ws."""
        (grad,) = torch.autograd.grad((img * noise).sum(), ws, create_graph=True)
        return grad.square().sum(2).mean(1).sqrt()

    @torch.no_grad()
    def samples(self, z: torch.Tensor) -> torch.Tensor:
        # not sharded under SPMD: G_ema (eval) convolves per sample as one grouped convolution
        return self.G_ema(z.to(self.device, self.dtype), None, noise_mode="const").clamp(-1, 1)

    def sample_shape(self) -> tuple:
        return (Z_DIM,)

    def state(self) -> dict:
        return {"G": self.plain(self.G).G, "D": self.plain(self.D), "G_ema": self.G_ema, "opt_G": self.opt_G,
                "opt_D": self.opt_D}

    def extra_state(self) -> dict:
        return {"pl_mean": self.pl_mean, "last": xla.fetch(self.last)}

    def load_extra_state(self, state: dict) -> None:
        self.pl_mean, self.last = state["pl_mean"].to(self.device, self.dtype), dict(state["last"])
