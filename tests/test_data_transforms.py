"""The MONAI pipelines: shapes per phase, geometry, padding, and the NIfTI -> tensor -> NIfTI round trip."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medvae.config import DataConfig, IntensityConfig
from medvae.data import build_transforms, invert_intensity, restore_geometry
from medvae.io import read_volume, write_volume
from phantoms import phantom

# An oblique-free but non-RAS grid: i runs right-to-left (L), j posterior-to-anterior, k inferior-to-superior.
LAS_AFFINE = np.array([[-2.0, 0, 0, 40.0], [0, 1.5, 0, -30.0], [0, 0, 3.0, -20.0], [0, 0, 0, 1]])


def _write(path, array, affine=LAS_AFFINE):
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


def _run(data_config, phase, path, factor=4):
    return build_transforms(data_config, phase, factor)({"image": path, "id": "x", "modality": "MR"})


@pytest.mark.parametrize("shape, factor, expected", [((17, 20, 9), 4, (20, 20, 12)), ((16, 16, 16), 4, (16, 16, 16)),
                                                     ((17, 20, 9), 8, (24, 24, 16)), ((5, 6, 7), 2, (6, 6, 8))])
def test_val_and_infer_pad_only_up_to_the_next_multiple(tmp_path, shape, factor, expected):
    path = _write(tmp_path / "v.nii.gz", phantom(shape), np.diag([2.0, 2.0, 2.0, 1.0]))
    for phase in ("val", "infer"):
        image = _run(DataConfig(), phase, path, factor)["image"]
        assert tuple(image.shape) == (1, *expected) and image.dtype == torch.float32


@pytest.mark.parametrize("shape", [(40, 36, 30), (10, 12, 8)])  # larger and smaller than the patch
def test_train_gives_patches_of_patch_size(tmp_path, shape):
    path = _write(tmp_path / "v.nii.gz", phantom(shape))
    out = _run(DataConfig(patch_size=[16, 24, 16]), "train", path)
    assert tuple(out["image"].shape) == (1, 16, 24, 16)
    assert out["id"] == "x" and out["path"] == path and out["modality"] == "MR"


def test_train_patch_size_must_be_a_multiple_of_the_factor(tmp_path):
    with pytest.raises(ValueError, match=r"data.patch_size \[18, 16, 16\].*downsampling factor 4"):
        build_transforms(DataConfig(patch_size=[18, 16, 16]), "train", 4)


def test_orientation_becomes_ras_and_metadata_travels(tmp_path):
    path = _write(tmp_path / "v.nii.gz", phantom((12, 12, 12)))
    image = _run(DataConfig(), "infer", path)["image"]
    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    assert image.meta["filename_or_obj"] == path and image.meta["modality"] == "MR"
    assert image.meta["intensity"]["preset"] == "mri_percentile"


def test_spacing_resamples_to_the_target_voxel_size(tmp_path):
    path = _write(tmp_path / "v.nii.gz", phantom((20, 20, 10)), np.diag([1.0, 1.0, 3.0, 1.0]))
    image = _run(DataConfig(spacing=[2.0, 2.0, 2.0]), "infer", path, factor=1)["image"]
    # MONAI keeps the span between the first and last voxel centres: floor((n - 1) * old / new + 1)
    assert tuple(image.shape) == (1, 10, 10, 14)
    np.testing.assert_allclose(np.linalg.norm(image.affine.numpy()[:3, :3], axis=0), [2.0, 2.0, 2.0])


def test_padding_uses_the_background_value_not_zero(tmp_path):
    path = _write(tmp_path / "v.nii.gz", phantom((13, 16, 16)), np.diag([2.0, 2.0, 2.0, 1.0]))
    config = DataConfig(intensity=IntensityConfig(preset="zscore", foreground_threshold=100.0))
    image = _run(config, "infer", path)["image"].numpy()[0]
    assert image.shape[0] == 16
    pad_value = image.min()
    assert pad_value < -0.5  # below the foreground mean, which z-scoring maps to 0
    assert np.all(image[0] == pad_value) and np.all(image[-1] == pad_value) and np.all(image[-2] == pad_value)


@pytest.mark.parametrize("intensity", [IntensityConfig(preset="ct_window", window_min=-1100, window_max=1500),
                                       IntensityConfig(lower_percentile=0, upper_percentile=100),
                                       IntensityConfig(preset="zscore")])
def test_nifti_to_tensor_to_nifti_keeps_affine_and_intensities(tmp_path, intensity):
    raw = phantom((17, 13, 10), seed=4, scale=2000.0, offset=-1000.0)
    path = _write(tmp_path / "in.nii.gz", raw)
    modality = "CT" if intensity.preset == "ct_window" else "MR"
    config = DataConfig(modality=modality, intensity=intensity)
    pipeline = build_transforms(config, "infer", 4)
    image = pipeline({"image": path, "id": "x", "modality": modality})["image"]
    assert tuple(image.shape) == (1, 20, 16, 12)

    prediction = invert_intensity(image.as_tensor(), image.meta["intensity"])  # a perfect "reconstruction"
    restored = restore_geometry(prediction, image, pipeline)
    out = write_volume(restored.numpy()[0], tmp_path / "out.nii.gz", affine=restored.affine.numpy(), modality=modality)

    back = read_volume(out)
    assert np.array_equal(back.affine, read_volume(path).affine)  # exactly
    np.testing.assert_allclose(back.array, raw, rtol=1e-5, atol=1e-3)


def test_real_t1_round_trip(nibabel_data):
    """nibabel's anatomical.nii (real T1, LAS): the unclipped voxels come back exactly, clipped ones at the edges."""
    path = str(nibabel_data / "anatomical.nii")
    pipeline = build_transforms(DataConfig(), "infer", 8)
    image = pipeline({"image": path, "id": "t1", "modality": "MR"})["image"]
    assert tuple(image.shape) == (1, 40, 48, 32) and float(image.min()) == 0.0 and float(image.max()) == 1.0
    params = image.meta["intensity"]
    restored = restore_geometry(invert_intensity(image.as_tensor(), params), image, pipeline)
    original = read_volume(path)
    assert np.array_equal(restored.affine.numpy(), original.affine)
    np.testing.assert_allclose(restored.numpy()[0], np.clip(original.array, params["a_min"], params["a_max"]),
                               rtol=1e-5, atol=1e-2)


def test_dicom_series_goes_through_the_same_pipeline(ct5n_folder):
    config = DataConfig(modality="CT", intensity=IntensityConfig(preset="ct_window"))
    out = build_transforms(config, "infer", 4)({"image": str(ct5n_folder), "id": "ct5n", "modality": "CT"})
    image = out["image"]
    assert tuple(image.shape) == (1, 16, 16, 8) and image.meta["units"] == "HU"
    assert image.meta["intensity"] == {"preset": "ct_window", "a_min": -1000.0, "a_max": 1000.0,
                                       "b_min": 0.0, "b_max": 1.0, "clip": True}


def test_a_ct_series_listed_as_mr_is_refused(ct5n_folder):
    with pytest.raises(ValueError, match="CT5N: the file says modality CT but .* says MR"):
        build_transforms(DataConfig(), "infer", 4)({"image": str(ct5n_folder), "id": "ct5n", "modality": "MR"})


def test_crops_per_volume_gives_that_many_distinct_augmented_crops_of_one_volume(tmp_path):
    """data.crops_per_volume=k: the train pipeline returns k crops of the patch size from one loaded volume
    (different places), each carrying the item's metadata; the loader's collate makes them k batch items."""
    from monai.data import list_data_collate

    path = _write(tmp_path / "v.nii.gz", phantom((40, 36, 30)))
    out = _run(DataConfig(patch_size=[16, 16, 16], crops_per_volume=3), "train", path)
    assert isinstance(out, list) and len(out) == 3
    assert all(tuple(o["image"].shape) == (1, 16, 16, 16) and o["id"] == "x" for o in out)
    assert len({o["image"].numpy().tobytes() for o in out}) == 3  # three places, not one crop copied
    batch = list_data_collate([out, _run(DataConfig(patch_size=[16, 16, 16], crops_per_volume=3), "train", path)])
    assert tuple(batch["image"].shape) == (6, 1, 16, 16, 16)


def test_crops_per_volume_is_checked():
    from medvae.config import ConfigError

    with pytest.raises(ConfigError, match="crops_per_volume"):
        DataConfig(crops_per_volume=0)


@pytest.mark.parametrize("noise_std", [0.0, 0.1])
def test_noise_augmentation_adds_zero_mean_noise_of_at_most_noise_std(tmp_path, noise_std):
    """data.augment.noise_std: the train crop is the normalised volume plus Gaussian noise whose std is
    drawn in [0, noise_std]; with 0 (the default) the crop is the volume itself."""
    from medvae.config import AugmentConfig

    path = _write(tmp_path / "v.nii.gz", phantom((16, 16, 16)))
    augment = AugmentConfig(intensity_scale=0.0, intensity_shift=0.0, intensity_prob=1.0, noise_std=noise_std)
    reference = _run(DataConfig(), "val", path)["image"]
    stds = []
    for _ in range(6):
        crop = _run(DataConfig(patch_size=[16, 16, 16], augment=augment), "train", path)["image"]
        stds.append(float((crop - reference).std()))
        assert abs(float((crop - reference).mean())) < 0.01
    if noise_std == 0:
        assert max(stds) == 0.0
    else:
        assert 0.0 < max(stds) <= noise_std * 1.05 and len(set(stds)) > 1  # std varies per crop


def test_noise_std_is_checked():
    from medvae.config import AugmentConfig, ConfigError

    with pytest.raises(ConfigError, match="noise_std"):
        AugmentConfig(noise_std=-0.1)
