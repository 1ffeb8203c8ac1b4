"""The training data: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download),
upscaled to 32x32, in [-1, 1]; each process of a distributed run draws its batches from its own shard."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def digits(resolution: int = 32) -> torch.Tensor:
    """All 1,797 digits as a (1797, 1, resolution, resolution) float32 tensor in [-1, 1]."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images).float().unsqueeze(1) / 16.0  # 0..16 -> 0..1
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1


class Batches:
    """Batches of one process: at step t, `per_rank` images drawn with replacement from the shard of
    each of `ranks` (a real process has one rank; a test emulates several in one process by naming
    them all: their draws concatenated are the whole distributed batch), with a generator seeded by
    (seed, t, rank), so that a run is reproducible and resumes exactly."""

    def __init__(self, images: torch.Tensor, per_rank: int, ranks: list[int], world: int, seed: int):
        self.shards = {r: images[r::world] for r in ranks}
        self.per_rank, self.ranks, self.seed = per_rank, ranks, seed

    def _generators(self, t: int, salt: int):
        return [torch.Generator().manual_seed(hash((self.seed, t, r, salt)) % 2 ** 63) for r in self.ranks]

    def reals(self, t: int) -> torch.Tensor:
        out = []
        for r, g in zip(self.ranks, self._generators(t, 0)):
            shard = self.shards[r]
            out.append(shard[torch.randint(len(shard), (self.per_rank,), generator=g)])
        return torch.cat(out)

    def randn(self, t: int, salt: int, *shape: int) -> torch.Tensor:
        """Normal noise of shape (per_rank * len(ranks), *shape), drawn per rank like the images."""
        return torch.cat([torch.randn(self.per_rank, *shape, generator=g) for g in self._generators(t, salt)])
