"""Real anatomy for benchmarks: crops of the MNI ICBM152 2009a T1 template at 1 mm (nilearn, offline).

Crops are taken at seeded positions inside the head, so a benchmark can hold some out. No real 3D CT
ships inside a PyPI package, so "HU-scale" input is the same real T1 mapped linearly onto -1024..2000
(the value range CT arrives in), which is what matters for the stability of an unnormalised run.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def mni_t1() -> np.ndarray:
    """The 1 mm template (197, 233, 189), float32, scaled to [0, 1] by its 0.5/99.5 percentiles.

    Read through nilearn, or from the NIfTI file named by $MEDVAE_MNI_T1 (a copy of the same
    template, for machines without nilearn).
    """
    import os

    if os.environ.get("MEDVAE_MNI_T1"):
        image = nib.load(os.environ["MEDVAE_MNI_T1"])
    else:
        from nilearn.datasets import load_mni152_template

        image = load_mni152_template(resolution=1)
    volume = np.asarray(image.get_fdata(), dtype=np.float32)
    low, high = np.percentile(volume, [0.5, 99.5])
    return np.clip((volume - low) / (high - low), 0, 1).astype(np.float32)


def mni_crops(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` crops of ``size``^3 voxels whose centres lie inside the head (mean intensity > 0.2)."""
    volume = mni_t1()
    rng = np.random.default_rng(seed)
    crops: list[np.ndarray] = []
    while len(crops) < count:
        corner = [int(rng.integers(0, s - size + 1)) for s in volume.shape]
        crop = volume[tuple(slice(c, c + size) for c in corner)]
        if crop.mean() > 0.2:
            crops.append(np.ascontiguousarray(crop))
    return crops


def to_hounsfield_scale(crop: np.ndarray) -> np.ndarray:
    """Map [0, 1] linearly onto -1024..2000: CT-like magnitudes on real anatomy."""
    return (crop * 3024.0 - 1024.0).astype(np.float32)


def write_nifti_folder(crops: list[np.ndarray], folder: Path, prefix: str = "crop") -> Path:
    """Write crops as 1 mm RAS NIfTI files ``<prefix>_XX.nii.gz`` (for runs that read from disk)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, crop in enumerate(crops):
        nib.save(nib.Nifti1Image(crop, np.eye(4)), folder / f"{prefix}_{i:02d}.nii.gz")
    return folder
