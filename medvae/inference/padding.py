"""Pad a volume up to the next multiple of the model's downsampling factor, and undo it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, factor: int) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the last three axes (D, H, W) of ``x`` at their END, by edge replication, to multiples of ``factor``.

    Args:
        x: (..., D, H, W), e.g. (B, C, D, H, W); any float dtype.
        factor: the model's downsampling factor (``model.downsampling_factor``).
    Returns:
        (padded, crop): ``padded[crop]`` is ``x`` again, and ``decoded[crop]`` cuts a decoded volume
        back to the input's size. Padding is at most ``factor - 1`` voxels per axis and only at the
        far end, so voxel (0, 0, 0) and the affine stay put. Edge replication (not zeros, not
        reflection) keeps intensity statistics near the border and works for any size.
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if x.ndim < 3:
        raise ValueError(f"expected a tensor (..., D, H, W), got shape {tuple(x.shape)}")
    spatial = x.shape[-3:]
    extra = [-n % factor for n in spatial]
    crop = (Ellipsis, *(slice(0, n) for n in spatial))
    if not any(extra):
        return x, crop
    lead = x.shape[:-3]
    flat = x.reshape(-1, 1, *spatial)  # replicate padding wants (N, C, D, H, W)
    padded = F.pad(flat, [0, extra[2], 0, extra[1], 0, extra[0]], mode="replicate")
    return padded.reshape(*lead, *padded.shape[-3:]), crop
