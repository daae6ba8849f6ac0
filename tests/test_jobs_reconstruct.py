"""medvae reconstruct: reconstructions in the inputs' own units and geometry, all or nothing."""

import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from jobs_helpers import assert_one_line_error, make_export, write_ct_phantoms
from medvae.cli import cli
from medvae.export import model_hash
from medvae.io import read_volume
from medvae.jobs.reconstruct import reconstruct
from phantoms import phantom


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("model") / "export")


def test_nifti_in_another_orientation_and_spacing_comes_back_on_its_own_grid_in_hu(export, tmp_path):
    # 3 mm, LPS-like axes, odd sizes: the pipeline reorients, resamples to 2 mm and pads; all of it is undone.
    affine = np.array([[-3.0, 0, 0, 40.0], [0, -3.0, 0, 25.0], [0, 0, 3.0, -12.0], [0, 0, 0, 1]])
    source = tmp_path / "in" / "scan.nii"
    source.parent.mkdir()
    image = nib.Nifti1Image(phantom((11, 13, 9), scale=2400.0, offset=-1200.0), affine)
    image.header["descrip"] = b"medvae modality=CT units=HU"
    nib.save(image, source)
    out = reconstruct(export, tmp_path / "out", [str(source)])
    result = nib.load(out / "scan.nii")  # the same file name
    assert result.shape == (11, 13, 9)
    np.testing.assert_allclose(result.affine, affine, atol=1e-5)
    data = result.get_fdata()
    assert -1000.0 <= data.min() and data.max() <= 1000.0 and data.max() - data.min() > 100.0  # HU window
    assert b"units=HU" in result.header["descrip"].tobytes()
    record = json.loads((out / "reconstruction.json").read_text())
    assert record["model_hash"] == model_hash(export)
    assert record["volumes"] == [{"id": "scan", "input": str(source.resolve()), "output": "scan.nii"}]


def test_dicom_series_becomes_a_nifti_with_the_series_geometry(export, ct5n_folder, tmp_path):
    out = reconstruct(export, tmp_path / "out", [str(ct5n_folder)])
    original = read_volume(ct5n_folder)
    result = read_volume(out / f"{ct5n_folder.name}.nii.gz")
    assert result.shape == original.shape and result.modality == "CT" and result.units == "HU"
    np.testing.assert_allclose(result.affine, original.affine, atol=1e-4)


def test_same_output_names_are_refused_before_anything_is_written(export, tmp_path):
    first = write_ct_phantoms(tmp_path / "a", count=1)[0]
    second = write_ct_phantoms(tmp_path / "b", count=1)[0]
    datalist = tmp_path / "list.csv"
    datalist.write_text(f"image,id\n{first},one\n{second},two\n")
    with pytest.raises(ValueError, match="like that of"):
        reconstruct(export, tmp_path / "out", [str(datalist)])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["broken_second_volume", "missing_input", "out_not_empty"])
def test_bad_input_is_one_line_and_writes_nothing(export, tmp_path, case):
    good = write_ct_phantoms(tmp_path / "scans", count=1)[0]
    out = tmp_path / "out"
    inputs = [str(good)]
    if case == "broken_second_volume":
        (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b broken")
        inputs.append(str(tmp_path / "broken.nii.gz"))
        needle = "broken.nii.gz:"
    elif case == "missing_input":
        inputs.append(str(tmp_path / "missing"))
        needle = "missing: no such"
    else:
        out.mkdir()
        (out / "keep.nii.gz").write_bytes(b"mine")
        needle = "not an empty folder"
    result = CliRunner().invoke(cli, ["reconstruct", "--model", str(export), "--out", str(out), *inputs])
    assert_one_line_error(result, needle)
    assert (not out.exists()) if case != "out_not_empty" else [p.name for p in out.iterdir()] == ["keep.nii.gz"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
