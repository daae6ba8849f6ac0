"""GroupNorm statistics of a whole volume, accumulated tile by tile.

Each tile gives per-(batch, group) count, mean and centred sum of squares (``torch.var_mean`` in
float32); tiles are merged in float64 with Chan's parallel formula, which stays exact where the
naive sum-of-squares would cancel. The result equals GroupNorm's own statistics over the volume.
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

    def add(self, tile: torch.Tensor) -> None:
        """Fold in one tile (B, C, d, h, w); tiles must not overlap and must cover the volume."""
        self.device = tile.device
        grouped = tile.float().unflatten(1, (self.num_groups, -1))
        var, mean = torch.var_mean(grouped, dim=(2, 3, 4, 5), correction=0)
        n = grouped[0, 0].numel()
        # Merge on the CPU in float64 (not every accelerator has float64); the tensors are (B, groups).
        mean, m2 = mean.cpu().double(), var.cpu().double() * n
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1 / sqrt(var + eps)), each (B, groups) float32, var the biased (population) one."""
        if self.mean is None:
            raise RuntimeError("no tiles were added")
        var = self.m2 / self.count
        return self.mean.float().to(self.device), torch.rsqrt(var + self.eps).float().to(self.device)
