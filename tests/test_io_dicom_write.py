"""medvae.io writing DICOM series: tags, geometry and HU round trips, atomic failure."""

import numpy as np
import pydicom
import pytest

from medvae.io import Volume, VolumeError, read_volume, write_volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _oblique_affine(handed: float = 1.0) -> np.ndarray:
    """RAS+ affine: rotated about an off-axis direction, anisotropic, offset; ``handed=-1`` flips k."""
    angle = np.radians(33.0)
    axis = np.array([0.3, -1.0, 0.6]) / np.linalg.norm([0.3, -1.0, 0.6])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 0.8, 2.0 * handed])
    affine[:3, 3] = [21.5, -63.25, 140.0]
    return affine


def _ct_like(shape=(7, 6, 5), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1024, 2500, size=shape).astype(np.float32)


def test_written_series_carries_synthetic_tags_and_geometry(tmp_path):
    array, affine = _ct_like(), _oblique_affine()
    folder = write_volume(array, tmp_path / "series", affine=affine, modality="CT")
    files = sorted(folder.iterdir())
    assert len(files) == 5
    slices = [pydicom.dcmread(f) for f in files]
    first = slices[0]
    assert list(first.ImageType) == ["DERIVED", "SECONDARY"]
    assert "synthetic" in first.SeriesDescription.lower() and "synthetic" in first.DerivationDescription.lower()
    assert first.BurnedInAnnotation == "NO" and first.Modality == "CT"
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert len({s.SOPInstanceUID for s in slices}) == 5 and len({s.SeriesInstanceUID for s in slices}) == 1
    assert (first.Rows, first.Columns) == (6, 7)  # rows run along j, columns along i
    assert first.pixel_array.dtype == np.int16
    lps = LPS_TO_RAS @ affine
    np.testing.assert_allclose(np.array(first.ImageOrientationPatient, float)[:3], lps[:3, 0] / 0.7, atol=1e-9)
    np.testing.assert_allclose([float(v) for v in first.PixelSpacing], [0.8, 0.7], atol=1e-9)
    assert float(first.SliceThickness) == pytest.approx(2.0) and float(first.SpacingBetweenSlices) == pytest.approx(2.0)
    for k, ds in enumerate(slices):
        np.testing.assert_allclose(np.array(ds.ImagePositionPatient, float), (lps @ [0, 0, k, 1])[:3], atol=1e-9)
    # The stored int16 with slope/intercept is the value, to within half a step.
    hu = first.pixel_array.T * float(first.RescaleSlope) + float(first.RescaleIntercept)
    assert np.abs(hu - array[:, :, 0]).max() <= float(first.RescaleSlope) / 2 + 1e-3


def test_oblique_series_round_trips_through_medvae(tmp_path):
    array, affine = _ct_like(), _oblique_affine()
    folder = write_volume(array, tmp_path / "series", affine=affine, modality="CT")
    back = read_volume(folder)
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)
    slope = float(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).RescaleSlope)
    assert np.abs(back.array - array).max() <= slope / 2 + 1e-3  # HU within slope/2
    assert (back.modality, back.units) == ("CT", "HU") and back.shape == array.shape


def test_left_handed_affine_comes_back_with_k_reversed_at_the_same_places(tmp_path):
    array, affine = _ct_like(), _oblique_affine(handed=-1.0)
    back = read_volume(write_volume(array, tmp_path / "series", affine=affine, modality="CT"))
    flipped = affine.copy()
    flipped[:3, 2] *= -1
    flipped[:3, 3] = affine[:3, 3] + affine[:3, 2] * (array.shape[2] - 1)
    np.testing.assert_allclose(back.affine, flipped, atol=1e-6)
    slope = float(pydicom.dcmread(sorted((tmp_path / "series").iterdir())[0]).RescaleSlope)
    assert np.abs(back.array - array[:, :, ::-1]).max() <= slope / 2 + 1e-3


def test_real_ct_round_trips_exactly_with_unit_slope(ct5n_folder, tmp_path):
    original = read_volume(ct5n_folder)
    folder = write_volume(original, tmp_path / "ct5n", rescale_slope=1.0, rescale_intercept=-1024.0)
    back = read_volume(folder)
    np.testing.assert_array_equal(back.array, original.array)
    np.testing.assert_allclose(back.affine, original.affine, atol=1e-6)
    assert back.metadata["series_uid"] != original.metadata["series_uid"]
    assert back.metadata["rescale"] == (1.0, -1024.0)


def test_each_write_gets_new_uids_and_mr_gets_no_hu(tmp_path):
    array = _ct_like(shape=(4, 4, 3)) / 10
    one = read_volume(write_volume(array, tmp_path / "a", affine=np.eye(4), modality="MR"))
    two = read_volume(write_volume(array, tmp_path / "b", affine=np.eye(4), modality="MR"))
    assert one.metadata["series_uid"] != two.metadata["series_uid"]
    assert (one.modality, one.units) == ("MR", None)


def test_volume_without_modality_is_secondary_capture(tmp_path):
    volume = Volume(_ct_like(shape=(4, 4, 3)), np.diag([1.5, 1.5, 3.0, 1.0]))
    folder = write_volume(volume, tmp_path / "sc", format="dicom")
    ds = pydicom.dcmread(next(folder.iterdir()))
    assert ds.Modality == "OT" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    np.testing.assert_allclose(read_volume(folder).affine, volume.affine, atol=1e-9)


def test_failed_writes_leave_the_previous_series_untouched(tmp_path):
    target = tmp_path / "series"
    write_volume(_ct_like(), target, affine=np.eye(4), modality="CT")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    bad = _ct_like()
    bad[0, 0, 0] = np.nan
    with pytest.raises(VolumeError, match="NaN or Inf") as err:
        write_volume(bad, target, affine=np.eye(4), modality="CT")
    assert str(err.value).startswith(f"{target}: ")
    with pytest.raises(VolumeError, match="NaN or Inf"):
        write_volume(bad, tmp_path / "fresh", affine=np.eye(4))
    sheared = np.eye(4)
    sheared[0, 1] = 0.3  # i and j not perpendicular: DICOM cannot hold it
    with pytest.raises(VolumeError, match="perpendicular"):
        write_volume(_ct_like(), target, affine=sheared)
    with pytest.raises(VolumeError, match="does not fit int16"):
        write_volume(_ct_like() * 100, target, affine=np.eye(4), rescale_slope=1.0, rescale_intercept=0.0)

    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]  # no temporary folder left
