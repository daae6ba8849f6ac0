"""Parameter-free shortcuts between the voxels and the latent (``model.shortcut``).

After the residual autoencoding of DC-AE (Chen et al., 2024), simplified to a block average:

- encode: the posterior mean gets ``avg_pool3d(x, f)``, averaged over the input channels, added to
  every latent channel. The encoder then learns a residual on top of a x f block average instead
  of first having to learn to carry the intensities through its bottleneck;
- decode: the output gets the latent's channel mean, nearest-upsampled x f, added to every output
  channel. At initialisation (zero-init residual branches, a near-zero moments convolution) the
  model reconstructs each f^3 block by its mean.

The block average is clamped to +-``POOLED_LIMIT``: the identity for every normalising intensity
preset (values in [0, 1], z-scores), and on raw intensities (HU) a bounded term, so the KL the
shortcut adds at initialisation is at most ``POOLED_LIMIT**2 / 2`` nats per latent element whatever
the input's scale (the learned part of the posterior still starts at the prior).

Both are exact and local (each latent voxel sees one f^3 block), so whole-volume inference
(``medvae.inference``) applies the same two functions to its full input and full output: there
is no tiling here and nothing to drift from the one pass. Everything runs in float32 (float64 in a
float64 model) with autocast off, like the moments and the output convolution the shortcuts add to.

The measurements that made this the default are in benchmarks/RESULTS.md ("The latent shortcut").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Bound of the block average the posterior mean gets (see the module docstring).
POOLED_LIMIT = 4.0
# Input slabs pooled at once along D: bounds the float32 copy of a bf16/fp16 input.
POOL_SLAB_VOXELS = 2**24


def pooled_input(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, D, H, W) voxels -> (B, 1, D/f, H/f, W/f) in float32 (float64 for float64 voxels): each
    f^3 block's mean over all channels."""
    b, c, d, h, w = x.shape
    slab = max(1, POOL_SLAB_VOXELS // max(1, b * c * h * w * factor)) * factor  # D slices per slab
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        parts = [F.avg_pool3d(x[:, :, i:i + slab].to(dtype), factor) for i in range(0, d, slab)]
        return torch.cat(parts, dim=2).mean(dim=1, keepdim=True)


def add_pooled_input(mean: torch.Tensor, x: torch.Tensor, factor: int, inplace: bool = False) -> torch.Tensor:
    """The encoder shortcut: ``mean`` (B, L, d, h, w) float32 plus x's block average, clamped to
    +-POOLED_LIMIT, on every channel. ``inplace``: add into ``mean`` (a fresh tensor, no gradient)."""
    pooled = pooled_input(x, factor).clamp_(-POOLED_LIMIT, POOLED_LIMIT).to(mean.dtype)
    return mean.add_(pooled) if inplace else mean + pooled


def add_upsampled_latent(voxels: torch.Tensor, z: torch.Tensor, factor: int, inplace: bool = False) -> torch.Tensor:
    """The decoder shortcut: ``voxels`` (B, C, d*f, h*f, w*f) plus z's channel mean, nearest-upsampled x f.

    ``inplace``: add into ``voxels`` through a broadcast view (no full-size upsampled tensor; for
    whole-volume inference, where ``voxels`` is a fresh tensor and no gradient is kept).
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        m = z.to(torch.promote_types(z.dtype, torch.float32)).mean(dim=1, keepdim=True).to(voxels.dtype)  # (B, 1, d, h, w)
        if not inplace:
            return voxels + F.interpolate(m, scale_factor=factor, mode="nearest")
        b, _, d, h, w = m.shape
        blocks = voxels.unflatten(2, (d, factor)).unflatten(4, (h, factor)).unflatten(6, (w, factor))
        blocks.add_(m.reshape(b, 1, d, 1, h, 1, w, 1))
        return voxels
