"""GroupNorm statistics of a whole volume, accumulated tile by tile.

Each tile gives, per (batch, channel), its mean and centred sum of squares with the reduction the
model's own forward uses (``medvae.models.kernels.channel_moments``); channels are combined into
groups (``kernels.merge_groups``) and tiles into the whole volume in float64 with Chan's parallel
formula, which stays exact where a plain sum of squares would cancel.
"""

from __future__ import annotations

import torch

from medvae.models.kernels import channel_moments, merge_groups, rstd_of, statistics_dtype


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
        self.dtype = statistics_dtype(tile)
        channel_mean, channel_m2 = channel_moments(tile)
        self._merge(*merge_groups(channel_mean, channel_m2, tile[0, 0].numel(), self.num_groups))

    def _merge(self, mean: torch.Tensor, m2: torch.Tensor, n: int) -> None:
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
        rstd = rstd_of(self.m2, self.count, self.eps)
        return self.mean.to(self.device, self.dtype), rstd.to(self.device, self.dtype)
