"""Write a volume as a DICOM series of single-slice files, marked as synthetic, into a new folder.

Each slice is int16 with RescaleSlope/RescaleIntercept chosen so the volume's range fills int16:
real values come back to within slope/2. New UIDs every call; ImageType DERIVED\\SECONDARY;
the SeriesDescription and DerivationDescription say the images are synthetic. Written atomically.
"""

from __future__ import annotations

import copy
import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DS

import medvae
from medvae.atomic import atomic_directory
from medvae.io.dicom_geometry import dicom_geometry
from medvae.io.volume import Volume, VolumeError

_SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_INT16 = (-32768, 32767)


def write_dicom_series(
    volume: Volume,
    folder: Path,
    *,
    series_description: str = "medvae synthetic volume",
    patient_name: str = "SYNTHETIC^MEDVAE",
    patient_id: str = "MEDVAE-SYNTHETIC",
    series_number: int = 9001,
    study_uid: str | None = None,
    rescale_slope: float | None = None,
    rescale_intercept: float | None = None,
) -> Path:
    """Write ``volume`` (I, J, K) as K files ``folder/0001.dcm`` ... with its geometry; return ``folder``.

    Modality CT and MR get their own SOP classes (anything else: Secondary Capture, modality "OT").
    ``rescale_slope``/``rescale_intercept`` fix the int16 mapping (both, or neither for automatic).
    A left-handed affine is stored with k reversed: the same voxels at the same places.
    """
    geometry = dicom_geometry(volume.affine, folder)
    array, origin, step = volume.array, geometry["origin"], geometry["step"]
    if geometry["thickness"] < 0:  # DICOM readers order slices along +normal: store them that way
        array = array[:, :, ::-1]
        origin, step = origin + step * (array.shape[2] - 1), -step
    elif geometry["thickness"] == 0:
        raise VolumeError(folder, "the affine's k axis lies in the i-j plane: slices would overlap")
    slope, intercept = _rescale(array, folder, rescale_slope, rescale_intercept)

    modality = volume.modality if volume.modality in _SOP_CLASS else None
    now = datetime.datetime.now()
    common = _series_dataset(
        modality=modality,
        description=series_description,
        patient_name=patient_name,
        patient_id=patient_id,
        series_number=series_number,
        study_uid=study_uid or generate_uid(),
        date=now.strftime("%Y%m%d"),
        time=now.strftime("%H%M%S"),
    )
    common.ImageOrientationPatient = [DS(v, auto_format=True) for v in geometry["orientation"]]
    common.PixelSpacing = [DS(v, auto_format=True) for v in geometry["pixel_spacing"]]
    common.SliceThickness = DS(abs(geometry["thickness"]), auto_format=True)
    common.SpacingBetweenSlices = DS(abs(geometry["thickness"]), auto_format=True)
    common.Rows, common.Columns = array.shape[1], array.shape[0]
    common.RescaleSlope = DS(slope, auto_format=True)
    common.RescaleIntercept = DS(intercept, auto_format=True)
    if modality == "CT":
        common.RescaleType = "HU"

    with atomic_directory(folder) as tmp:
        for k in range(array.shape[2]):
            ds = copy.deepcopy(common)
            ds.file_meta = _file_meta(common.SOPClassUID)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
            ds.InstanceNumber = k + 1
            position = origin + k * step
            ds.ImagePositionPatient = [DS(v, auto_format=True) for v in position]
            ds.SliceLocation = DS(float(position @ geometry["normal"]), auto_format=True)
            stored = np.rint((array[:, :, k].T - intercept) / slope)  # (rows, columns)
            ds.PixelData = np.clip(stored, *_INT16).astype("<i2").tobytes()
            ds.save_as(tmp / f"{k + 1:04d}.dcm", enforce_file_format=True)
    return folder


def _rescale(array: np.ndarray, folder: Path, slope: float | None, intercept: float | None) -> tuple[float, float]:
    """(slope, intercept) as exact decimal strings will hold them, mapping the array's range into int16."""
    if not np.isfinite(array).all():
        raise VolumeError(folder, "cannot write NaN or Inf voxels to DICOM")
    low, high = float(array.min()), float(array.max())
    if (slope is None) != (intercept is None):
        raise ValueError("give both rescale_slope and rescale_intercept, or neither")
    if slope is None:
        middle = (low + high) / 2
        slope = float(f"{max((high - low) / 65000, 1e-6):.6g}")  # a little headroom under 65535 steps
        intercept = float(f"{middle:.6g}")
    elif slope <= 0:
        raise ValueError(f"rescale_slope must be > 0, got {slope}")
    for value in (low, high):
        stored = (value - intercept) / slope
        if not _INT16[0] - 0.5 <= stored <= _INT16[1] + 0.5:
            raise VolumeError(
                folder,
                f"value {value:g} does not fit int16 with rescale slope {slope:g} and intercept {intercept:g}",
            )
    return slope, intercept


def _series_dataset(*, modality, description, patient_name, patient_id, series_number, study_uid, date, time) -> Dataset:
    """Tags every slice of the series shares: patient, study, series, frame of reference, pixel format."""
    ds = Dataset()
    ds.SOPClassUID = _SOP_CLASS.get(modality, _SECONDARY_CAPTURE)
    ds.Modality = modality or "OT"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesDescription = description[:64]
    ds.DerivationDescription = f"Synthetic volume generated by medvae {medvae.__version__}; not an acquired image"
    ds.BurnedInAnnotation = "NO"
    ds.Manufacturer = "medvae"
    ds.SoftwareVersions = medvae.__version__
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.PatientBirthDate, ds.PatientSex = "", ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, generate_uid(), generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "", "", ""
    ds.SeriesNumber = series_number
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def _file_meta(sop_class: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta
