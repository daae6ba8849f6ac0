"""DICOM geometry: order slices along their normal, check the stack is a regular grid, build the affine.

DICOM positions are in LPS mm; the affine medvae returns is RAS+ (x and y negated), as nibabel's.
Slices are ordered by ImagePositionPatient projected on the normal (row cosines x column cosines),
never by file name or InstanceNumber, so k always runs along +normal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from medvae.io.dicom_series import SliceHeader, plane_name
from medvae.io.volume import VolumeError, check_frame

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
ORIENTATION_TOLERANCE = 1e-3  # direction cosines that differ by less are the same plane
SAME_POSITION_MM = 0.01  # slices closer than this along the normal sit at one position
# Scanners round positions: a step may differ from the typical (median) step by this much and the
# series is still one regular grid at the mean step. The rule is dcm2niix's (rordenlab/dcm2niix,
# console/nii_dicom_batch.cpp: `isSameFloatT(dx, intersliceDistance(...), 0.2)`, 0.2 mm, before it
# warns "Interslice distance varies in this volume"). medvae also caps it at a quarter of the step,
# so a missing slice is always a gap, however thin the slices.
SPACING_JITTER_MM = 0.2


@dataclass
class Stack:
    """The slices of one 3D volume in k order, and where they are."""

    slices: list[SliceHeader]
    affine: np.ndarray  # (4, 4) voxel -> RAS+ mm
    frame: int  # which repeat at each position (time point) was taken
    frames: int  # how many repeats each position holds
    slice_spacing: float  # mm along the normal; assumed from the thickness tags for a single slice
    step_range: tuple[float, float] | None = None  # smallest and largest step along the normal, mm


def stack_slices(slices: list[SliceHeader], path: str | os.PathLike, frame: int | None) -> Stack:
    """Order ``slices`` into one regular 3D grid or raise VolumeError saying what is wrong with it."""
    _check_same(path, slices, lambda s: plane_name(s.orientation) + " " + _numbers(s.orientation, 3),
                "slice orientations (ImageOrientationPatient)",
                same=lambda a, b: np.abs(a.orientation - b.orientation).max() < ORIENTATION_TOLERANCE)
    _check_same(path, slices, lambda s: f"{s.size[0]}x{s.size[1]}", "image sizes (rows x columns)",
                same=lambda a, b: a.size == b.size)
    _check_same(path, slices, lambda s: _numbers(s.pixel_spacing, 4) + " mm", "pixel spacings",
                same=lambda a, b: np.allclose(a.pixel_spacing, b.pixel_spacing, rtol=1e-4, atol=1e-5))

    orientation = slices[0].orientation
    normal = np.cross(orientation[:3], orientation[3:])
    along = lambda s: float(s.position @ normal)  # noqa: E731  (mm along the normal)
    ordered = sorted(slices, key=lambda s: (along(s), s.time_key))

    # Group slices at one position: several per position is a time series (or a duplicated file).
    positions: list[list[SliceHeader]] = []
    for s in ordered:
        if positions and along(s) - along(positions[-1][0]) < SAME_POSITION_MM:
            positions[-1].append(s)
        else:
            positions.append([s])
    counts = sorted({len(group) for group in positions})
    if len(counts) > 1:
        uneven = next(g for g in positions if len(g) != len(positions[0]))
        raise VolumeError(
            path,
            f"slice positions repeat unevenly ({counts[0]} to {counts[-1]} slices per position, e.g. "
            f"{len(uneven)} at {_numbers(uneven[0].position, 2)} mm): duplicate files or mixed acquisitions",
        )
    frames = counts[0]
    frame = check_frame(path, frame, frames, (*slices[0].size[::-1], len(positions), frames))
    chosen = [sorted(group, key=lambda s: s.time_key)[frame] for group in positions]

    spacing = _check_regular(path, chosen, [along(s) for s in chosen])
    steps = np.diff([along(s) for s in chosen])
    step_range = (round(float(steps.min()), 4), round(float(steps.max()), 4)) if len(steps) else None
    first = chosen[0]
    if len(chosen) > 1:
        step = (chosen[-1].position - first.position) / (len(chosen) - 1)
    else:
        spacing = first.slice_thickness or 1.0
        step = normal * spacing
    _check_collinear(path, chosen, step, normal)
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * first.pixel_spacing[1]  # i runs along a row: column spacing
    lps[:3, 1] = orientation[3:] * first.pixel_spacing[0]  # j runs down a column: row spacing
    lps[:3, 2] = step
    lps[:3, 3] = first.position
    return Stack(chosen, LPS_TO_RAS @ lps, frame, frames, spacing, step_range)


def dicom_geometry(affine: np.ndarray, path: str | os.PathLike) -> dict:
    """Split a RAS+ affine into DICOM terms: IOP (6,), pixel spacing (row, col), slice step (3,) LPS, origin.

    Raises VolumeError when DICOM cannot hold it: i and j axes must be perpendicular, and k must leave
    their plane (a step with a positive component along the normal; callers flip k otherwise).
    """
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    column_spacing, row_spacing = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    if min(column_spacing, row_spacing) <= 0:
        raise VolumeError(path, "the affine has a zero-length i or j axis")
    row_cosines, column_cosines = lps[:3, 0] / column_spacing, lps[:3, 1] / row_spacing
    cosine = float(row_cosines @ column_cosines)
    if abs(cosine) > 1e-4:
        angle = np.degrees(np.arccos(np.clip(cosine, -1, 1)))
        raise VolumeError(path, f"the affine's i and j axes meet at {angle:.3f} degrees; DICOM needs them perpendicular")
    normal = np.cross(row_cosines, column_cosines)
    thickness = float(lps[:3, 2] @ normal)
    return {
        "orientation": np.concatenate([row_cosines, column_cosines]),
        "pixel_spacing": (float(row_spacing), float(column_spacing)),
        "step": lps[:3, 2].copy(),
        "origin": lps[:3, 3].copy(),
        "normal": normal,
        "thickness": thickness,
    }


def _check_same(path, slices, describe, what, same) -> None:
    """All slices agree on one property, else name the variants found and how many slices have each."""
    variants: list[tuple[SliceHeader, int]] = []
    for s in slices:
        for n, (example, count) in enumerate(variants):
            if same(example, s):
                variants[n] = (example, count + 1)
                break
        else:
            variants.append((s, 1))
    if len(variants) > 1:
        found = "; ".join(f"{count} x {describe(example)}" for example, count in variants)
        raise VolumeError(path, f"mixed {what} in one series: {found}")


def _check_regular(path, slices: list[SliceHeader], along: list[float]) -> float:
    """Equal steps between neighbouring slices; return the step (mm). A gap names its two positions."""
    if len(slices) < 2:
        return 0.0
    steps = np.diff(along)
    typical = float(np.sort(steps)[(len(steps) - 1) // 2])  # lower median: a lone gap never sets it
    worst = int(np.argmax(np.abs(steps - typical)))
    if abs(steps[worst] - typical) > min(SPACING_JITTER_MM, 0.25 * typical):
        a, b = slices[worst], slices[worst + 1]
        missing = steps[worst] / typical - 1 if typical > 0 else 0
        hint = f" (about {round(missing)} missing slice(s))" if missing >= 0.5 else ""
        raise VolumeError(
            path,
            f"irregular slice spacing: a gap of {steps[worst]:.2f} mm between slices at {_numbers(a.position, 2)} "
            f"and {_numbers(b.position, 2)} mm (LPS), where the other steps are {typical:.2f} mm{hint}",
        )
    return float((along[-1] - along[0]) / (len(along) - 1))  # the mean step


def _check_collinear(path, slices: list[SliceHeader], step: np.ndarray, normal: np.ndarray) -> None:
    """Every slice origin sits on the line first + k * step, to within a tenth of a pixel in the
    slice plane (positions may jitter along the normal, as ``_check_regular`` allows)."""
    tolerance = 0.01 + 0.1 * min(slices[0].pixel_spacing)
    for k, s in enumerate(slices):
        deviation = s.position - (slices[0].position + k * step)
        off = float(np.linalg.norm(deviation - (deviation @ normal) * normal))
        if off > tolerance:
            raise VolumeError(
                path, f"slice positions are not on one line: the slice at {_numbers(s.position, 2)} mm is {off:.2f} mm off it"
            )


def _numbers(values, decimals: int) -> str:
    """(-125.0, -128.100006, 0.0) -> "(-125, -128.1, 0)"."""
    texts = (f"{float(v):.{decimals}f}".rstrip("0").rstrip(".") for v in values)
    return "(" + ", ".join("0" if text == "-0" else text for text in texts) + ")"
