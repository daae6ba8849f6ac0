"""The in-memory volume: voxels, their place in the world, and what they measure.

Conventions (those of nibabel): ``array[i, j, k]`` with, for DICOM, i = column, j = row, k = slice;
``affine`` maps voxel (i, j, k) to world millimetres in RAS+ (DICOM's LPS has x and y flipped).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np


class VolumeError(ValueError):
    """A volume that cannot be read or written; ``str(err)`` is one line: ``"<path>: <problem>"``."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever the cause said
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self):  # keep pickling (pytest-xdist, multiprocessing) working with two arguments
        return (type(self), (self.path, self.problem))


@dataclass
class Volume:
    """A 3D scalar volume with its geometry.

    array: (I, J, K) float32 voxels. affine: (4, 4) float64, voxel -> RAS+ mm. modality: "CT", "MR"
    (a DICOM Modality code) or None. units: "HU" for CT after rescale, else None. source: the path read.
    metadata: reader details (series_uid, series_description, rescale, frame, original_dtype, ...).
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str | None = None
    units: str | None = None
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array, dtype=np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3D (I, J, K), got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume affine must be 4x4, got shape {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (lengths of the affine's columns)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Axis codes of i, j, k in RAS+ terms, e.g. ``"RAS"`` or ``"LPS"``."""
        return "".join(nib.aff2axcodes(self.affine))


def check_values(array: np.ndarray, path: str, *, nonfinite: str, allow_constant: bool) -> dict[str, Any]:
    """Reject (or repair, in place) NaN/Inf voxels and reject a constant volume; return what was done.

    ``nonfinite="reject"`` raises; ``"repair"`` sets NaN and -Inf to the smallest finite value and
    +Inf to the largest. A constant volume cannot be intensity-normalised, so it is refused unless
    ``allow_constant``.
    """
    if nonfinite not in ("reject", "repair"):
        raise ValueError(f"nonfinite must be 'reject' or 'repair', got {nonfinite!r}")
    done: dict[str, Any] = {}
    low, high = array.min(), array.max()  # NaN or Inf anywhere shows up here, without a mask
    if not (np.isfinite(low) and np.isfinite(high)):
        finite = np.isfinite(array)
        bad = int(array.size - np.count_nonzero(finite))
        if nonfinite == "reject":
            raise VolumeError(
                path, f"{bad} of {array.size} voxels are NaN or Inf; pass nonfinite='repair' to replace them"
            )
        if bad == array.size:
            raise VolumeError(path, "every voxel is NaN or Inf: nothing to repair from")
        low, high = array[finite].min(), array[finite].max()
        np.copyto(array, low, where=np.isnan(array) | np.isneginf(array))
        np.copyto(array, high, where=np.isposinf(array))
        done["nonfinite_repaired"] = bad
    if low == high and not allow_constant:
        raise VolumeError(
            path,
            f"constant volume (every voxel is {float(low):g}) cannot be normalised; "
            "pass allow_constant=True to read it anyway",
        )
    return done


def check_frame(path: str | os.PathLike, frame: int | None, n_frames: int, shape: tuple[int, ...]) -> int:
    """The frame index to read along a 4th (time) axis; a 3D volume has one frame, 0."""
    if frame is None:
        if n_frames > 1:
            raise VolumeError(
                path, f"4D image with {n_frames} frames (shape {shape_text(shape)}); pick one with frame=0..{n_frames - 1}"
            )
        return 0
    if not 0 <= frame < n_frames:
        raise VolumeError(path, f"frame={frame} out of range: the image has {n_frames} frame(s), 0..{n_frames - 1}")
    return frame


MAX_VOLUME_ENV = "MEDVAE_MAX_VOLUME_GB"  # cap on the bytes one volume read may allocate
DEFAULT_MEMORY_SHARE = 0.5  # default cap: this share of the memory available when the read starts


def volume_byte_cap() -> int:
    """Most bytes a reader may allocate for one volume (raw voxels plus the float32 copy).

    ``MEDVAE_MAX_VOLUME_GB`` sets it (GiB); by default it is half the memory available now, so a
    header that claims more is refused before any voxel is read instead of exhausting the machine.
    """
    configured = os.environ.get(MAX_VOLUME_ENV)
    if configured:
        try:
            gib = float(configured)
        except ValueError:
            raise ValueError(f"{MAX_VOLUME_ENV}={configured!r}: expected a number of GiB") from None
        if not gib > 0:
            raise ValueError(f"{MAX_VOLUME_ENV}={configured!r}: must be > 0")
        return int(gib * 2**30)
    import psutil

    return int(psutil.virtual_memory().available * DEFAULT_MEMORY_SHARE)


def check_allocation(path: str | os.PathLike, needed: int, what: str) -> None:
    """Raise VolumeError if reading ``what`` would allocate more than ``volume_byte_cap()`` bytes."""
    cap = volume_byte_cap()
    if needed > cap:
        raise VolumeError(path, f"{what} would need {needed / 2**30:.2f} GiB, more than the {cap / 2**30:.2f} GiB "
                                f"a volume may take (set {MAX_VOLUME_ENV} to change it)")


def shape_text(shape: tuple[int, ...]) -> str:
    """(128, 96, 24) -> "128x96x24"."""
    return "x".join(str(n) for n in shape)
