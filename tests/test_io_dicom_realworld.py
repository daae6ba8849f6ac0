"""Real-world DICOM (issue 11, findings 9-10): rounded positions, compressed transfer syntaxes out of
the box, multi-frame files without per-frame groups, MONOCHROME1 and gantry tilt."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from medvae.io import VolumeError, read_volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _world_lps(affine, ijk):
    return (LPS_TO_RAS @ affine @ np.array([*ijk, 1.0]))[:3]


def _slices_in_order(folder: Path) -> list[Path]:
    return [Path(f) for f in read_volume(folder).metadata["files"]]


def _shift_along_normal(path: Path, millimetres: float) -> None:
    ds = pydicom.dcmread(path)
    normal = np.cross(*np.reshape(np.array(ds.ImageOrientationPatient, float), (2, 3)))
    ds.ImagePositionPatient = [f"{v:.4f}" for v in np.array(ds.ImagePositionPatient, float) + millimetres * normal]
    ds.save_as(path)


def test_rounded_positions_are_one_grid_at_the_mean_step(ct5n_copy):
    files = _slices_in_order(ct5n_copy)
    for file, jitter in zip(files, [0.0, 0.08, -0.06, 0.05, 0.0]):  # steps 2.58, 2.36, 2.61, 2.45 mm
        _shift_along_normal(file, jitter)
    volume = read_volume(ct5n_copy)
    assert volume.metadata["slice_step_range"] == pytest.approx((2.36, 2.61), abs=1e-3)
    assert volume.metadata["slice_spacing"] == pytest.approx(2.5, abs=1e-4)  # (last - first) / 4
    assert volume.spacing[2] == pytest.approx(2.5, abs=1e-4)


def test_a_step_off_by_more_than_the_tolerance_is_still_refused(ct5n_copy):
    files = _slices_in_order(ct5n_copy)
    _shift_along_normal(files[2], 0.6)
    with pytest.raises(VolumeError, match="irregular slice spacing"):
        read_volume(ct5n_copy)


def test_gantry_tilt_gives_a_sheared_affine_that_places_every_slice(ct5n_copy):
    tilt = np.radians(15.0)
    for file in ct5n_copy.iterdir():
        ds = pydicom.dcmread(file)
        # The gantry tilts the image plane about the patient's x axis; the table still moves along z.
        ds.ImageOrientationPatient = [1, 0, 0, 0, f"{np.cos(tilt):.6f}", f"{-np.sin(tilt):.6f}"]
        ds.save_as(file)
    volume = read_volume(ct5n_copy)
    files = [pydicom.dcmread(f) for f in volume.metadata["files"]]
    for k, ds in enumerate(files):
        np.testing.assert_allclose(_world_lps(volume.affine, (0, 0, k)), np.array(ds.ImagePositionPatient, float),
                                   atol=1e-3)
    row_spacing = float(files[0].PixelSpacing[0])
    np.testing.assert_allclose(_world_lps(volume.affine, (0, 1, 0)) - _world_lps(volume.affine, (0, 0, 0)),
                               row_spacing * np.array([0, np.cos(tilt), -np.sin(tilt)]), atol=1e-5)
    # The k axis is the table step (along z), not the plane normal: the affine is sheared.
    step = _world_lps(volume.affine, (0, 0, 1)) - _world_lps(volume.affine, (0, 0, 0))
    assert abs(step[1]) < 1e-3 and abs(step[2]) == pytest.approx(2.5, abs=1e-3)


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"])
def test_lossless_compressed_mr_reads_like_the_uncompressed_file(dicom_file, name):
    reference = read_volume(dicom_file("MR_small.dcm"))
    volume = read_volume(dicom_file(name))
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.affine, reference.affine)


def _with_geometry(ds):
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1
    ds.Modality = "MR"
    return ds


def test_jpeg_lossless_decodes_out_of_the_box(dicom_file, tmp_path):
    ds = _with_geometry(pydicom.dcmread(dicom_file("JPGLosslessP14SV1_1s_1f_8b.dcm")))
    ds.save_as(tmp_path / "ll.dcm")
    volume = read_volume(tmp_path / "ll.dcm")
    np.testing.assert_array_equal(volume.array[:, :, 0], ds.pixel_array.T.astype(np.float32))
    assert volume.metadata["transfer_syntax"] == "1.2.840.10008.1.2.4.70"


def test_jpeg_baseline_greyscale_decodes_out_of_the_box(dicom_file, tmp_path):
    source = pydicom.dcmread(dicom_file("MR_small.dcm"))
    pixels = source.pixel_array.astype(np.float64)
    eight_bit = np.round(255 * (pixels - pixels.min()) / np.ptp(pixels)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(eight_bit).save(buffer, format="JPEG", quality=95)
    ds = _with_geometry(source.copy())
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "baseline.dcm", enforce_file_format=True)
    volume = read_volume(tmp_path / "baseline.dcm")
    assert np.abs(volume.array[:, :, 0] - eight_bit.T).mean() < 2.0  # lossy, but the same image


def test_monochrome1_is_inverted(dicom_file, tmp_path):
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    normal = read_volume(dicom_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    inverted = read_volume(tmp_path / "mono1.dcm")
    assert "inverted" in inverted.metadata["photometric"]
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    # signed 16-bit: s -> -1 - s, so the two readings sum to slope * -1 + 2 * intercept everywhere
    assert int(ds.PixelRepresentation) == 1
    np.testing.assert_allclose(inverted.array + normal.array, -slope + 2 * intercept, atol=1e-3)


def test_multiframe_without_per_frame_groups_is_placed_from_the_spacing(ct5n_folder, tmp_path):
    reference = read_volume(ct5n_folder)
    files = [pydicom.dcmread(f) for f in reference.metadata["files"]]
    ds = files[0].copy()
    ds.NumberOfFrames = len(files)
    ds.PixelData = b"".join(f.PixelData for f in files)
    ds.SpacingBetweenSlices = "2.5"
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "multi.dcm")
    volume = read_volume(tmp_path / "multi.dcm")
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-4)
    assert "SpacingBetweenSlices" in volume.metadata["geometry_note"]
    del ds.SpacingBetweenSlices
    del ds.SliceThickness
    ds.save_as(tmp_path / "unplaced.dcm")
    with pytest.raises(VolumeError, match="without per-frame geometry"):
        read_volume(tmp_path / "unplaced.dcm")
