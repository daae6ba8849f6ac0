"""Parameter-free shortcuts between the voxels and the latent (``model.shortcut``).

After the residual autoencoding of DC-AE (Chen et al., 2024): a fixed linear code of each f^3 block
of the input joins the posterior mean, and its inverse joins the decoder's output, so the network
learns a residual on top of a code that already reconstructs, instead of first having to learn to
carry the intensities through its bottleneck. At initialisation (zero-init residual branches, a
near-zero moments convolution) the model reconstructs each block by the fixed code. Two codes
(``medvae.models.architecture.SHORTCUTS``):

- ``"dct"`` (the default): latent channel k gets the block's k-th lowest-frequency coefficient of a
  separable orthonormal DCT-II (frequencies ordered by their sum, then their largest component,
  then (kd, kh, kw) lexicographically: the constant, then the linear ramps along W, H and D, ...),
  scaled so that the constant's coefficient is the block mean. The decoder adds the inverse DCT of
  the latent's first min(L, f^3) channels, the other coefficients taken as zero. With L >= 4 the
  code keeps the block's mean and its three gradients: on the demo's held-out T1 (x2, 4 channels),
  that code alone reconstructs at 25.7 dB where the block mean gives 15.9 (benchmarks/RESULTS.md).
  With one latent channel it equals ``"mean"``.
- ``"mean"``: the block mean (averaged over the input channels) on every latent channel; the decoder
  adds the latent's channel mean, nearest-upsampled x f. This was the first built-in shortcut
  (``shortcut: true`` in configs and exports before the codes had names).

Both are linear maps applied by one stride-f convolution (``conv3d`` to encode, ``conv_transpose3d``
to decode) with fixed weights from ``code_weights``; the input is averaged over its channels first,
and every output channel gets the same decoded term. Each coefficient is clamped to
+-``POOLED_LIMIT``: the identity for every normalising intensity preset (values in [0, 1], z-scores;
a coefficient is bounded by the block's RMS), and on raw intensities (HU) a bounded term, so the KL
the shortcut adds at initialisation is at most ``POOLED_LIMIT**2 / 2`` nats per latent element
whatever the input's scale (the learned part of the posterior still starts at the prior).

Both are exact and local (each latent voxel sees one f^3 block), so whole-volume inference
(``medvae.inference``) applies the same two functions to its full input and full output: there is
no tiling here and nothing to drift from the one pass. Slabs along D bound the float32 temporaries.
Everything runs in float32 (float64 in a float64 model) with autocast off, like the moments and the
output convolution the shortcuts add to.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F

from medvae.models.architecture import shortcut_kind

# Bound of each coefficient the posterior mean gets (see the module docstring).
POOLED_LIMIT = 4.0
# Voxels (input or output, over all channels) handled at once along D: bounds the float32 temporaries.
POOL_SLAB_VOXELS = 2**24


def dct_frequencies(factor: int) -> list[tuple[int, int, int]]:
    """The f^3 frequency triples (kd, kh, kw) in the code's order: lowest first."""
    return sorted(itertools.product(range(factor), repeat=3), key=lambda k: (sum(k), max(k), k))


@functools.lru_cache(maxsize=32)
def _weights64(kind: str, factor: int, latent_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    f, n = factor, factor**3
    if kind == "mean":
        analysis = torch.full((latent_channels, 1, f, f, f), 1.0 / n, dtype=torch.float64)
        synthesis = torch.full((latent_channels, 1, f, f, f), 1.0 / latent_channels, dtype=torch.float64)
        return analysis, synthesis
    positions = torch.arange(f, dtype=torch.float64) + 0.5
    axis = torch.stack([torch.cos(math.pi * positions * k / f) for k in range(f)])  # (frequency, position)
    axis = axis / axis.norm(dim=1, keepdim=True)  # orthonormal rows
    basis = torch.zeros(latent_channels, 1, f, f, f, dtype=torch.float64)
    for channel, (kd, kh, kw) in enumerate(dct_frequencies(f)[:latent_channels]):
        basis[channel, 0] = axis[kd][:, None, None] * axis[kh][None, :, None] * axis[kw][None, None, :]
    # Orthonormal basis functions b_k: coefficient <block, b_k> / sqrt(n) (the constant's is the
    # block mean), and the block back as sum_k coefficient_k * sqrt(n) * b_k.
    return basis / math.sqrt(n), basis * math.sqrt(n)


def code_weights(kind: str, factor: int, latent_channels: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(analysis, synthesis) weights, each (L, 1, f, f, f): ``conv3d(x, analysis, stride=f)`` is the
    code of x's blocks, ``conv_transpose3d(code, synthesis, stride=f)`` the blocks it decodes to."""
    return _weights_on(shortcut_kind(kind), factor, latent_channels, dtype, torch.device(device))


@functools.lru_cache(maxsize=64)
def _weights_on(kind: str, factor: int, latent_channels: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per device and dtype: no host-to-device copy in every forward on a GPU.
    analysis, synthesis = _weights64(kind, factor, latent_channels)
    return analysis.to(device=device, dtype=dtype), synthesis.to(device=device, dtype=dtype)


def encoded_input(x: torch.Tensor, kind: str, factor: int, latent_channels: int) -> torch.Tensor:
    """(B, C, D, H, W) voxels -> (B, L, D/f, H/f, W/f) in float32 (float64 for float64 voxels): the
    code of each f^3 block of x's channel mean, each coefficient clamped to +-POOLED_LIMIT."""
    b, c, d, h, w = x.shape
    slab = max(1, POOL_SLAB_VOXELS // max(1, b * c * h * w * factor)) * factor  # D slices per slab
    dtype = torch.promote_types(x.dtype, torch.float32)
    analysis, _ = code_weights(kind, factor, latent_channels, dtype, x.device)
    with torch.autocast(device_type=x.device.type, enabled=False):
        parts = [F.conv3d(x[:, :, i:i + slab].to(dtype).mean(dim=1, keepdim=True), analysis, stride=factor)
                 for i in range(0, d, slab)]
        code = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return code.clamp_(-POOLED_LIMIT, POOLED_LIMIT)


def add_encoded_input(mean: torch.Tensor, x: torch.Tensor, kind: str, factor: int, inplace: bool = False) -> torch.Tensor:
    """The encoder shortcut: ``mean`` (B, L, d, h, w) float32 plus x's block code.
    ``inplace``: add into ``mean`` (a fresh tensor, no gradient)."""
    code = encoded_input(x, kind, factor, mean.shape[1]).to(mean.dtype)
    return mean.add_(code) if inplace else mean + code


def add_decoded_latent(voxels: torch.Tensor, z: torch.Tensor, kind: str, factor: int, inplace: bool = False) -> torch.Tensor:
    """The decoder shortcut: ``voxels`` (B, C, d*f, h*f, w*f) plus the blocks z's code decodes to, on
    every channel.

    ``inplace``: add into ``voxels`` slab by slab along D (no full-size temporary; for whole-volume
    inference, where ``voxels`` is a fresh tensor and no gradient is kept).
    """
    dtype = torch.promote_types(z.dtype, torch.float32)
    _, synthesis = code_weights(kind, factor, z.shape[1], dtype, z.device)
    with torch.autocast(device_type=z.device.type, enabled=False):
        if not inplace:
            return voxels + F.conv_transpose3d(z.to(dtype), synthesis, stride=factor).to(voxels.dtype)
        b, c, d, h, w = voxels.shape
        slab = max(1, POOL_SLAB_VOXELS // max(1, b * c * h * w * factor))  # latent slices per slab
        for i in range(0, z.shape[2], slab):
            part = F.conv_transpose3d(z[:, :, i:i + slab].to(dtype), synthesis, stride=factor)
            voxels[:, :, i * factor:(i + slab) * factor].add_(part.to(voxels.dtype))
        return voxels
