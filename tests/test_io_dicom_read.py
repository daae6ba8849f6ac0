"""medvae.io reading DICOM: real series from pydicom's test data, geometry rules, and bad input."""

import shutil

import numpy as np
import pydicom
import pytest

from medvae.io import VolumeError, list_dicom_series, read_volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _one_line_naming(err: pytest.ExceptionInfo, path) -> str:
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


def _world_lps(affine: np.ndarray, ijk) -> np.ndarray:
    return (LPS_TO_RAS @ affine @ np.array([*ijk, 1.0]))[:3]


def test_ct5n_is_read_in_slice_order_and_in_hu(ct5n_folder):
    volume = read_volume(ct5n_folder)
    assert volume.shape == (16, 16, 5) and volume.array.dtype == np.float32
    assert (volume.modality, volume.units) == ("CT", "HU")
    files = [pydicom.dcmread(f) for f in volume.metadata["files"]]
    assert [f.InstanceNumber for f in files] != sorted(f.InstanceNumber for f in files)  # not instance order
    normal = np.cross(*np.reshape(np.array(files[0].ImageOrientationPatient, float), (2, 3)))
    along = [float(np.array(f.ImagePositionPatient, float) @ normal) for f in files]
    assert np.all(np.diff(along) > 0)
    np.testing.assert_allclose(np.diff(along), 2.5, atol=1e-4)
    for k, ds in enumerate(files):  # each slice sits where its file says, and holds its HU
        np.testing.assert_allclose(_world_lps(volume.affine, (0, 0, k)), np.array(ds.ImagePositionPatient, float), atol=1e-4)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(volume.array[:, :, k], hu.T)  # DICOM (row, column) = (j, i)
    assert float(files[0].RescaleIntercept) == -1024 and volume.metadata["rescale"] == (1.0, -1024.0)
    assert volume.spacing == pytest.approx((0.488281, 0.488281, 2.5), abs=1e-5)
    assert volume.orientation == "LPS"


def test_ct2_gap_is_reported_with_its_size_and_positions(ct2_folder):
    with pytest.raises(VolumeError) as err:
        read_volume(ct2_folder)
    message = _one_line_naming(err, ct2_folder)
    assert "gap of 202.50 mm" in message
    assert "(-125, -128.1, -99.48) and (-125, -128.1, 103.02)" in message and "1.25 mm" in message


def test_missing_middle_slice_is_a_gap(ct5n_copy):
    volume = read_volume(ct5n_copy)
    (ct5n_copy / volume.metadata["files"][2].split("/")[-1]).unlink()
    with pytest.raises(VolumeError) as err:
        read_volume(ct5n_copy)
    assert "gap of 5.00 mm" in _one_line_naming(err, ct5n_copy) and "about 1 missing slice" in str(err.value)


def test_folder_mixing_series_lists_them_and_series_selects_one(mr2_folder):
    with pytest.raises(VolumeError) as err:
        read_volume(mr2_folder)
    message = _one_line_naming(err, mr2_folder)
    series = list_dicom_series(mr2_folder)
    assert len(series) == 3 and "3 DICOM series" in message
    for info in series:
        assert info.uid in message and f"'{info.description}'" in message
    assert "(3 files" in message and "(1 file," in message
    localizer = next(s for s in series if s.file_count == 1)
    volume = read_volume(mr2_folder, series=localizer.uid)
    assert volume.shape == (16, 16, 1) and volume.modality == "MR" and volume.units is None
    assert volume.metadata["series_uid"] == localizer.uid
    with pytest.raises(VolumeError, match="matches no series"):
        read_volume(mr2_folder, series="1.2.3.4")


def test_mixed_orientations_in_one_series_are_refused(mr2_folder):
    scouts = next(s for s in list_dicom_series(mr2_folder) if s.file_count == 3)
    assert set(scouts.orientations) == {"axial", "coronal", "sagittal"}
    with pytest.raises(VolumeError) as err:
        read_volume(mr2_folder, series=scouts.uid)
    message = _one_line_naming(err, mr2_folder)
    assert "mixed slice orientations" in message and "axial" in message and "sagittal" in message


def test_mixed_image_sizes_are_refused(ct5n_copy):
    path = sorted(ct5n_copy.iterdir())[0]
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.pixel_array[:8, :8].copy().tobytes()
    ds.Rows, ds.Columns = 8, 8
    ds.save_as(path)
    with pytest.raises(VolumeError) as err:
        read_volume(ct5n_copy)
    assert "mixed image sizes" in _one_line_naming(err, ct5n_copy)
    assert "4 x 16x16" in str(err.value) and "1 x 8x8" in str(err.value)


def test_dicomdir_lists_all_series_and_reads_one(dicomdir_file, ct5n_folder):
    series = list_dicom_series(dicomdir_file)
    ct5n = next(s for s in series if s.files[0].parent.name == "CT5N")
    assert ct5n.file_count == 5 and ct5n.modality == "CT"
    with pytest.raises(VolumeError, match="DICOM series here, pick one with series="):
        read_volume(dicomdir_file)
    volume = read_volume(dicomdir_file, series=ct5n.uid)
    np.testing.assert_array_equal(volume.array, read_volume(ct5n_folder).array)


def test_enhanced_multiframe_ct_uses_per_frame_positions(dicom_file):
    path = dicom_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    volume = read_volume(path)
    assert volume.shape == (512, 512, 2) and volume.units == "HU"
    positions = [np.array(g.PlanePositionSequence[0].ImagePositionPatient, float) for g in ds.PerFrameFunctionalGroupsSequence]
    assert positions[0][2] != positions[1][2]
    pixels = ds.pixel_array  # (frames, rows, columns)
    for k in range(2):
        frame = min(range(2), key=lambda f: np.linalg.norm(positions[f] - _world_lps(volume.affine, (0, 0, k))))
        np.testing.assert_allclose(_world_lps(volume.affine, (0, 0, k)), positions[frame], atol=1e-4)
        np.testing.assert_array_equal(volume.array[:, :, k], pixels[frame].T.astype(np.float32) - 1024)
    assert volume.spacing == pytest.approx((0.388672, 0.388672, 10.0), abs=1e-5)


def test_single_slice_file_with_slope(dicom_file):
    path = dicom_file("MR2_UNCI.dcm")
    ds = pydicom.dcmread(path)
    volume = read_volume(path)
    assert volume.shape == (ds.Columns, ds.Rows, 1)
    expected = ds.pixel_array.T * np.float32(ds.RescaleSlope) + np.float32(ds.RescaleIntercept)
    np.testing.assert_allclose(volume.array[:, :, 0], expected, rtol=1e-6)
    assert float(ds.RescaleSlope) == pytest.approx(3.774, abs=1e-3)
    step = float(ds.SpacingBetweenSlices)  # one slice: the step is SpacingBetweenSlices (else SliceThickness)
    assert step != float(ds.SliceThickness) and volume.spacing[2] == pytest.approx(step, abs=1e-6)


def test_repeated_positions_are_time_points_picked_with_frame(ct5n_copy, tmp_path):
    for path in list(ct5n_copy.iterdir()):
        ds = pydicom.dcmread(path)
        ds.TemporalPositionIdentifier = 1
        ds.save_as(path)
        ds.TemporalPositionIdentifier = 2
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.PixelData = (ds.pixel_array + 7).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(path.with_name(path.name + "_t2"))
    with pytest.raises(VolumeError) as err:
        read_volume(ct5n_copy)
    assert "2 frames" in _one_line_naming(err, ct5n_copy) and "frame=0..1" in str(err.value)
    first, second = read_volume(ct5n_copy, frame=0), read_volume(ct5n_copy, frame=1)
    np.testing.assert_array_equal(second.array, first.array + 7)
    np.testing.assert_array_equal(first.affine, second.affine)


def test_a_duplicated_file_is_refused(ct5n_copy):
    path = sorted(ct5n_copy.iterdir())[0]
    shutil.copy(path, ct5n_copy / "copy_of_one_slice")
    with pytest.raises(VolumeError) as err:
        read_volume(ct5n_copy)
    assert "repeat unevenly" in _one_line_naming(err, ct5n_copy)


def test_compressed_pixels_without_a_decoder_name_the_plugin(dicom_file):
    path = dicom_file("MR_small_jpeg_ls_lossless.dcm")
    try:
        pydicom.dcmread(path).pixel_array
        pytest.skip("a JPEG-LS decoder is installed here")
    except RuntimeError:
        pass  # the expected state: pydicom alone cannot decode JPEG-LS
    with pytest.raises(VolumeError) as err:
        read_volume(path)
    message = _one_line_naming(err, path)
    assert "JPEG-LS" in message and "pylibjpeg-libjpeg" in message and "python-gdcm" in message


def test_dicom_without_pixel_data(dicom_file, tmp_path):
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    del ds.PixelData
    path = tmp_path / "no_pixels.dcm"
    ds.save_as(path)
    with pytest.raises(VolumeError) as err:
        read_volume(path)
    assert "without pixel data" in _one_line_naming(err, path)


def test_truncated_dicom_pixel_data(ct5n_copy):
    path = sorted(ct5n_copy.iterdir())[0]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(VolumeError) as err:
        read_volume(ct5n_copy)
    assert "damaged pixel data" in _one_line_naming(err, path)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(VolumeError) as err:
        read_volume(tmp_path)
    assert "no DICOM files" in _one_line_naming(err, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VolumeError, match="no DICOM files"):
        read_volume(empty)


def test_file_without_geometry_is_refused(dicom_file):
    path = dicom_file("emri_small.dcm")
    with pytest.raises(VolumeError) as err:
        read_volume(path)
    assert "geometry" in _one_line_naming(err, path)
