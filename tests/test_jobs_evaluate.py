"""medvae evaluate: PSNR, SSIM, MS-SSIM per volume and aggregated, plus MAE in HU for CT."""

import json
import statistics

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from jobs_helpers import assert_one_line_error, make_export, mr_preprocessing, write_ct_phantoms
from medvae.cli import cli
from medvae.jobs.evaluate import evaluate, ms_ssim_settings, ssim_kernel
from medvae.jobs.reconstruct import reconstruct
from phantoms import write_phantoms


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("model") / "export")


def test_ct_report_matches_the_written_reconstructions(export, tmp_path, capsys):
    # Scans at the training spacing (2 mm, RAS): the model's grid is the file's grid, so evaluate's
    # numbers can be recomputed from reconstruct's output files.
    scans = write_ct_phantoms(tmp_path / "scans", count=2)
    report = evaluate(export, [str(tmp_path / "scans")], json_file=tmp_path / "scores.json")
    assert json.loads((tmp_path / "scores.json").read_text()) == json.loads(json.dumps(report))
    assert "[0, 1]" in report["intensity_range"] and "ct_window" in report["intensity_range"]
    printed = capsys.readouterr().out
    assert "[0, 1]" in printed and "mae_hu" in printed and "median" in printed

    out = reconstruct(export, tmp_path / "recon", [str(tmp_path / "scans")])
    for scan, volume in zip(scans, report["volumes"]):
        truth = np.clip(nib.load(scan).get_fdata(), -1000, 1000)
        recon = nib.load(out / scan.name).get_fdata()
        assert volume["mae_hu"] == pytest.approx(np.abs(recon - truth).mean(), rel=1e-4)
        mse = np.mean(((recon - truth) / 2000.0) ** 2)  # on the normalised [0, 1] scale
        assert volume["psnr"] == pytest.approx(10 * np.log10(1.0 / mse), rel=1e-4)
        assert 0 < volume["ssim"] < 1 and 0 < volume["ms_ssim"] < 1
        assert volume["ms_ssim_window"] == 7 and volume["ms_ssim_scales"] == 2  # 17 voxels: 2 scales of 7
    for name in ("psnr", "ssim", "ms_ssim", "mae_hu"):
        values = [v[name] for v in report["volumes"]]
        assert report["aggregate"][name]["mean"] == pytest.approx(statistics.fmean(values))
        assert report["aggregate"][name]["median"] == pytest.approx(statistics.median(values))


def test_mr_report_has_no_hu_error(tmp_path):
    export = make_export(tmp_path / "mr", preprocessing=mr_preprocessing())
    write_phantoms(tmp_path / "scans", count=1, shape=(12, 14, 16))
    report = evaluate(export, [str(tmp_path / "scans")])
    assert "mae_hu" not in report["volumes"][0] and "mae_hu" not in report["aggregate"]
    assert "mri_percentile" in report["intensity_range"]


def test_window_and_scale_choices_fit_the_volume():
    assert ms_ssim_settings(200)[0] == 11 and len(ms_ssim_settings(200)[1]) == 5
    window, weights = ms_ssim_settings(40)
    assert window == 11 and len(weights) == 2 and sum(weights) == pytest.approx(1.0)
    assert ms_ssim_settings(16)[0] == 7 and ms_ssim_settings(4) == (3, (1.0,)) and ms_ssim_settings(2) is None
    assert ssim_kernel(64) == 11 and ssim_kernel(8) == 7 and ssim_kernel(2) is None


@pytest.mark.parametrize("case", ["broken_volume", "missing_model"])
def test_bad_input_is_one_line_and_writes_nothing(export, tmp_path, case):
    scans = write_ct_phantoms(tmp_path / "scans", count=1)
    model = export if case == "broken_volume" else tmp_path / "nomodel"
    (tmp_path / "scans" / "z_broken.nii").write_bytes(b"broken")
    needle = "z_broken.nii:" if case == "broken_volume" else "no such model folder"
    result = CliRunner().invoke(cli, ["evaluate", "--model", str(model), "--json", str(tmp_path / "s.json"),
                                      str(scans[0].parent)])
    assert_one_line_error(result, needle)
    assert not (tmp_path / "s.json").exists() and "volume" not in result.stdout
