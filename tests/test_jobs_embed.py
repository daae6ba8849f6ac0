"""medvae embed: deterministic posterior-mean embeddings, resumable, the same under 1 or 2 processes."""

import csv
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from jobs_helpers import assert_one_line_error, make_export, run_cli, write_ct_phantoms
from medvae.cli import cli
from medvae.export import model_hash
from medvae.jobs.embed import embed, latent_affine
from medvae.jobs.embedding_table import read_table


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("model") / "export")


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scans")
    write_ct_phantoms(folder, count=3)
    return folder


def vectors(path: Path) -> dict[str, np.ndarray]:
    return {row["id"]: row["embedding"] for row in read_table(path)}


def test_the_same_volume_gives_identical_vectors(export, scans, tmp_path):
    copy = tmp_path / "copy" / "again.nii.gz"
    copy.parent.mkdir()
    shutil.copy(scans / "ct_01.nii.gz", copy)
    first = embed(export, tmp_path / "a.parquet", [str(scans), str(copy)])
    second = embed(export, tmp_path / "b.parquet", [str(scans / "ct_01.nii.gz")])
    a, b = vectors(first), vectors(second)
    np.testing.assert_array_equal(a["ct_01"], a["again"])  # same voxels under another name, same run
    np.testing.assert_array_equal(a["ct_01"], b["ct_01"])  # another run
    assert not np.array_equal(a["ct_00"], a["ct_01"])


def test_rows_hold_mean_pooled_latents_shape_and_provenance(export, scans, tmp_path):
    out = embed(export, tmp_path / "e.parquet", [str(scans)], spatial_pool=2, latents_dir=tmp_path / "latents")
    rows = read_table(out)
    assert [r["id"] for r in rows] == ["ct_00", "ct_01", "ct_02"]
    preprocessing = json.loads((export / "config.json").read_text())["preprocessing"]
    for row in rows:
        assert row["path"] == str((scans / f"{row['id']}.nii.gz").resolve())
        assert row["model_hash"] == model_hash(export) and json.loads(row["preprocessing"]) == preprocessing
        assert row["latent_shape"] == [2, 9, 10, 9]  # (18, 20, 17) voxels padded to (18, 20, 18), factor 2
        assert row["embedding"].dtype == np.float32 and row["embedding"].shape == (2,)
        assert row["spatial_embedding"].shape == (2 * 2**3,) and row["sampled"] is False
        latent = nib.load(row["latent_file"]).get_fdata()  # (d, h, w, C)
        assert latent.shape == (9, 10, 9, 2)
        np.testing.assert_allclose(latent.mean(axis=(0, 1, 2)), row["embedding"], rtol=1e-5)
        # the spatial pooling's 8 cells: adaptive cells [floor(i n / 2), ceil((i + 1) n / 2)) per axis,
        # overlapping by one voxel where n is odd (9 -> [0, 5), [4, 9); 10 -> [0, 5), [5, 10))
        spans = [[(0, 5), (4, 9)], [(0, 5), (5, 10)], [(0, 5), (4, 9)]]
        cells = [latent[a0:a1, b0:b1, c0:c1].mean(axis=(0, 1, 2))
                 for (a0, a1) in spans[0] for (b0, b1) in spans[1] for (c0, c1) in spans[2]]
        np.testing.assert_allclose(row["spatial_embedding"].reshape(2, 8), np.stack(cells, axis=1), rtol=1e-5, atol=1e-6)


def test_latent_grid_affine_is_spacing_times_factor_with_origin_at_the_first_latent_voxel(export, tmp_path):
    # A 3 mm LPS-oriented scan with an offset origin: the pipeline reorients to RAS and resamples to 2 mm.
    affine = np.array([[-3.0, 0, 0, 40.0], [0, -3.0, 0, 25.0], [0, 0, 3.0, -12.0], [0, 0, 0, 1]])
    from phantoms import phantom

    path = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(phantom((10, 12, 9), scale=2000.0, offset=-1000.0), affine), path)
    out = embed(export, tmp_path / "e.npz", [str(path)], latents_dir=tmp_path / "latents")
    latent = nib.load(read_table(out)[0]["latent_file"])

    from medvae.jobs.loading import load_for_inference, resolve_inputs

    loaded = load_for_inference(export)
    image = loaded.prepare(resolve_inputs([str(path)], "CT")[0])
    grid = np.asarray(image.affine)
    assert nib.aff2axcodes(latent.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.linalg.norm(latent.affine[:3, :3], axis=0), [4.0, 4.0, 4.0])  # 2 mm x factor 2
    # latent voxel 0 lies at the centre of preprocessed voxels 0 and 1 along each axis
    np.testing.assert_allclose(latent.affine[:3, 3], (grid @ [0.5, 0.5, 0.5, 1.0])[:3], atol=1e-6)
    np.testing.assert_allclose(latent.affine, latent_affine(grid, 2), atol=1e-9)
    assert latent.shape[:3] == tuple(s // 2 for s in image.shape[1:])


@pytest.mark.parametrize("suffix", [".npz", ".csv"])
def test_npz_and_csv_hold_the_same_numbers_as_parquet(export, scans, tmp_path, suffix):
    parquet = read_table(embed(export, tmp_path / "e.parquet", [str(scans)], spatial_pool=1))
    other = read_table(embed(export, tmp_path / f"e{suffix}", [str(scans)], spatial_pool=1))
    assert [r["id"] for r in other] == [r["id"] for r in parquet]
    for a, b in zip(parquet, other):
        np.testing.assert_array_equal(a["embedding"], b["embedding"])
        np.testing.assert_array_equal(a["spatial_embedding"], b["spatial_embedding"])
        assert a["latent_shape"] == b["latent_shape"] and a["model_hash"] == b["model_hash"]
    if suffix == ".csv":
        with open(tmp_path / "e.csv", newline="") as fh:
            header = next(csv.reader(fh))
        assert {"id", "path", "embedding_0", "embedding_1", "spatial_0", "latent_shape", "model_hash"} <= set(header)


def test_resume_skips_ids_already_written(export, scans, tmp_path):
    folder = tmp_path / "scans"
    shutil.copytree(scans, folder)
    out = tmp_path / "e.parquet"
    embed(export, out, [str(folder / "ct_00.nii.gz"), str(folder / "ct_01.nii.gz")])
    before = vectors(out)
    (folder / "ct_00.nii.gz").write_bytes(b"broken")  # never read again: its id is in the output
    embed(export, out, [str(folder)])
    after = read_table(out)
    assert [r["id"] for r in after] == ["ct_00", "ct_01", "ct_02"]
    np.testing.assert_array_equal(after[0]["embedding"], before["ct_00"])
    fresh = vectors(embed(export, tmp_path / "x.npz", [str(scans)]))
    np.testing.assert_array_equal(after[2]["embedding"], fresh["ct_02"])


def test_a_bad_volume_keeps_the_rows_flushed_before_it_and_nothing_after(export, scans, tmp_path):
    folder = tmp_path / "scans"
    shutil.copytree(scans, folder)
    (folder / "ct_02.nii.gz").write_bytes(b"broken")
    out, latents = tmp_path / "e.parquet", tmp_path / "latents"
    with pytest.raises(ValueError, match="ct_02.nii.gz"):
        embed(export, out, [str(folder)], latents_dir=latents, flush_every=2)
    assert [r["id"] for r in read_table(out)] == ["ct_00", "ct_01"]  # the complete rows of the first flush
    assert sorted(p.name for p in latents.iterdir()) == ["ct_00.nii.gz", "ct_01.nii.gz"]
    with pytest.raises(ValueError, match="ct_02.nii.gz"):  # without a flush before the bad file: nothing at all
        embed(export, tmp_path / "f.parquet", [str(folder)], latents_dir=tmp_path / "l2")
    assert not (tmp_path / "f.parquet").exists() and not (tmp_path / "l2").exists()


def test_sampling_happens_only_when_asked_and_is_seeded(export, scans, tmp_path):
    inputs = [str(scans / "ct_00.nii.gz")]
    mean = vectors(embed(export, tmp_path / "m.npz", inputs))["ct_00"]
    sampled = [vectors(embed(export, tmp_path / f"s{i}.npz", inputs, sample=True, seed=seed))["ct_00"]
               for i, seed in enumerate([0, 0, 1])]
    np.testing.assert_array_equal(sampled[0], sampled[1])
    assert not np.array_equal(sampled[0], sampled[2]) and not np.array_equal(sampled[0], mean)
    assert read_table(tmp_path / "s0.npz")[0]["sampled"] is True


def test_dicom_series_and_csv_datalist_inputs(export, scans, ct5n_folder, tmp_path):
    datalist = tmp_path / "list.csv"
    datalist.write_text(f"image,id\n{scans / 'ct_00.nii.gz'},patient-a\n{ct5n_folder},patient-b\n")
    rows = read_table(embed(export, tmp_path / "e.parquet", [str(datalist)], scatter=tmp_path / "pca.png"))
    assert [r["id"] for r in rows] == ["patient-a", "patient-b"]
    assert rows[1]["path"] == str(ct5n_folder.resolve())
    with Image.open(tmp_path / "pca.png") as scatter:
        assert scatter.size == (480, 480)


@pytest.mark.slow
def test_two_processes_give_the_same_file_as_one(export, scans, tmp_path):
    folder = tmp_path / "scans"
    shutil.copytree(scans, folder)
    for path in write_ct_phantoms(tmp_path / "more", count=2, shape=(16, 18, 20)):
        path.rename(folder / f"extra_{path.name}")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    common = ["--model", export, "--spatial-pool", "2", folder]
    single = run_cli("embed", "--out", tmp_path / "one.parquet", *common)
    assert single.returncode == 0, single.stderr
    double = run_cli("embed", "--out", tmp_path / "two.parquet", "--batch-size", "2", *common, launcher=launcher)
    assert double.returncode == 0, double.stderr
    one, two = read_table(tmp_path / "one.parquet"), read_table(tmp_path / "two.parquet")
    assert [r["id"] for r in one] == [r["id"] for r in two] == [
        "ct_00", "ct_01", "ct_02", "extra_ct_00", "extra_ct_01"]
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a["embedding"], b["embedding"])
        np.testing.assert_array_equal(a["spatial_embedding"], b["spatial_embedding"])
        assert a["latent_shape"] == b["latent_shape"] and a["path"] == b["path"]


@pytest.mark.parametrize("case", ["missing_input", "broken_volume", "bad_suffix", "other_model", "bad_datalist"])
def test_bad_input_is_one_line_and_writes_nothing(export, scans, tmp_path, case):
    out = tmp_path / "e.parquet"
    inputs, needle = [str(scans)], ""
    if case == "missing_input":
        inputs, needle = [str(tmp_path / "nothere.nii.gz")], "nothere.nii.gz: no such"
    elif case == "broken_volume":
        (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
        inputs, needle = [str(tmp_path / "broken.nii.gz")], "broken.nii.gz: not a readable NIfTI"
    elif case == "bad_suffix":
        out, needle = tmp_path / "e.txt", "must end in .parquet, .npz or .csv"
    elif case == "other_model":
        embed(make_export(tmp_path / "other", seed=1), out, [str(scans / "ct_00.nii.gz")])
        needle = "another model"
    elif case == "bad_datalist":
        (tmp_path / "list.csv").write_text("path\nx.nii.gz\n")
        inputs, needle = [str(tmp_path / "list.csv")], "needs an 'image' column"
    before = out.read_bytes() if out.exists() else None
    result = CliRunner().invoke(cli, ["embed", "--model", str(export), "--out", str(out),
                                      "--latents-dir", str(tmp_path / "latents"), *inputs])
    assert_one_line_error(result, needle)
    assert (out.read_bytes() if out.exists() else None) == before
    assert not (tmp_path / "latents").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
