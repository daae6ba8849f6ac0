"""NIfTI (.nii, .nii.gz) through nibabel: the affine nibabel chooses (sform, else qform), scaling applied.

medvae records the modality and units it wrote in the header's ``descrip`` field
(``"medvae modality=CT units=HU"``) so they survive a write -> read round trip.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from medvae.atomic import atomic_file
from medvae.io.volume import Volume, VolumeError, check_allocation, check_frame, shape_text

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_DESCRIP = re.compile(r"medvae modality=(?P<modality>[^\s\x00]*) units=(?P<units>[^\s\x00]*)")
# NIfTI xyzt spatial units -> millimetres; nibabel's affine ignores them, we do not.
_MM_PER_UNIT = {"mm": 1.0, "unknown": 1.0, "meter": 1000.0, "micron": 0.001}
# What a damaged file raises from deep inside nibabel, gzip, zlib or numpy.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError, HeaderDataError)
# A .nii.gz whose header declares more than this many bytes of voxels per byte of file is refused
# (a decompression bomb; real CT/MR compresses 1.5-10x) once the declared size passes the floor.
MAX_GZIP_RATIO = float(os.environ.get("MEDVAE_MAX_GZIP_RATIO", 100))
GZIP_RATIO_FLOOR = 64 * 2**20  # bytes: smaller volumes are never refused for their ratio
_CHUNK = 1 << 20


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
    if 0 in shape:
        raise VolumeError(path, f"empty image: the header declares a zero-size dimension (shape {shape_text(shape)})")
    n_frames = shape[3] if len(shape) == 4 else 1
    if len(shape) < 3:
        raise VolumeError(path, f"2D image (shape {shape_text(shape)}): medvae needs a 3D volume")
    if len(shape) > 4:
        raise VolumeError(path, f"{len(shape)}D image (shape {shape_text(shape)}): only 3D and 4D are supported")
    frame = check_frame(path, frame, n_frames, shape)
    image = _checked_image(path, image, shape)

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


def _checked_image(path: Path, image, shape: tuple[int, ...]):
    """Check the header's declared size before any voxel is read; return an image safe to read.

    Uncompressed: the file must hold every declared byte. Any file: the raw bytes plus the float32
    frame must fit ``volume_byte_cap()``. Compressed: the declared size must be plausible for the
    file's size, and the file is decompressed into memory with a running limit of exactly the
    declared size (so a gzip bomb stops there), then parsed from those bytes.
    """
    header = image.header
    offset = int(getattr(image.dataobj, "offset", header.get_data_offset()))  # what the reader will seek to
    frame_voxels = int(np.prod(shape[:3]))
    raw = int(np.prod(shape)) * header.get_data_dtype().itemsize
    needed = offset + raw
    size = path.stat().st_size
    compressed = path.name.lower().endswith(".gz")
    if not compressed:
        if size < needed:
            raise VolumeError(path, f"truncated: the header describes {shape_text(shape)} voxels ({needed} bytes) "
                                    f"but the file holds {size}")
        check_allocation(path, frame_voxels * (4 + header.get_data_dtype().itemsize),
                         f"the {shape_text(shape)} voxels its header declares")
        return image
    check_allocation(path, needed + frame_voxels * 4, f"the {shape_text(shape)} voxels its header declares")
    if raw > GZIP_RATIO_FLOOR and raw > MAX_GZIP_RATIO * size:
        raise VolumeError(path, f"the header declares {raw / 2**20:.0f} MiB of voxels in a {size / 2**20:.2f} MiB "
                                f"file ({raw / size:.0f}x; real scans compress < {MAX_GZIP_RATIO:.0f}x): refusing a "
                                "likely decompression bomb (set MEDVAE_MAX_GZIP_RATIO to allow it)")
    data = io.BytesIO()
    try:
        with gzip.open(path, "rb") as stream:
            while data.tell() < needed:
                chunk = stream.read(min(_CHUNK, needed - data.tell()))
                if not chunk:
                    break
                data.write(chunk)
    except _READ_ERRORS as err:
        raise VolumeError(path, f"cannot decompress the file, it is damaged or truncated ({err})") from err
    if data.tell() < needed:
        raise VolumeError(path, f"truncated: the header describes {shape_text(shape)} voxels ({needed} bytes) "
                                f"but the file decompresses to {data.tell()}")
    data.seek(0)
    klass = type(image)
    return klass.from_file_map(klass.make_file_map({"image": data, "header": data}))
