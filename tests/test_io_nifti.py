"""medvae.io on NIfTI: real files from nibabel, round trips, and every kind of bad input."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from medvae.io import Volume, VolumeError, read_volume, write_volume


def _one_line_naming(err: pytest.ExceptionInfo, path) -> str:
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


def _oblique_affine() -> np.ndarray:
    """A rotation about an off-axis direction, anisotropic voxels and an offset: RAS+ mm."""
    angle = np.radians(25.0)
    axis = np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = [-40.3, 12.7, 88.1]
    return affine


def test_anatomical_nifti_keeps_its_affine_and_values(nibabel_data):
    path = nibabel_data / "anatomical.nii"
    volume = read_volume(path)
    reference = nib.load(path)
    assert volume.array.dtype == np.float32 and volume.shape == (33, 41, 25)
    np.testing.assert_array_equal(volume.affine, reference.affine)
    np.testing.assert_array_equal(volume.array, reference.get_fdata())
    assert volume.orientation == "LAS" and volume.spacing == (2.0, 2.0, 2.0)
    assert volume.source == str(path) and volume.modality is None


def test_4d_nifti_needs_a_frame_and_reads_the_one_asked_for(nibabel_data):
    path = nibabel_data / "example4d.nii.gz"
    with pytest.raises(VolumeError) as err:
        read_volume(path)
    message = _one_line_naming(err, path)
    assert "2 frames" in message and "frame=0..1" in message
    volume = read_volume(path, frame=1)
    reference = nib.load(path)
    assert volume.shape == (128, 96, 24) and volume.metadata["frame"] == 1
    np.testing.assert_array_equal(volume.affine, reference.affine)  # oblique: sform with shear-free rotation
    np.testing.assert_array_equal(volume.array, reference.get_fdata()[..., 1])
    with pytest.raises(VolumeError, match="frame=2 out of range"):
        read_volume(path, frame=2)


def test_scl_slope_and_inter_are_applied(tmp_path):
    stored = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    image = nib.Nifti1Image(stored, np.eye(4))
    image.header.set_slope_inter(0.5, -100.0)
    nib.save(image, tmp_path / "scaled.nii")
    volume = read_volume(tmp_path / "scaled.nii")
    np.testing.assert_allclose(volume.array, stored * 0.5 - 100.0)
    assert volume.metadata["rescale"] == (0.5, -100.0)


def test_nifti_round_trip_keeps_affine_exactly_and_values(nibabel_data, tmp_path):
    original = read_volume(nibabel_data / "anatomical.nii")
    out = write_volume(original, tmp_path / "copy.nii.gz")
    back = read_volume(out)
    np.testing.assert_array_equal(back.affine, original.affine)
    np.testing.assert_array_equal(back.array, original.array)
    assert [p.name for p in tmp_path.iterdir()] == ["copy.nii.gz"]  # no temporary left behind


def test_nifti_round_trip_of_an_oblique_array_with_modality(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.normal(0, 300, size=(5, 6, 7)).astype(np.float32)
    affine = _oblique_affine()
    write_volume(array, tmp_path / "oblique.nii", affine=affine, modality="CT")
    back = read_volume(tmp_path / "oblique.nii")
    np.testing.assert_allclose(back.affine, affine, atol=1e-4)  # NIfTI-1 stores the sform in float32
    np.testing.assert_array_equal(back.array, array)
    assert (back.modality, back.units) == ("CT", "HU")
    assert back.metadata["sform_code"] == 1


def test_missing_file(tmp_path):
    path = tmp_path / "absent.nii.gz"
    with pytest.raises(VolumeError) as err:
        read_volume(path)
    assert "no such file" in _one_line_naming(err, path)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.nii"
    path.write_text("this is not a NIfTI header\n" * 20)
    with pytest.raises(VolumeError) as err:
        read_volume(path)
    assert "not a readable NIfTI" in _one_line_naming(err, path)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(VolumeError) as err:
        read_volume(other)
    assert "not a DICOM file" in _one_line_naming(err, other)


def test_truncated_nii_gz(nibabel_data, tmp_path):
    data = (nibabel_data / "example4d.nii.gz").read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError) as err:
        read_volume(path, frame=0)
    assert "damaged or truncated" in _one_line_naming(err, path)


def test_header_claiming_more_data_than_the_file_holds(nibabel_data, tmp_path):
    data = (nibabel_data / "anatomical.nii").read_bytes()
    path = tmp_path / "short.nii"
    path.write_bytes(data[:-1000])
    with pytest.raises(VolumeError) as err:
        read_volume(path)
    message = _one_line_naming(err, path)
    assert "truncated" in message and "33x41x25" in message


def test_gzip_member_with_a_short_payload(tmp_path):
    """A complete gzip stream whose NIfTI header promises more voxels than it carries."""
    header = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)).header
    header.set_data_offset(352)  # voxels start after the 348-byte header and 4 extension bytes
    raw = header.binaryblock + b"\x00" * 4 + np.ones(10, np.float32).tobytes()
    path = tmp_path / "short.nii.gz"
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(VolumeError) as err:
        read_volume(path)
    assert "describes 4x4x4 voxels (608 bytes) but the file decompresses to 392" in _one_line_naming(err, path)


def test_nonfinite_voxels_are_rejected_by_default_and_repaired_on_request(tmp_path):
    array = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    array[0, 0, 0], array[1, 1, 1], array[2, 2, 2] = np.nan, np.inf, -np.inf
    path = tmp_path / "nan.nii"
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    with pytest.raises(VolumeError) as err:
        read_volume(path)
    message = _one_line_naming(err, path)
    assert "3 of 27 voxels are NaN or Inf" in message and "nonfinite='repair'" in message
    repaired = read_volume(path, nonfinite="repair")
    finite = array[np.isfinite(array)]
    assert repaired.array[0, 0, 0] == finite.min() and repaired.array[2, 2, 2] == finite.min()
    assert repaired.array[1, 1, 1] == finite.max()
    assert repaired.metadata["nonfinite_repaired"] == 3
    with pytest.raises(ValueError, match="nonfinite must be"):
        read_volume(path, nonfinite="zero")


def test_2d_image_is_refused(tmp_path):
    path = tmp_path / "slice.nii"
    nib.save(nib.Nifti1Image(np.ones((8, 9), np.float32), np.eye(4)), path)
    with pytest.raises(VolumeError) as err:
        read_volume(path)
    assert "2D image (shape 8x9)" in _one_line_naming(err, path)


def test_constant_volume_is_refused_unless_allowed(tmp_path):
    path = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 7, np.int16), np.eye(4)), path)
    with pytest.raises(VolumeError) as err:
        read_volume(path)
    assert "constant volume (every voxel is 7)" in _one_line_naming(err, path)
    assert read_volume(path, allow_constant=True).array.max() == 7


def test_a_failed_write_leaves_nothing(tmp_path):
    array = np.ones((3, 3, 3), np.float32)
    array[1, 1, 1] = np.nan
    path = tmp_path / "out" / "bad.nii.gz"
    with pytest.raises(VolumeError) as err:
        write_volume(array, path, affine=np.eye(4))
    assert "NaN or Inf" in _one_line_naming(err, path)
    assert not path.exists() and (not path.parent.exists() or not any(path.parent.iterdir()))
    with pytest.raises(ValueError, match="needs affine="):
        write_volume(np.ones((3, 3, 3)), tmp_path / "x.nii")
    with pytest.raises(ValueError, match="cannot tell the format"):
        write_volume(Volume(np.ones((3, 3, 3)), np.eye(4)), tmp_path / "x.png")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []
