"""Geometry of generated scans: training records the median voxel size of its volumes, generate writes at it."""

import json

import nibabel as nib
import numpy as np
import pytest

from jobs_helpers import make_export
from medvae.config import load_config
from medvae.data import build_datasets
from medvae.jobs.generate import generate
from phantoms import phantom


def write_mr(folder, spacings, shape=(18, 16, 10)):
    """One MR phantom per voxel size (mm, in RAS order), as NIfTI files with a diagonal affine."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, spacing in enumerate(spacings):
        image = nib.Nifti1Image(phantom(shape, seed=i, scale=800.0, offset=50.0), np.diag([*spacing, 1.0]))
        nib.save(image, folder / f"mr_{i:02d}.nii.gz")
    return folder


def preprocessing_of(tmp_path, spacings, overrides=()):
    """The preprocessing record a training run on volumes of these spacings puts into its export."""
    data = write_mr(tmp_path / "data", spacings)
    config = load_config(None, [f"data.train={data}", "data.val_fraction=0", "data.patch_size=[8,8,8]",
                                "data.cache=none", f"train.output_dir={tmp_path / 'run'}", *overrides])
    _, _, preprocessing = build_datasets(config, downsampling_factor=2)
    return preprocessing


def test_training_records_the_median_spacing_and_generate_writes_at_it(tmp_path):
    spacings = [(1.5, 1.5, 3.0), (1.0, 1.0, 2.5), (2.0, 1.5, 3.0)]
    preprocessing = preprocessing_of(tmp_path, spacings)
    assert preprocessing["spacing"] is None  # trained at each file's own spacing
    assert preprocessing["median_training_spacing"] == [1.5, 1.5, 3.0]

    export = make_export(tmp_path / "export", preprocessing=preprocessing)
    out = generate(export, 1, tmp_path / "gen", prior="standard", shape=(8, 8, 8))
    record = json.loads((out / "generation.json").read_text())
    assert record["spacing_mm"] == [1.5, 1.5, 3.0]
    assert "median" in record["spacing_source"]
    assert nib.load(out / "sample_000.nii.gz").header.get_zooms()[:3] == pytest.approx((1.5, 1.5, 3.0))


def test_a_target_spacing_is_what_training_sees_and_what_generate_writes(tmp_path):
    preprocessing = preprocessing_of(tmp_path, [(1.0, 1.0, 1.0), (1.0, 1.0, 1.0)], ["data.spacing=[2,2,2.5]"])
    assert preprocessing["spacing"] == [2.0, 2.0, 2.5]
    assert preprocessing["median_training_spacing"] == [2.0, 2.0, 2.5]  # resampled before it is measured

    out = generate(make_export(tmp_path / "export", preprocessing=preprocessing), 1, tmp_path / "gen",
                   prior="standard", shape=(8, 8, 8))
    affine = nib.load(out / "sample_000.nii.gz").affine
    assert np.allclose(np.abs(np.diag(affine)[:3]), [2.0, 2.0, 2.5])
    assert json.loads((out / "generation.json").read_text())["spacing_source"].startswith("training spacing")
