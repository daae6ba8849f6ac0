"""Read and write volumes with their geometry: NIfTI through nibabel, DICOM through pydicom.

``read_volume`` returns a ``Volume``: float32 voxels (I, J, K), a RAS+ affine in mm, modality and
units (HU for CT). Every problem with an input file is a one-line ``VolumeError`` naming the file.
"""

from medvae.io.dicom_series import SeriesInfo, list_dicom_series
from medvae.io.read import read_volume
from medvae.io.volume import Volume, VolumeError
from medvae.io.write import write_volume

__all__ = ["SeriesInfo", "Volume", "VolumeError", "list_dicom_series", "read_volume", "write_volume"]
