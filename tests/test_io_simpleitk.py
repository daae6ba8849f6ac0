"""Geometry cross-check: medvae.io against SimpleITK (ITK + GDCM) on the same real files.

SimpleITK works in LPS with a (z, y, x) array; medvae in RAS+ with (i, j, k). Both are brought to
the closest canonical (RAS) voxel order before comparing, since readers may order slices differently
(GDCM keeps an enhanced file's frame order, medvae orders along the slice normal).
"""

import nibabel as nib
import numpy as np
import pytest

from medvae.io import read_volume, write_volume

sitk = pytest.importorskip("SimpleITK")

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def sitk_volume(image) -> tuple[np.ndarray, np.ndarray]:
    """(array (I, J, K), RAS+ affine) of a SimpleITK image."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), LPS_TO_RAS @ lps


def canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/permute voxel axes so they run closest to R, A, S; the world position of each voxel is kept."""
    orientation = nib.orientations.io_orientation(affine)
    array = nib.orientations.apply_orientation(array, orientation)
    return array, affine @ nib.orientations.inv_ornt_aff(orientation, array.shape)


def assert_same_volume(ours, theirs_array, theirs_affine):
    a, a_affine = canonical(ours.array, ours.affine)
    b, b_affine = canonical(theirs_array, theirs_affine)
    assert a.shape == b.shape
    # One slice has no slice step: each reader assumes one (GDCM takes 1 mm for MR), so skip that column.
    columns = [0, 1, 2, 3] if a.shape[2] > 1 else [0, 1, 3]
    np.testing.assert_allclose(a_affine[:, columns], b_affine[:, columns], atol=1e-3)  # mm
    np.testing.assert_array_equal(a, b.astype(np.float32))


def read_series(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def test_ct5n_series_agrees_with_simpleitk(ct5n_folder):
    ours = read_volume(ct5n_folder)
    array, affine = sitk_volume(read_series(ct5n_folder))
    np.testing.assert_allclose(ours.affine, affine, atol=1e-3)  # same voxel order, not only same world
    assert_same_volume(ours, array, affine)


@pytest.mark.parametrize("name", ["eCT_Supplemental.dcm", "CT_small.dcm", "MR_small.dcm"])
def test_single_files_agree_with_simpleitk(dicom_file, name):
    path = dicom_file(name)
    assert_same_volume(read_volume(path), *sitk_volume(sitk.ReadImage(str(path))))


def test_nifti_agrees_with_simpleitk(nibabel_data):
    path = nibabel_data / "anatomical.nii"
    assert_same_volume(read_volume(path), *sitk_volume(sitk.ReadImage(str(path))))


def test_dicom_written_by_medvae_reads_in_simpleitk(tmp_path):
    rng = np.random.default_rng(1)
    array = rng.integers(-1000, 2000, size=(6, 5, 4)).astype(np.float32)
    affine = np.array([[0.0, -0.7, 0.0, 10.0], [0.9, 0.0, 0.0, -20.0], [0.0, 0.0, 3.0, 5.0], [0, 0, 0, 1.0]])
    folder = write_volume(array, tmp_path / "series", affine=affine, modality="CT", rescale_slope=1.0, rescale_intercept=0.0)
    theirs, their_affine = sitk_volume(read_series(folder))
    np.testing.assert_allclose(their_affine, affine, atol=1e-3)
    np.testing.assert_array_equal(theirs, array)
