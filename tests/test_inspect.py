"""``medvae inspect``: the report for good volumes, and a one-line error with exit 1 for bad ones."""

from __future__ import annotations

import gzip
import re

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from medvae.cli import cli
from phantoms import phantom


def _inspect(*args):
    return CliRunner().invoke(cli, ["inspect", *map(str, args)])


def test_report_for_the_real_t1(nibabel_data):
    result = _inspect(nibabel_data / "anatomical.nii")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "shape        33x41x25 voxels" in out and "spacing      2 x 2 x 2 mm" in out
    assert "orientation  LAS" in out and "LAS -> RAS" in out and "modality     MR" in out
    assert re.search(r"p0\.5 751\.44, p50 8935, p99\.5 13014\.8", out)
    assert "mri_percentile: 0.5th..99.5th percentile = 751.44..13014.8 -> [0, 1]" in out
    assert "padding      33x41x25 -> 36x44x28 (next multiple of the downsampling factor 4)" in out


def test_report_follows_the_config(tmp_path):
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(phantom((20, 20, 10), scale=2000, offset=-1000), np.diag([1, 1, 3, 1])), path)
    (tmp_path / "c.yaml").write_text(
        "model:\n  channels: [8, 16, 16, 16]\n  norm_num_groups: 8\n"
        "data:\n  modality: CT\n  spacing: [2, 2, 2]\n  intensity:\n    preset: ct_window\n"
    )
    result = _inspect("--config", tmp_path / "c.yaml", path, path)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("ct_window: HU -1000..1000 -> [0, 1], clipped") == 2  # one report per input
    assert "1 x 1 x 3 mm -> 2 x 2 x 2 mm: shape 20x20x10 -> 10x10x14" in result.stdout
    assert "10x10x14 -> 16x16x16 (next multiple of the downsampling factor 8)" in result.stdout


def test_4d_with_a_frame(nibabel_data):
    result = _inspect("--frame", "1", nibabel_data / "example4d.nii.gz")
    assert result.exit_code == 0, result.output
    assert "shape        128x96x24 voxels" in result.stdout


def _bad_inputs(folder, nibabel_data):
    affine = np.eye(4)
    cases = {}
    cases["missing"] = folder / "missing.nii.gz"
    (folder / "text.nii").write_text("this is not an image\n" * 40)
    cases["not an image"] = folder / "text.nii"
    good = gzip.compress(nib.Nifti1Image(phantom((16, 16, 16)), affine).to_bytes())
    (folder / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    cases["truncated"] = folder / "truncated.nii.gz"
    nan = phantom((8, 8, 8))
    nan[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, affine), folder / "nan.nii.gz")
    cases["NaN voxels"] = folder / "nan.nii.gz"
    nib.save(nib.Nifti1Image(phantom((16, 16, 1))[..., 0], affine), folder / "flat2d.nii.gz")
    cases["2D"] = folder / "flat2d.nii.gz"
    cases["4D without frame"] = nibabel_data / "example4d.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), 7.0, np.float32), affine), folder / "constant.nii.gz")
    cases["constant"] = folder / "constant.nii.gz"
    (folder / "no_dicom").mkdir()
    (folder / "no_dicom" / "readme.txt").write_text("nothing here")
    cases["folder with no DICOM"] = folder / "no_dicom"
    return cases


CASES = ["missing", "not an image", "truncated", "NaN voxels", "2D", "4D without frame", "constant",
         "folder with no DICOM"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_the_file_and_exit_1(tmp_path, nibabel_data, case):
    path = _bad_inputs(tmp_path, nibabel_data)[case]
    result = _inspect(path)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medvae inspect: error: ") and str(path) in lines[0]
    assert result.stdout == ""


def test_first_bad_input_stops_after_reporting_the_good_ones(tmp_path, nibabel_data):
    result = _inspect(nibabel_data / "anatomical.nii", tmp_path / "missing.nii.gz")
    assert result.exit_code == 1
    assert "33x41x25" in result.stdout and "missing.nii.gz: no such file" in result.stderr
