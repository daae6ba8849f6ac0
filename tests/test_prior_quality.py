"""Sample measures without a download (Fréchet distance, MMD, intensity, foreground and noise distances) and the copy check."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from jobs_helpers import assert_one_line_error, make_export, write_ct_phantoms
from medvae.cli import cli
from medvae.prior.quality import (copy_check, copy_threshold, frechet_distance, intensity_distance, mmd, nearest_distances,
                                  noise_distance, noise_level)


def test_frechet_distance_and_mmd_grow_with_the_gap_between_sets():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    near, far = frechet_distance(a, b), frechet_distance(a, b + 2.0)
    assert near < 0.2 and far == pytest.approx(16.0 + near, rel=0.1)  # ||mu||^2 = 4 * 2^2
    assert abs(mmd(a, b)) < 0.02 and mmd(a, b + 2.0) > 0.3


def test_intensity_distance_is_in_real_units():
    rng = np.random.default_rng(1)
    volumes = [rng.normal(0.0, 100.0, size=4000) for _ in range(2)]
    shifted = [v + 300.0 for v in volumes]
    assert intensity_distance(volumes, shifted) == pytest.approx(300.0, rel=0.05)  # W1 of a shift is the shift


def test_noise_level_reads_white_noise_in_its_units_and_ignores_smooth_anatomy():
    rng = np.random.default_rng(2)
    grids = np.meshgrid(*[np.arange(40.0)] * 3, indexing="ij")
    anatomy = 30.0 * grids[0] - 12.0 * grids[2] + 1000.0 * (grids[1] > 20)  # ramps and one sharp edge
    noise = rng.normal(0.0, 25.0, size=anatomy.shape)
    assert noise_level(anatomy) < 0.5  # flat, linear and a sparse edge: no noise
    assert noise_level(anatomy + noise) == pytest.approx(25.0, rel=0.08)
    assert noise_level((anatomy + noise)[None]) == noise_level(anatomy + noise)  # (1, D, H, W) as well
    blocks = np.kron(rng.normal(0.0, 40.0, size=(10, 10, 10)), np.ones((4, 4, 4)))  # random 4^3 block offsets
    assert noise_level(anatomy + blocks) > 5.0  # block artefacts read as texture (flat: < 0.5)
    assert noise_distance([25.0, 26.0], [50.0, 50.0]) == pytest.approx(1.0, abs=0.06)  # twice as noisy: 1
    assert noise_distance([50.0], [25.0]) == noise_distance([25.0], [50.0])
    assert noise_distance([0.0], [0.0]) == 0.0
    with pytest.raises(ValueError, match="3-D"):
        noise_level(np.zeros((8, 8)))


def test_copy_check_flags_grids_nearer_than_the_held_out_floor():
    g = torch.Generator().manual_seed(0)
    training = torch.randn(5, 2, 4, 4, 4, generator=g)
    held_out = torch.randn(3, 2, 4, 4, 4, generator=g)
    threshold = copy_threshold(nearest_distances(held_out, training))
    samples = torch.stack([training[2], training[3] + 0.01, torch.randn(2, 4, 4, 4, generator=g)])
    check = copy_check(nearest_distances(samples, training), threshold)
    assert check["flagged"] == [True, True, False] and check["flagged_fraction"] == pytest.approx(2 / 3)
    leave_one_out = nearest_distances(training, training, exclude_self=True)
    assert (leave_one_out > 0).all()


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """A tiny CT export, 4 training phantoms, 2 held-out phantoms (16^3, 2 mm)."""
    root = tmp_path_factory.mktemp("quality")
    export = make_export(root / "export")
    paths = write_ct_phantoms(root / "all", count=6, shape=(16, 16, 16))
    for name, chosen in (("train", paths[:4]), ("heldout", paths[4:5]), ("other", paths[5:])):
        (root / name).mkdir()
        for path in chosen:
            shutil.copy(path, root / name / path.name)
    return root, export, paths


def test_held_out_real_scans_rank_closer_to_training_than_standard_normal_samples(volumes, tmp_path):
    from medvae.jobs.evaluate_samples import evaluate_samples
    from medvae.jobs.generate import generate

    root, export, paths = volumes
    noise = generate(export, 4, tmp_path / "noise", seed=0, prior="standard", shape=(16, 16, 16))
    standard = evaluate_samples(export, [str(noise)], [str(root / "train")])
    real = evaluate_samples(export, [str(root / "heldout"), str(root / "other")], [str(root / "train")])
    for measure in ("frechet_distance", "mmd", "intensity_w1", "foreground_difference"):
        assert real["samples_vs_train"][measure] < standard["samples_vs_train"][measure], measure


def test_noisy_samples_read_farther_from_training_than_held_out_scans_by_texture(volumes, tmp_path):
    import nibabel as nib

    from medvae.jobs.evaluate_samples import evaluate_samples

    root, export, paths = volumes
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    rng = np.random.default_rng(3)
    for path in paths[4:]:  # the held-out phantoms with 150 HU of extra noise: same anatomy, wrong texture
        image = nib.load(path)
        voxels = image.get_fdata() + rng.normal(0.0, 150.0, size=image.shape)
        nib.save(nib.Nifti1Image(voxels.astype(np.float32), image.affine, image.header), noisy / path.name)
    report = evaluate_samples(export, [str(noisy)], [str(root / "train")], [str(root / "heldout")])
    floor = report["floor_heldout_vs_train"]["noise_log2_ratio"]
    assert report["samples_vs_train"]["noise_log2_ratio"] > floor + 1.0
    assert report["noise_levels"]["samples"] > 2 * report["noise_levels"]["train"]
    assert "HU" in report["feature_spaces"]["noise_log2_ratio"]


def test_copy_check_flags_an_exact_copy_of_a_training_scan_but_not_a_held_out_one(volumes, tmp_path):
    root, export, paths = volumes
    samples = tmp_path / "samples"
    samples.mkdir()
    shutil.copy(paths[1], samples / "copied.nii.gz")  # a training scan passed off as synthetic
    shutil.copy(paths[5], samples / "new_patient.nii.gz")  # a real scan the model never saw
    result = CliRunner().invoke(cli, ["evaluate-samples", "--model", str(export), "--samples", str(samples),
                                      "--train", str(root / "train"), "--heldout", str(root / "heldout"),
                                      "--json", str(tmp_path / "q.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "q.json").read_text())
    flags = dict(zip(report["copy_check"]["sample_ids"], report["copy_check"]["flagged"]))
    assert flags == {"copied": True, "new_patient": False}
    assert report["flagged_copy_fraction"] == 0.5 and report["copy_check"]["nearest_training_distance"][0] == 0.0
    assert set(report) >= {"samples_vs_train", "samples_vs_heldout", "floor_heldout_vs_train", "feature_spaces"}
    assert "HU" in report["feature_spaces"]["intensity_w1"]
    assert "1 of 2 samples flagged" in result.output


def test_evaluate_samples_bad_input_is_one_line(volumes, tmp_path):
    root, export, paths = volumes
    result = CliRunner().invoke(cli, ["evaluate-samples", "--model", str(export), "--samples", str(tmp_path / "none"),
                                      "--train", str(root / "train")])
    assert result.exit_code == 1
    assert_one_line_error(result, str(tmp_path / "none"))
