"""``read_volume``: one entry point for NIfTI files and DICOM series, with the value checks every reader shares."""

from __future__ import annotations

import os
from pathlib import Path

from medvae.io.dicom_read import read_dicom
from medvae.io.nifti import is_nifti_path, read_nifti
from medvae.io.volume import Volume, VolumeError, check_values


def read_volume(
    path: str | os.PathLike,
    *,
    series: str | None = None,
    frame: int | None = None,
    nonfinite: str = "reject",
    allow_constant: bool = False,
) -> Volume:
    """Read a 3D volume as float32 (I, J, K) with its RAS+ affine (mm), in real units (HU for CT).

    path: a .nii/.nii.gz file; a DICOM file (single slice or enhanced multi-frame); a folder of DICOM
    files (searched recursively); or a DICOMDIR. series: the SeriesInstanceUID (or unique
    SeriesDescription) to read when there are several. frame: the time point of a 4D image.
    nonfinite: "reject" (default) raises on NaN/Inf voxels; "repair" sets NaN and -Inf to the smallest
    finite value and +Inf to the largest (the count is in ``metadata["nonfinite_repaired"]``).
    allow_constant: a constant volume cannot be normalised, so it is refused unless this is true.
    Every problem with the input raises VolumeError, one line naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(path, "no such file or folder")
    if path.is_file() and is_nifti_path(path):
        if series is not None:
            raise VolumeError(path, f"series={series!r} only applies to DICOM; this is a NIfTI file")
        volume = read_nifti(path, frame)
    else:
        volume = read_dicom(path, series, frame)
    volume.metadata.update(check_values(volume.array, str(path), nonfinite=nonfinite, allow_constant=allow_constant))
    return volume
