"""The latent cache: a datalist encoded once into posterior means, the training data of a latent prior.

    latents = encode_items(loaded, items)               # LatentSet, one volume in memory at a time
    save_latents(latents, run_dir / "latents_train.safetensors")
    latents = load_latents(path, model_hash=loaded.hash)  # refuses latents of another VAE

Each volume goes through the VAE's own infer pipeline and the memory-bounded whole-volume encoder
(``medvae.inference.encode_volume``); only its posterior mean (C, d, h, w) is kept. Volumes of
different sizes give latent grids of different sizes: every grid is **centre-cropped or edge-padded**
to one common shape (by default the per-axis median of the grids, as the fitted prior does), so the
prior describes whole scans of the median preprocessed size, centred.

Scaling: the prior works on ``(z - shift) * scale``, with ``shift`` the per-channel mean and
``scale`` one over the std of the centred training latents: one std over all channels, as latent
diffusion's scale factor (``latents.scaling=global``, the default), or each channel's own
(``channel``: a VAE with the DCT shortcut has a first channel holding the block mean and others
holding gradients several times smaller). Both are stored with the prior.

Each volume also carries its conditions: its modality (from the datalist) and its native voxel
spacing (mean of the three voxel sides of the file, mm), for a conditional prior.

Saved as one safetensors file: ``latents`` (N, C, d, h, w) float32, with JSON metadata holding the
ids, conditions, latent shapes before cropping, and the provenance (the VAE's weights hash and the
preprocessing). Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvae.prior.gaussian import common_latent_shape, crop_or_pad

LATENTS_FORMAT = "medvae-latents"
SHAPE_POLICY = ("centre-crop or edge-pad every latent grid to the common shape (default: per-axis median, "
                "rounded up to what the UNet divides)")


@dataclass
class LatentSet:
    """Posterior means of N volumes on one grid, with what they came from.

    latents: (N, C, d, h, w) float32. ids: N volume ids. conditions: N dicts (``modality``: "CT" or
    "MR", ``spacing``: native mean voxel side in mm). provenance: ``model_hash``,
    ``preprocessing``, ``shape_policy``, ``original_latent_shapes``.
    """

    latents: torch.Tensor
    ids: list[str]
    conditions: list[dict[str, Any]]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.latents.shape[1:])

    def scaling(self, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift (C,), scale (C,)): per-channel mean, and 1 / std of the centred latents, one std over
        all channels (latent diffusion's scale factor) or, ``per_channel``, each channel's own."""
        shift = self.latents.mean(dim=(0, 2, 3, 4))
        centred = self.latents - shift[None, :, None, None, None]
        channels = centred.shape[1]
        if centred[:, 0].numel() < 2:
            return shift, torch.ones(channels)
        std = centred.transpose(0, 1).reshape(channels, -1).std(dim=1) if per_channel else centred.std().expand(channels)
        return shift, 1.0 / std.clamp_min(1e-8)


def native_spacing_mm(image) -> float:
    """Mean voxel side (mm) of the file a prepared MetaTensor came from (its ``original_affine``)."""
    affine = image.meta.get("original_affine") if hasattr(image, "meta") else None
    if affine is None:
        affine = getattr(image, "affine", None)
    if affine is None:
        return float("nan")
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    return float(np.linalg.norm(matrix, axis=0).mean())


def encode_items(loaded, items: list[dict[str, Any]], latent_shape: tuple[int, ...] | None = None,
                 multiple: int = 1) -> LatentSet:
    """Encode datalist items with a ``medvae.jobs.loading.LoadedModel`` into a LatentSet.

    One volume at a time through the memory-bounded encoder; only the (C, d, h, w) means are kept.
    ``latent_shape`` (C, d, h, w): the common grid; None takes the per-axis median of these grids,
    rounded up to a ``multiple`` (what a UNet with that total downsampling needs; the extra is padding).
    A file that cannot be read raises its one-line ValueError (nothing is zero-filled).
    """
    if not items:
        raise ValueError("no volumes to encode for the latent prior")
    means, conditions, shapes = [], [], []
    with torch.no_grad():
        for item in items:
            image = loaded.prepare(item)
            mean = loaded.encode(image).mode()[0].float().cpu()
            means.append(mean)
            shapes.append([int(s) for s in mean.shape])
            conditions.append({"modality": str(item.get("modality") or loaded.modality),
                               "spacing": native_spacing_mm(image)})
    if latent_shape is None:
        channels, *spatial = common_latent_shape(shapes)
        latent_shape = (channels, *(-(-size // multiple) * multiple for size in spatial))
    shape = tuple(int(s) for s in latent_shape)
    stacked = torch.stack([crop_or_pad(mean, shape) for mean in means])
    provenance = {"model_hash": loaded.hash, "preprocessing": loaded.preprocessing, "shape_policy": SHAPE_POLICY,
                  "latent_shape": list(shape), "original_latent_shapes": shapes,
                  "kind": "posterior means of whole volumes"}
    return LatentSet(stacked, [str(item["id"]) for item in items], conditions, provenance)


def latent_grid_line(latents: LatentSet) -> str:
    """One line for the user: how many latents, the common grid, and how each volume's grid got there."""
    shape = tuple(latents.latent_shape)
    originals = [tuple(s[1:]) for s in latents.provenance.get("original_latent_shapes", [])]
    cropped = sum(any(o > t for o, t in zip(orig, shape[1:])) for orig in originals)
    padded = sum(any(o < t for o, t in zip(orig, shape[1:])) for orig in originals)
    grid = " x ".join(str(s) for s in shape)
    return (f"medvae train-prior: {len(latents.ids)} training latents on a {grid} grid (channels x d x h x w); "
            f"centre-cropped along some axis: {cropped}, edge-padded along some axis: {padded}")


def save_latents(latents: LatentSet, path: str | os.PathLike) -> Path:
    """Write a LatentSet as one safetensors file (atomic); JSON metadata holds everything but the tensor."""
    from safetensors.torch import save_file

    from medvae.atomic import atomic_file

    metadata = {"format": LATENTS_FORMAT, "ids": json.dumps(latents.ids), "conditions": json.dumps(latents.conditions),
                "provenance": json.dumps(latents.provenance)}
    path = Path(path)
    with atomic_file(path) as tmp:
        save_file({"latents": latents.latents.contiguous()}, str(tmp), metadata=metadata)
    return path


def load_latents(path: str | os.PathLike, model_hash: str | None = None) -> LatentSet:
    """Read a LatentSet; with ``model_hash``, refuse latents encoded by other VAE weights (ValueError)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != LATENTS_FORMAT:
                raise ValueError("not a medvae latent cache")
            latents = handle.get_tensor("latents")
        result = LatentSet(latents, json.loads(metadata["ids"]), json.loads(metadata["conditions"]),
                           json.loads(metadata["provenance"]))
    except (OSError, KeyError, ValueError, RuntimeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable latent cache ({' '.join(str(err).split())})") from None
    if model_hash is not None and result.provenance.get("model_hash") != model_hash:
        raise ValueError(f"{path}: these latents were encoded by another VAE (weights hash "
                         f"{str(result.provenance.get('model_hash'))[:12]}..., expected {model_hash[:12]}...)")
    return result
