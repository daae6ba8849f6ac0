"""``write_volume``: NIfTI by suffix, or a synthetic DICOM series into a folder; always atomic."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from medvae.io.dicom_write import write_dicom_series
from medvae.io.nifti import is_nifti_path, write_nifti
from medvae.io.volume import Volume, VolumeError


def write_volume(
    volume: Volume | np.ndarray,
    path: str | os.PathLike,
    *,
    affine: np.ndarray | None = None,
    modality: str | None = None,
    format: str | None = None,
    **dicom_options,
) -> Path:
    """Write ``volume`` (a Volume, or an (I, J, K) array with its 4x4 RAS+ ``affine``) and return the path.

    format: "nifti" or "dicom"; by default .nii/.nii.gz is NIfTI and a path without a suffix is a DICOM
    series folder (see ``write_dicom_series`` for ``dicom_options``). ``modality``/``affine`` override
    the Volume's. NaN/Inf voxels are refused. Nothing appears at ``path`` unless the write succeeds.
    """
    path = Path(path)
    if isinstance(volume, Volume):
        changes = {k: v for k, v in (("affine", affine), ("modality", modality)) if v is not None}
        volume = dataclasses.replace(volume, **changes) if changes else volume
    else:
        if affine is None:
            raise ValueError(f"{path}: writing a bare array needs affine= (4x4, voxel -> RAS+ mm)")
        array = np.asarray(volume)
        if array.ndim != 3:
            raise VolumeError(path, f"can only write 3D volumes, got an array of shape {array.shape}")
        volume = Volume(array, affine, modality=modality, units="HU" if modality == "CT" else None)
    if volume.units is None and volume.modality == "CT":
        volume = dataclasses.replace(volume, units="HU")

    format = format or _format_from_path(path)
    if format == "nifti":
        if dicom_options:
            raise ValueError(f"{path}: DICOM options {sorted(dicom_options)} do not apply to NIfTI")
        if not np.isfinite(volume.array).all():
            raise VolumeError(path, "cannot write NaN or Inf voxels")
        return write_nifti(volume, path)
    if format == "dicom":
        return write_dicom_series(volume, path, **dicom_options)
    raise ValueError(f"{path}: unknown format {format!r}; use 'nifti' or 'dicom'")


def _format_from_path(path: Path) -> str:
    if is_nifti_path(path):
        return "nifti"
    if path.is_dir() or not path.suffix:
        return "dicom"
    raise ValueError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; use .nii, .nii.gz or a folder")
