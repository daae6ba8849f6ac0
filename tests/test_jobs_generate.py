"""medvae generate: synthetic scans in real units with a proper geometry, from the standard or fitted prior."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from jobs_helpers import assert_one_line_error, make_export, mr_preprocessing
from medvae.cli import cli
from medvae.export import load_model, model_hash
from medvae.jobs.generate import centred_affine, generate
from medvae.prior import LatentPrior, load_prior, save_prior
from medvae.tracking.preview import GAP, LABEL_HEIGHT, MIN_PANEL_PX, mid_slices, preview_size, readable_scale

SPACING = 2.0


@pytest.fixture(scope="module")
def ct_export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("ct") / "export")


def test_nifti_scans_have_the_shape_spacing_centred_affine_and_hu_units(ct_export, tmp_path):
    out = generate(ct_export, 2, tmp_path / "gen", seed=3, prior="standard", shape=(16, 12, 8))
    record = json.loads((out / "generation.json").read_text())
    assert record["prior"] == "standard" and record["seed"] == 3 and record["temperature"] == 1.0
    assert record["model_hash"] == model_hash(ct_export) and record["units"] == "HU"
    expected = np.array([[SPACING, 0, 0, -SPACING * 15 / 2], [0, SPACING, 0, -SPACING * 11 / 2],
                         [0, 0, SPACING, -SPACING * 7 / 2], [0, 0, 0, 1]])
    for sample in record["samples"]:
        image = nib.load(out / sample["file"])
        data = image.get_fdata()
        assert image.shape == (16, 12, 8)
        np.testing.assert_allclose(image.affine, expected)
        np.testing.assert_allclose(image.header.get_zooms(), [SPACING] * 3)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        centre = image.affine @ np.array([7.5, 5.5, 3.5, 1.0])
        np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
        assert b"units=HU" in image.header["descrip"].tobytes()
        assert -1000.0 <= data.min() and data.max() <= 1000.0  # the HU window of the ct_window preset
        assert data.max() - data.min() > 100.0  # real HU, not the normalised [0, 1] scale
        with Image.open(out / sample["preview"]) as preview:  # small volumes are enlarged to be readable
            scale = readable_scale((16, 12, 8))
            assert scale * 16 >= MIN_PANEL_PX and preview.size == preview_size((16, 12, 8), 1, scale)
    with Image.open(out / "montage.png") as montage:  # two tiles side by side, the longer side >= MIN_PANEL_PX
        assert montage.mode == "L"
        rows_px, cols_px = (side * readable_scale((16, 12, 8)) for side in mid_slices(np.zeros((16, 12, 8)))[0].shape)
        assert max(rows_px, cols_px) >= MIN_PANEL_PX
        assert montage.size == (GAP + 2 * (cols_px + GAP), GAP + LABEL_HEIGHT + rows_px + GAP)


def test_seed_reproduces_and_temperature_scales(ct_export, tmp_path):
    def arrays(name, **kwargs):
        out = generate(ct_export, 2, tmp_path / name, prior="standard", **kwargs)
        return [nib.load(out / f"sample_{i:03d}.nii.gz").get_fdata() for i in range(2)]

    first, again, other = arrays("a", seed=7), arrays("b", seed=7), arrays("c", seed=8)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0]) and not np.array_equal(first[0], first[1])
    cold = arrays("d", seed=7, temperature=0.0)
    np.testing.assert_array_equal(cold[0], cold[1])  # no noise: every sample decodes the prior mean


def test_fitted_prior_sets_the_shape_and_its_mean_is_what_is_decoded(tmp_path):
    export = make_export(tmp_path / "export")
    shape = (2, 5, 4, 3)
    mean = torch.linspace(-2, 2, int(np.prod(shape))).reshape(shape)
    save_prior(LatentPrior(mean, 0.5 * torch.ones(shape), torch.zeros((0, *shape)), {"kind": "diagonal"}), export)
    with pytest.raises(ValueError, match="fitted prior makes volumes of 10 8 6"):
        generate(export, 1, tmp_path / "bad", prior="fitted", shape=(16, 16, 16))
    assert not (tmp_path / "bad").exists()

    out = generate(export, 2, tmp_path / "cold", prior="fitted", temperature=0.0)
    record = json.loads((out / "generation.json").read_text())
    assert record["prior"] == "fitted" and record["prior_description"]["kind"] == "diagonal"
    assert record["latent_shape"] == list(shape) and record["shape"] == [10, 8, 6]
    # At temperature 0 the latent is the prior's mean: the scan is its decoding, in HU.
    with torch.no_grad():
        decoded = load_model(export).decode(mean[None])[0, 0].clamp(0, 1) * 2000 - 1000
    scan = nib.load(out / "sample_000.nii.gz").get_fdata()
    np.testing.assert_allclose(scan, decoded.numpy(), atol=1e-2)

    # With noise, the samples scatter around the decoded mean: their latents average to the prior mean.
    prior = load_prior(export)
    latents = prior.sample(200, torch.Generator().manual_seed(0))
    assert (latents.mean(0) - mean).abs().max() < 5 * 0.5 / 200**0.5


def test_dicom_output_reads_back_as_one_series_with_consistent_geometry(ct_export, tmp_path):
    from medvae.io import read_volume

    dicom = generate(ct_export, 1, tmp_path / "dcm", seed=1, prior="standard", shape=(8, 10, 6), out_format="dicom")
    nifti = generate(ct_export, 1, tmp_path / "nii", seed=1, prior="standard", shape=(8, 10, 6))
    volume = read_volume(dicom / "sample_000")
    reference = nib.load(nifti / "sample_000.nii.gz")
    assert volume.shape == (8, 10, 6) and volume.modality == "CT" and volume.units == "HU"
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-4)
    np.testing.assert_allclose(volume.array, reference.get_fdata(), atol=0.1)  # int16 storage with a rescale
    files = sorted((dicom / "sample_000").glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    assert len(files) == 6 and len({d.SeriesInstanceUID for d in datasets}) == 1
    assert {d.Modality for d in datasets} == {"CT"}
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
    steps = np.diff(positions, axis=0)
    np.testing.assert_allclose(steps, np.tile(steps[0], (len(steps), 1)), atol=1e-4)  # evenly spaced slices
    assert abs(np.linalg.norm(steps[0]) - SPACING) < 1e-4
    assert [float(v) for v in datasets[0].PixelSpacing] == [SPACING, SPACING]
    assert "standard prior" in datasets[0].SeriesDescription


def test_mr_export_without_training_spacing_uses_1mm_and_says_so(tmp_path):
    export = make_export(tmp_path / "mr", preprocessing=mr_preprocessing())
    out = generate(export, 1, tmp_path / "gen", prior="standard")  # default shape: the training patch
    record = json.loads((out / "generation.json").read_text())
    assert record["shape"] == [16, 16, 16] and record["spacing_mm"] == [1.0, 1.0, 1.0]
    assert "assumed" in record["spacing_source"] and record["units"] == "arbitrary"
    data = nib.load(out / "sample_000.nii.gz").get_fdata()
    assert 10.0 <= data.min() and data.max() <= 900.0  # the training set's median percentile range


def test_centred_affine_follows_the_orientation_code():
    affine = centred_affine((4, 6, 8), [1.0, 2.0, 3.0], "LPS")
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    np.testing.assert_allclose(affine @ np.array([1.5, 2.5, 3.5, 1.0]), [0, 0, 0, 1], atol=1e-12)
    with pytest.raises(ValueError, match="axis code"):
        centred_affine((4, 4, 4), [1, 1, 1], "RRS")


@pytest.mark.parametrize("case", ["no_prior", "bad_shape", "out_not_empty", "no_model"])
def test_bad_input_is_one_line_and_writes_nothing(ct_export, tmp_path, case):
    out = tmp_path / "out"
    args = ["generate", "--model", str(ct_export), "--out", str(out)]
    needle = {"no_prior": "no fitted prior", "bad_shape": "multiple of the model's downsampling factor 2",
              "out_not_empty": "not an empty folder", "no_model": "no such model folder"}[case]
    if case == "bad_shape":
        args += ["--prior", "standard", "--shape", "16", "15", "16"]
    elif case == "out_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        args += ["--prior", "standard"]
    elif case == "no_model":
        args[2] = str(tmp_path / "missing")
    result = CliRunner().invoke(cli, args)
    assert_one_line_error(result, needle)
    if case == "out_not_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left


@pytest.mark.slow
def test_a_trained_run_fits_a_prior_that_generate_and_embed_use(tmp_path):
    """End to end: train a few steps (the prior is fitted at export), then generate and embed from the run folder."""
    from phantoms import write_phantoms
    from training_helpers import TINY_TRAINING, run_medvae_train

    from medvae.jobs.embed import embed
    from medvae.jobs.embedding_table import read_table

    write_phantoms(tmp_path / "data", count=5, shape=(20, 18, 20))
    run = tmp_path / "run"
    result = run_medvae_train(tmp_path, TINY_TRAINING + [f"data.train={tmp_path / 'data'}", f"train.output_dir={run}",
                                                         "train.max_steps=3", "tracking.wandb_mode=disabled"])
    assert result.returncode == 0, result.stderr[-3000:]
    prior = load_prior(run)
    described = json.loads((run / "export" / "config.json").read_text())["extra"]["prior"]
    assert described["num_volumes"] == 4  # the training split (one of 5 held out for validation)
    assert described["latent_shape"] == [2, 10, 9, 10] == list(prior.latent_shape)
    assert described["model_hash"] == model_hash(run)

    out = generate(run, 2, tmp_path / "gen", seed=0)  # fitted is the default
    record = json.loads((out / "generation.json").read_text())
    assert record["prior"] == "fitted" and record["shape"] == [20, 18, 20]
    assert nib.load(out / "sample_001.nii.gz").shape == (20, 18, 20)

    rows = read_table(embed(run, tmp_path / "e.parquet", [str(tmp_path / "data")]))
    assert len(rows) == 5 and {r["model_hash"] for r in rows} == {model_hash(run)}
