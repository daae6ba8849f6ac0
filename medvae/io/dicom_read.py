"""Read a DICOM volume: pick the series, stack its slices, decode pixels into one float32 array.

The output is filled slice by slice into a preallocated (K, rows, columns) float32 buffer and returned
as its (I, J, K) = (columns, rows, slices) transposed view: one copy of the voxels, no stacking.
Stored values become real ones with RescaleSlope/RescaleIntercept (per slice); CT comes out in HU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom.pixels

from medvae.io.dicom_geometry import stack_slices
from medvae.io.dicom_series import SliceHeader, find_series, slice_headers
from medvae.io.volume import Volume, VolumeError, check_allocation

# Which pip packages decode which compressed transfer syntaxes (pydicom itself does RLE and deflate).
_JPEG = "pylibjpeg pylibjpeg-libjpeg"
_JPEG2000 = "pylibjpeg pylibjpeg-openjpeg"
_DECODERS = {
    "1.2.840.10008.1.2.4.50": _JPEG,
    "1.2.840.10008.1.2.4.51": _JPEG,
    "1.2.840.10008.1.2.4.57": _JPEG,
    "1.2.840.10008.1.2.4.70": _JPEG,
    "1.2.840.10008.1.2.4.80": _JPEG,  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": _JPEG,  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": _JPEG2000,
    "1.2.840.10008.1.2.4.91": _JPEG2000,
    "1.2.840.10008.1.2.4.201": _JPEG2000,  # HTJ2K
    "1.2.840.10008.1.2.4.202": _JPEG2000,
    "1.2.840.10008.1.2.4.203": _JPEG2000,
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",
}


def read_dicom(path: Path, series: str | None, frame: int | None) -> Volume:
    """Read one series from a folder, a DICOMDIR or a single (possibly multi-frame) DICOM file."""
    chosen = _choose_series(path, find_series(path), series)
    slices = [header for ds in chosen.headers for header in slice_headers(ds)]
    stack = stack_slices(slices, path, frame)
    first = chosen.headers[0]
    if int(first.get("SamplesPerPixel", 1)) != 1:
        raise VolumeError(path, f"colour image (SamplesPerPixel={first.SamplesPerPixel}): medvae reads greyscale volumes")

    rows, columns = stack.slices[0].size
    # The float32 volume plus one decoded frame at a time (8 bytes per stored value at most).
    check_allocation(path, len(stack.slices) * rows * columns * 4 + rows * columns * 8,
                     f"{len(stack.slices)} slices of {rows}x{columns} pixels")
    buffer = np.empty((len(stack.slices), rows, columns), dtype=np.float32)
    photometric = str(first.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    # MONOCHROME1 shows the lowest value as white: store-side inversion makes it read like MONOCHROME2.
    invert = _inversion(first) if photometric == "MONOCHROME1" else None
    _decode_into(buffer, stack.slices, invert)

    modality = str(first.get("Modality", "")) or None
    rescales = {(s.slope, s.intercept) for s in stack.slices}
    metadata = {
        "format": "dicom",
        "series_uid": chosen.info.uid,
        "series_description": chosen.info.description,
        "series_number": chosen.info.series_number,
        "rescale": next(iter(rescales)) if len(rescales) == 1 else "per-slice",
        "frame": stack.frame,
        "frames": stack.frames,
        "slice_spacing": stack.slice_spacing,
        "original_dtype": f"{'int' if int(first.get('PixelRepresentation', 0)) else 'uint'}{first.get('BitsAllocated', 16)}",
        "files": [str(s.file) for s in stack.slices],
        "transfer_syntax": str(getattr(first, "file_meta", {}).get("TransferSyntaxUID", "")),
        "slice_step_range": stack.step_range,
        "photometric": photometric + (" (inverted to read as MONOCHROME2)" if invert is not None else ""),
    }
    if int(first.get("NumberOfFrames", 1) or 1) > 1 and "PerFrameFunctionalGroupsSequence" not in first:
        metadata["geometry_note"] = ("multi-frame file without per-frame positions: frames placed from "
                                     "ImagePositionPatient and SpacingBetweenSlices/SliceThickness")
    return Volume(
        buffer.transpose(2, 1, 0),  # (K, rows, columns) -> (I, J, K): a view, not a copy
        stack.affine,
        modality=modality,
        units="HU" if modality == "CT" else None,
        source=str(path),
        metadata=metadata,
    )


def _choose_series(path: Path, found: list, series: str | None):
    """The one series at ``path``, or the one named by UID (or unique description) in ``series``."""
    listing = "; ".join(str(s.info) for s in found)
    if series is None:
        if len(found) > 1:
            raise VolumeError(path, f"{len(found)} DICOM series here, pick one with series=<uid>: {listing}")
        return found[0]
    matches = [s for s in found if s.info.uid == series] or [s for s in found if s.info.description == series]
    if len(matches) != 1:
        problem = "matches several series" if matches else "matches no series"
        raise VolumeError(path, f"series={series!r} {problem}; found: {listing}")
    return matches[0]


def _inversion(ds) -> tuple[float, float]:
    """(a, b) with inverted = a - b * stored: the largest stored value and the smallest swap places."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)):
        return -1.0, 1.0  # signed: s -> -1 - s maps [-2^(b-1), 2^(b-1) - 1] onto itself
    return float(2**bits - 1), 1.0


def _decode_into(buffer: np.ndarray, slices: list[SliceHeader], invert: tuple[float, float] | None = None) -> None:
    """Decode each slice's stored values into ``buffer[k]`` and rescale them there, in place.

    ``invert`` (a, b): stored values become a - b * stored first (MONOCHROME1)."""
    by_file: dict[Path, list[tuple[int, SliceHeader]]] = {}
    for k, s in enumerate(slices):
        by_file.setdefault(s.file, []).append((k, s))
    for file, items in by_file.items():
        try:
            if items[0][1].frame_index is None:
                frames = [pydicom.pixels.pixel_array(file)]
            else:
                items.sort(key=lambda item: item[1].frame_index)
                frames = pydicom.pixels.iter_pixels(file, indices=[s.frame_index for _, s in items])
            for (k, s), pixels in zip(items, frames, strict=True):
                if pixels.shape != buffer.shape[1:]:
                    raise VolumeError(file, f"pixel data shape {pixels.shape} does not match rows x columns {buffer.shape[1:]}")
                if invert is not None:
                    pixels = invert[0] - invert[1] * pixels.astype(np.float64)
                np.multiply(pixels, np.float32(s.slope), out=buffer[k], casting="unsafe")
                buffer[k] += np.float32(s.intercept)
        except VolumeError:
            raise
        except AttributeError as err:  # pydicom: "no 'Pixel Data' ... element"
            raise VolumeError(file, "DICOM file without pixel data") from err
        except (RuntimeError, NotImplementedError, ValueError, OSError, EOFError, KeyError) as err:
            raise _decode_error(file, err) from err


def _decode_error(file: Path, err: Exception) -> VolumeError:
    """Name the decoder to install for compressed data; otherwise say the pixel data is damaged."""
    try:
        syntax = pydicom.dcmread(file, stop_before_pixels=True).file_meta.get("TransferSyntaxUID")
    except Exception:  # the header went bad too: report the original decoding error
        syntax = None
    if syntax is not None and syntax.is_compressed:
        plugin = _DECODERS.get(str(syntax), "python-gdcm")
        return VolumeError(
            file,
            f"pixel data is compressed as {syntax.name} and no installed decoder can read it "
            f"({' '.join(str(err).split())[:200]}); medvae depends on {plugin}: reinstall it, or pip install python-gdcm",
        )
    return VolumeError(file, f"damaged pixel data ({type(err).__name__}: {err})")
