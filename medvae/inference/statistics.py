"""GroupNorm statistics of a whole volume, accumulated tile by tile.

Each tile gives, per (batch, channel), its mean and centred sum of squares (two float32 passes:
a sum, then the squares of the deviations from that mean); channels are combined into groups and
tiles into the whole volume in float64 with Chan's parallel formula, which stays exact where a
plain sum of squares would cancel. The result matches GroupNorm's statistics over the volume.
"""

from __future__ import annotations

import torch


class GroupStatistics:
    """Running mean and variance per (batch, group) over tiles of a (B, C, D, H, W) tensor."""

    def __init__(self, num_groups: int, eps: float):
        self.num_groups = num_groups
        self.eps = eps
        self.count = 0
        self.mean: torch.Tensor | None = None  # (B, groups) float64
        self.m2: torch.Tensor | None = None  # (B, groups) float64: sum of squared deviations
        self.device = torch.device("cpu")
        self.dtype = torch.float32  # of the result: float64 only for float64 tiles

    def add(self, tile: torch.Tensor) -> None:
        """Fold in one tile (B, C, d, h, w); tiles must not overlap and must cover the volume."""
        self.device = tile.device
        self.dtype = torch.float64 if tile.dtype == torch.float64 else torch.float32
        x = tile.to(self.dtype)
        b, c = x.shape[:2]
        voxels = x[0, 0].numel()
        # Per channel (fast reductions over the spatial axes in either memory format).
        channel_mean = x.sum(dim=(2, 3, 4)) / voxels
        channel_m2 = torch.sub(x, channel_mean.view(b, c, 1, 1, 1)).square_().sum(dim=(2, 3, 4))
        # Channels -> groups, in float64 on the CPU (not every accelerator has float64).
        channel_mean = channel_mean.cpu().double().view(b, self.num_groups, -1)
        channel_m2 = channel_m2.cpu().double().view(b, self.num_groups, -1)
        mean = channel_mean.mean(-1)
        m2 = channel_m2.sum(-1) + voxels * (channel_mean - mean[..., None]).square().sum(-1)
        self._merge(voxels * channel_mean.shape[-1], mean, m2)

    def _merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1 / sqrt(var + eps)), each (B, groups) float32 (float64 for float64 tiles), var the
        biased (population) one."""
        if self.mean is None:
            raise RuntimeError("no tiles were added")
        var = self.m2 / self.count
        rstd = torch.rsqrt(var + self.eps)
        return self.mean.to(self.device, self.dtype), rstd.to(self.device, self.dtype)
