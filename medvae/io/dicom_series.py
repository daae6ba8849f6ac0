"""Find DICOM images and group them into series: folders, DICOMDIR indexes, single and multi-frame files.

Only headers are read here (``stop_before_pixels``); each image frame becomes one ``SliceHeader``
carrying its geometry and rescale, so classic one-slice-per-file series and enhanced multi-frame
files go through the same geometry checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.fileset import FileSet

from medvae.io.volume import VolumeError

_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR file


@dataclass(frozen=True)
class SliceHeader:
    """One image frame: where it sits (LPS mm) and how its stored values map to real ones."""

    file: Path
    frame_index: int | None  # None for a single-frame file, else the 0-based frame in a multi-frame file
    position: np.ndarray  # (3,) ImagePositionPatient, LPS mm, centre of the first voxel
    orientation: np.ndarray  # (6,) ImageOrientationPatient: row cosines (along i), column cosines (along j)
    pixel_spacing: tuple[float, float]  # (between rows = along j, between columns = along i), mm
    size: tuple[int, int]  # (rows, columns)
    slice_thickness: float | None
    slope: float
    intercept: float
    time_key: tuple  # orders repeated acquisitions at one position (temporal index, instance, frame)


@dataclass(frozen=True)
class SeriesInfo:
    """A DICOM series found on disk, as listed by ``list_dicom_series``."""

    uid: str
    description: str
    modality: str | None
    series_number: int | None
    file_count: int
    frame_count: int
    orientations: tuple[str, ...]  # "axial", "coronal", "sagittal" or "oblique", one per distinct plane
    files: tuple[Path, ...]

    def __str__(self) -> str:
        files = f"{self.file_count} file" + ("s" if self.file_count != 1 else "")
        frames = f", {self.frame_count} frames" if self.frame_count != self.file_count else ""
        return f"{self.uid} '{self.description}' ({files}{frames}, {'/'.join(self.orientations) or 'no geometry'})"


@dataclass
class _Series:
    info: SeriesInfo
    headers: list[Dataset]


def list_dicom_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """The image series under ``folder`` (searched recursively), a DICOMDIR, or one DICOM file."""
    return [series.info for series in find_series(Path(folder))]


def find_series(path: Path) -> list[_Series]:
    """Group the DICOM images at ``path`` by SeriesInstanceUID, in SeriesNumber order."""
    headers = [ds for ds in _read_headers(path) if "Rows" in ds]
    if not headers:
        raise VolumeError(path, "no DICOM image found (no file here holds pixel data)")
    groups: dict[str, list[Dataset]] = {}
    for ds in headers:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")) or "(no SeriesInstanceUID)", []).append(ds)
    series = [_Series(_describe(uid, group), group) for uid, group in groups.items()]
    return sorted(series, key=lambda s: (s.info.series_number is None, s.info.series_number or 0, s.info.uid))


def slice_headers(ds: Dataset) -> list[SliceHeader]:
    """One SliceHeader per frame of ``ds`` (classic: one; enhanced multi-frame: NumberOfFrames)."""
    file = Path(ds.filename)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        return [_frame_header(ds, file, f) for f in range(int(ds.get("NumberOfFrames", 1)))]
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return _frames_from_spacing(ds, file, frames)
    return [
        _header(
            file,
            None,
            position=ds.get("ImagePositionPatient"),
            orientation=ds.get("ImageOrientationPatient"),
            spacing=ds.get("PixelSpacing"),
            size=(ds.get("Rows"), ds.get("Columns")),
            thickness=ds.get("SpacingBetweenSlices") or ds.get("SliceThickness"),
            slope=ds.get("RescaleSlope"),
            intercept=ds.get("RescaleIntercept"),
            time_key=_order(ds.get("TemporalPositionIdentifier"), ds.get("AcquisitionNumber"), ds.get("InstanceNumber"), 0),
        )
    ]


def _frames_from_spacing(ds: Dataset, file: Path, frames: int) -> list[SliceHeader]:
    """A multi-frame file without per-frame functional groups: frame f sits at
    ImagePositionPatient + f * SpacingBetweenSlices (else SliceThickness) along the slice normal.

    That is the geometry these files (older multi-frame MR/CT/NM exports) describe; the reader
    records that it placed them so (``metadata["geometry_note"]``).
    """
    step = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    try:
        step = float(step) if step not in (None, "") else 0.0
        first = np.array([float(v) for v in position], dtype=np.float64) if position is not None else None
        cosines = np.array([float(v) for v in orientation], dtype=np.float64) if orientation is not None else None
    except (TypeError, ValueError) as err:
        raise VolumeError(file, f"malformed geometry tags ({err})") from err
    if first is None or cosines is None or cosines.shape != (6,) or first.shape != (3,) or step == 0:
        raise VolumeError(file, f"multi-frame file ({frames} frames) without per-frame geometry, and without "
                                "ImagePositionPatient, ImageOrientationPatient and SpacingBetweenSlices (or "
                                "SliceThickness) to place its frames")
    normal = np.cross(cosines[:3], cosines[3:])
    return [
        _header(file, f, position=first + f * step * normal, orientation=cosines, spacing=ds.get("PixelSpacing"),
                size=(ds.get("Rows"), ds.get("Columns")), thickness=abs(step), slope=ds.get("RescaleSlope"),
                intercept=ds.get("RescaleIntercept"), time_key=(0, 0, f))
        for f in range(frames)
    ]


def plane_name(orientation: np.ndarray) -> str:
    """Name the imaging plane from its normal: axial (z), coronal (y), sagittal (x) or oblique."""
    normal = np.cross(orientation[:3], orientation[3:])
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.95:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _read_headers(path: Path) -> list[Dataset]:
    if not path.exists():
        raise VolumeError(path, "no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        headers = [ds for ds in (_read_header(p, strict=False) for p in files) if ds is not None]
        headers = [ds for ds in headers if not _is_dicomdir(ds)]
        if not headers:
            raise VolumeError(path, f"no DICOM files in this folder ({len(files)} other files)")
        return headers
    ds = _read_header(path, strict=True)
    if _is_dicomdir(ds):
        try:
            files = sorted({Path(instance.path) for instance in FileSet(ds)})
        except (ValueError, OSError, AttributeError) as err:
            raise VolumeError(path, f"unreadable DICOMDIR ({err})") from err
        return [ds for ds in (_read_header(p, strict=True) for p in files) if ds is not None]
    if "Rows" not in ds:
        raise VolumeError(path, "DICOM file without pixel data (not an image)")
    return [ds]


def _read_header(path: Path, strict: bool) -> Dataset | None:
    """Header of a DICOM file; None for a non-DICOM file when scanning a folder (``strict=False``)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as err:
        if strict:
            raise VolumeError(path, "not a DICOM file (no 'DICM' marker) and not a NIfTI (.nii, .nii.gz)") from err
        return None
    except (OSError, ValueError, EOFError, KeyError, AttributeError) as err:
        raise VolumeError(path, f"damaged DICOM file ({type(err).__name__}: {err})") from err


def _is_dicomdir(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    return (meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _MEDIA_STORAGE_DIRECTORY) or (
        "DirectoryRecordSequence" in ds
    )


def _describe(uid: str, group: list[Dataset]) -> SeriesInfo:
    first = group[0]
    planes: list[str] = []
    frame_count = 0
    for ds in group:
        frame_count += int(ds.get("NumberOfFrames", 1) or 1)
        try:
            plane = plane_name(slice_headers(ds)[0].orientation)
        except VolumeError:
            continue
        if plane not in planes:
            planes.append(plane)
    return SeriesInfo(
        uid=uid,
        description=str(first.get("SeriesDescription", "")),
        modality=str(first.get("Modality", "")) or None,
        series_number=_int(first.get("SeriesNumber")),
        file_count=len(group),
        frame_count=frame_count,
        orientations=tuple(planes),
        files=tuple(Path(ds.filename) for ds in group),
    )


def _frame_header(ds: Dataset, file: Path, frame: int) -> SliceHeader:
    """Geometry of one frame of an enhanced multi-frame file: per-frame groups override shared ones."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    groups = [per_frame[frame]] if per_frame is not None and frame < len(per_frame) else []
    groups += list(ds.get("SharedFunctionalGroupsSequence", []))[:1]

    def find(sequence: str, keyword: str):
        for group in groups:
            if sequence in group and len(group[sequence].value) and keyword in group[sequence][0]:
                return group[sequence][0].get(keyword)
        return ds.get(keyword)  # some writers leave it at the top level

    spacing_between = find("PixelMeasuresSequence", "SpacingBetweenSlices")
    return _header(
        file,
        frame,
        position=find("PlanePositionSequence", "ImagePositionPatient"),
        orientation=find("PlaneOrientationSequence", "ImageOrientationPatient"),
        spacing=find("PixelMeasuresSequence", "PixelSpacing"),
        size=(ds.get("Rows"), ds.get("Columns")),
        thickness=spacing_between or find("PixelMeasuresSequence", "SliceThickness"),
        slope=find("PixelValueTransformationSequence", "RescaleSlope"),
        intercept=find("PixelValueTransformationSequence", "RescaleIntercept"),
        time_key=_order(find("FrameContentSequence", "TemporalPositionIndex"), 0, 0, frame),
    )


def _header(file, frame, *, position, orientation, spacing, size, thickness, slope, intercept, time_key) -> SliceHeader:
    where = "" if frame is None else f"frame {frame}: "
    missing = [name for name, value in (("ImagePositionPatient", position), ("ImageOrientationPatient", orientation),
                                        ("PixelSpacing", spacing)) if value is None]
    if missing:
        raise VolumeError(file, f"{where}no {' or '.join(missing)}: cannot place the image in space")
    try:
        position = np.array([float(v) for v in position], dtype=np.float64)
        orientation = np.array([float(v) for v in orientation], dtype=np.float64)
        pixel_spacing = (float(spacing[0]), float(spacing[1]))
    except (TypeError, ValueError, IndexError) as err:
        raise VolumeError(file, f"{where}malformed geometry tags ({err})") from err
    if position.shape != (3,) or orientation.shape != (6,) or min(pixel_spacing) <= 0:
        raise VolumeError(file, f"{where}malformed geometry: IPP {position}, IOP {orientation}, spacing {pixel_spacing}")
    return SliceHeader(
        file=file,
        frame_index=frame,
        position=position,
        orientation=orientation,
        pixel_spacing=pixel_spacing,
        size=(int(size[0]), int(size[1])),
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
        slope=float(slope) if slope not in (None, "") else 1.0,
        intercept=float(intercept) if intercept not in (None, "") else 0.0,
        time_key=time_key,
    )


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _order(*values) -> tuple[int, ...]:
    """A sortable key from optional integer tags (absent -> -1)."""
    return tuple(-1 if _int(v) is None else _int(v) for v in values)
