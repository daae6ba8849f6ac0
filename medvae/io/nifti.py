"""NIfTI (.nii, .nii.gz) through nibabel: the affine nibabel chooses (sform, else qform), scaling applied.

medvae records the modality and units it wrote in the header's ``descrip`` field
(``"medvae modality=CT units=HU"``) so they survive a write -> read round trip.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from medvae.atomic import atomic_file
from medvae.io.volume import Volume, VolumeError, check_frame, shape_text

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_DESCRIP = re.compile(r"medvae modality=(?P<modality>[^\s\x00]*) units=(?P<units>[^\s\x00]*)")
# NIfTI xyzt spatial units -> millimetres; nibabel's affine ignores them, we do not.
_MM_PER_UNIT = {"mm": 1.0, "unknown": 1.0, "meter": 1000.0, "micron": 0.001}
# What a damaged file raises from deep inside nibabel, gzip, zlib or numpy.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError)


def is_nifti_path(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: Path, frame: int | None) -> Volume:
    """Read a 3D NIfTI, or one frame of a 4D one, as float32 with scl_slope/scl_inter applied."""
    try:
        image = nib.load(path, mmap=False)
    except _READ_ERRORS as err:
        raise VolumeError(path, f"not a readable NIfTI image ({err})") from err
    header = image.header
    shape = tuple(int(n) for n in image.shape)
    while len(shape) > 3 and shape[-1] == 1:  # (I, J, K, 1): a 3D volume stored with a time axis
        shape = shape[:-1]
    _check_file_size(path, image, shape)

    n_frames = shape[3] if len(shape) == 4 else 1
    if len(shape) < 3:
        raise VolumeError(path, f"2D image (shape {shape_text(shape)}): medvae needs a 3D volume")
    if len(shape) > 4:
        raise VolumeError(path, f"{len(shape)}D image (shape {shape_text(shape)}): only 3D and 4D are supported")
    frame = check_frame(path, frame, n_frames, shape)

    try:
        if n_frames > 1:
            array = np.asarray(image.dataobj[..., frame], dtype=np.float32)
        else:
            array = np.asarray(image.get_fdata(dtype=np.float32, caching="unchanged")).reshape(shape)
    except _READ_ERRORS as err:
        raise VolumeError(path, f"cannot read the voxel data, the file is damaged or truncated ({err})") from err

    affine = np.array(image.affine, dtype=np.float64)
    spatial_unit = header.get_xyzt_units()[0]
    affine[:3] *= _MM_PER_UNIT.get(spatial_unit, 1.0)

    modality = units = None
    match = _DESCRIP.search(header["descrip"].tobytes().split(b"\0")[0].decode("latin-1"))
    if match:
        modality = match["modality"] or None
        units = match["units"] or None
    # nibabel moves scl_slope/scl_inter from the header onto the data proxy when it loads
    slope, intercept = float(getattr(image.dataobj, "slope", 1.0)), float(getattr(image.dataobj, "inter", 0.0))
    metadata = {
        "format": "nifti",
        "original_dtype": str(image.get_data_dtype()),
        "rescale": None if (slope, intercept) == (1.0, 0.0) else (slope, intercept),
        "frame": frame,
        "frames": n_frames,
        "sform_code": int(header["sform_code"]),
        "qform_code": int(header["qform_code"]),
    }
    return Volume(array, affine, modality=modality, units=units, source=str(path), metadata=metadata)


def write_nifti(volume: Volume, path: Path) -> Path:
    """Write float32 voxels with ``volume.affine`` as both sform and qform (code 1, scanner), atomically.

    NIfTI-1 stores the sform in float32, so an affine comes back to float32 precision (exactly, when
    its entries are float32 numbers, as any affine read from NIfTI-1 is).
    """
    image = nib.Nifti1Image(volume.array, volume.affine)
    image.header.set_xyzt_units(xyz="mm")
    image.set_sform(volume.affine, code=1)
    image.set_qform(volume.affine, code=1)  # nearest rigid + zooms when the affine has shears
    image.header["descrip"] = f"medvae modality={volume.modality or ''} units={volume.units or ''}"[:79]
    with atomic_file(path) as tmp:
        nib.save(image, tmp)
    return path


def _check_file_size(path: Path, image: nib.Nifti1Image, shape: tuple[int, ...]) -> None:
    """An uncompressed file must hold all the voxels its header promises."""
    if path.name.lower().endswith(".gz"):
        return  # only decompressing tells; a short .nii.gz fails in the read with its own message
    header = image.header
    needed = int(header.get_data_offset()) + int(np.prod(shape)) * header.get_data_dtype().itemsize
    size = path.stat().st_size
    if size < needed:
        raise VolumeError(
            path, f"truncated: the header describes {shape_text(shape)} voxels ({needed} bytes) but the file holds {size}"
        )
