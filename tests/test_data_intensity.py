"""Intensity presets: forward then inverse is the identity; parameters recorded; bad volumes refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medvae.config import DataConfig, IntensityConfig
from medvae.data.intensity import (
    intensity_transform,
    invert_intensity,
    preprocessing_description,
    summarize_intensity,
)
from phantoms import phantom

PRESETS = {
    # CT in HU: air -1000, tissue around 0..100, bone up to ~1000 (inside the window, so no clipping)
    "ct_window": (IntensityConfig(preset="ct_window", window_min=-1100, window_max=1200), -1000.0, 1900.0),
    "mri_percentile": (IntensityConfig(preset="mri_percentile", lower_percentile=0, upper_percentile=100), 0.0, 5000.0),
    "zscore": (IntensityConfig(preset="zscore", foreground_threshold=100.0), 0.0, 800.0),
}


def _image(values: np.ndarray, source="phantom.nii.gz") -> MetaTensor:
    return MetaTensor(torch.from_numpy(values[None]), meta={"filename_or_obj": source})


@pytest.mark.parametrize("preset", list(PRESETS))
def test_forward_then_inverse_is_identity(preset):
    config, offset, scale = PRESETS[preset]
    raw = phantom((12, 14, 10), seed=1, scale=scale, offset=offset)
    out = intensity_transform(config)({"image": _image(raw)})["image"]
    params = out.meta["intensity"]
    assert params["preset"] == preset
    assert not np.allclose(out.numpy()[0], raw)  # it did change the values
    back = invert_intensity(out, params)
    np.testing.assert_allclose(np.asarray(back)[0], raw, rtol=1e-5, atol=1e-6 * scale)
    back_np = invert_intensity(out.numpy(), params)  # numpy in, numpy out
    assert isinstance(back_np, np.ndarray)
    np.testing.assert_allclose(back_np[0], raw, rtol=1e-5, atol=1e-6 * scale)


def test_ct_window_scales_to_unit_range_and_clips_to_the_edges():
    hu = np.array([-1024.0, -1000.0, 0.0, 1000.0, 3000.0], dtype=np.float32).reshape(1, 1, 5)
    out = intensity_transform(IntensityConfig(preset="ct_window"))({"image": _image(hu)})["image"]
    np.testing.assert_allclose(out.numpy().ravel(), [0.0, 0.0, 0.5, 1.0, 1.0])
    back = invert_intensity(out.numpy().ravel(), out.meta["intensity"])
    np.testing.assert_allclose(back, [-1000.0, -1000.0, 0.0, 1000.0, 1000.0])  # clipped -> window edges


def test_percentile_parameters_are_measured_on_the_volume():
    raw = phantom((16, 16, 16), seed=2, scale=3000.0)
    out = intensity_transform(IntensityConfig())({"image": _image(raw)})["image"]
    params = out.meta["intensity"]
    np.testing.assert_allclose([params["a_min"], params["a_max"]], np.percentile(raw, [0.5, 99.5]), rtol=1e-6)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0


def test_zscore_statistics_come_from_the_foreground_only():
    raw = phantom((16, 16, 16), seed=3, scale=1000.0)
    out = intensity_transform(IntensityConfig(preset="zscore", foreground_threshold=100.0))({"image": _image(raw)})
    normalised = out["image"].numpy()[0]
    foreground = raw > 100.0
    assert abs(normalised[foreground].mean()) < 1e-4 and abs(normalised[foreground].std() - 1) < 1e-4
    assert normalised[~foreground].max() < normalised[foreground].min()


@pytest.mark.parametrize("preset, message", [("mri_percentile", "percentile"), ("zscore", "foreground")])
def test_a_flat_volume_is_refused_naming_the_file(preset, message):
    raw = np.zeros((8, 8, 8), dtype=np.float32)
    raw[0, 0, 0] = 5.0  # not constant, but both percentiles (and the foreground) are degenerate
    with pytest.raises(ValueError, match=rf"flat\.nii\.gz: .*{message}"):
        intensity_transform(IntensityConfig(preset=preset))({"image": _image(raw, "flat.nii.gz")})


def test_description_of_a_fixed_window_inverts_generated_values():
    description = preprocessing_description(DataConfig(modality="CT", intensity=IntensityConfig(preset="ct_window")))
    assert description["units"] == "HU" and description["orientation"] == "RAS"
    assert invert_intensity(np.array([0.0, 0.5, 1.0]), description["intensity"]).tolist() == [-1000.0, 0.0, 1000.0]


def test_description_of_a_per_volume_preset_carries_training_medians():
    per_volume = [{"preset": "mri_percentile", "lower_percentile": 0.5, "upper_percentile": 99.5,
                   "a_min": a, "a_max": b, "b_min": 0.0, "b_max": 1.0, "clip": True}
                  for a, b in [(0.0, 100.0), (10.0, 300.0), (20.0, 200.0)]]
    stats = summarize_intensity(per_volume)
    description = preprocessing_description(DataConfig(spacing=[2, 2, 2]), stats, downsampling_factor=4)
    intensity = description["intensity"]
    assert (intensity["a_min"], intensity["a_max"], intensity["num_volumes"]) == (10.0, 200.0, 3)
    assert intensity["per_volume"] is True and description["spacing"] == [2.0, 2.0, 2.0]
    assert description["pad_to_multiple_of"] == 4
    assert invert_intensity(np.array([1.0]), intensity).tolist() == [200.0]


def test_description_without_stats_cannot_invert_a_per_volume_preset():
    description = preprocessing_description(DataConfig(intensity=IntensityConfig(preset="zscore")))
    with pytest.raises(ValueError, match="lack a value"):
        invert_intensity(np.zeros(2), description["intensity"])
