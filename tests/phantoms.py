"""Tiny synthetic volumes written as real NIfTI files, for tests of shapes, geometry and numerics."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def phantom(shape=(20, 20, 20), seed=0, scale=1000.0, offset=0.0) -> np.ndarray:
    """Two nested ellipsoids plus noise, float32, values roughly in [offset, offset + scale]."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    radii = rng.uniform(0.5, 0.9, size=3)
    r2 = sum((g / r) ** 2 for g, r in zip(grids, radii))
    vol = (r2 < 1) * 0.6 + (r2 < 0.35) * 0.3 + 0.05 * rng.random(shape)
    return (offset + scale * vol).astype(np.float32)


def write_phantoms(folder: Path, count: int = 4, shape=(20, 20, 20), spacing=2.0, **kwargs) -> list[Path]:
    """``count`` phantom volumes as ``folder/vol_XX.nii.gz`` with an RAS affine of ``spacing`` mm."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    paths = []
    for i in range(count):
        path = folder / f"vol_{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(phantom(shape, seed=i, **kwargs), affine), path)
        paths.append(path)
    return paths
