"""A corpus of hostile but realistic inputs (issue 11): every case ends in one line naming the file,
exit status 1, and nothing left in --out. The cases run the real CLI in-process (click's CliRunner);
the bombs also run in a subprocess whose peak RSS must stay under 1 GB.

Each case is (name, builder): the builder writes its files under a folder and returns the CLI
arguments (``{out}`` stands for the output path) and the text the error line must contain.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from click.testing import CliRunner

from jobs_helpers import assert_one_line_error, make_export, write_ct_phantoms
from medvae.cli import cli

RSS_LIMIT_KB = 1024 * 1024  # 1 GiB, ru_maxrss is in KiB on Linux


# ----------------------------------------------------------------------------------------------
# Builders of hostile files
# ----------------------------------------------------------------------------------------------

def _nifti_header(shape, dtype=np.float32) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_data_offset(352)
    return header.binaryblock + b"\x00" * 4


def _write_gz(path: Path, raw: bytes) -> Path:
    path.write_bytes(gzip.compress(raw))
    return path


def _gzip_of_zeros(path: Path, head: bytes, zero_bytes: int) -> Path:
    """A gzip member of ``head`` followed by ``zero_bytes`` zeros, compressed chunk by chunk."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: gzip container
    chunk = bytes(1 << 24)
    with open(path, "wb") as fh:
        fh.write(compressor.compress(head))
        for _ in range(zero_bytes // len(chunk)):
            fh.write(compressor.compress(chunk))
        fh.write(compressor.flush())
    return path


def _nifti(path: Path, array: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), path)
    return path


def _dicom(path: Path, **changes) -> Path:
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)
    return path


class _PickleMarker:
    """Unpickling this creates a marker file: a loader that unpickles would be caught red-handed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# Volume cases: the file is given to `medvae reconstruct --out {out}`.
def _volume_cases(folder: Path) -> dict[str, tuple[Path, str]]:
    cases: dict[str, tuple[Path, str]] = {}
    f = folder
    cases["header_bomb_gz"] = (_write_gz(f / "bomb.nii.gz", _nifti_header((1024, 1024, 1024))), "")
    cases["header_claims_terabytes"] = (_write_gz(f / "huge.nii.gz", _nifti_header((32767, 32767, 32767))),
                                        "would need")
    cases["header_bomb_uncompressed"] = (f / "bomb.nii", "truncated")
    (f / "bomb.nii").write_bytes(_nifti_header((1024, 1024, 1024)))
    cases["truncated_nii"] = (f / "short.nii", "truncated")
    (f / "short.nii").write_bytes(_nifti_header((8, 8, 8)) + bytes(100))
    full = gzip.compress(_nifti_header((16, 16, 16)) + np.random.default_rng(0).random(4096).astype(np.float32).tobytes())
    cases["truncated_gz"] = (f / "cut.nii.gz", "truncated")
    (f / "cut.nii.gz").write_bytes(full[: len(full) // 2])
    unknown = bytearray(_nifti_header((4, 4, 4)) + bytes(256))
    unknown[70:72] = np.int16(1234).tobytes()  # datatype code nobody knows
    cases["unknown_datatype"] = (f / "dtype.nii", "")
    (f / "dtype.nii").write_bytes(bytes(unknown))
    zero = bytearray(_nifti_header((4, 4, 4)) + bytes(256))
    zero[42:44] = np.int16(0).tobytes()  # dim[1] = 0
    cases["zero_size_dimension"] = (f / "zero.nii", "")
    (f / "zero.nii").write_bytes(bytes(zero))
    cases["two_d"] = (_nifti(f / "flat.nii.gz", np.ones((8, 8), np.float32)), "2D")
    cases["five_d"] = (_nifti(f / "five.nii.gz", np.random.rand(4, 4, 4, 2, 2).astype(np.float32)), "5D")
    cases["four_d_without_frame"] = (_nifti(f / "fmri.nii.gz", np.random.rand(6, 6, 6, 3).astype(np.float32)),
                                     "frame")
    nan = np.random.rand(8, 8, 8).astype(np.float32)
    nan[1, 2, 3] = np.nan
    cases["nan_voxels"] = (_nifti(f / "nan.nii.gz", nan), "NaN")
    inf = np.random.rand(8, 8, 8).astype(np.float32)
    inf[0, 0, 0] = np.inf
    cases["inf_voxels"] = (_nifti(f / "inf.nii.gz", inf), "Inf")
    cases["constant_volume"] = (_nifti(f / "flat3d.nii.gz", np.full((8, 8, 8), 7, np.float32)), "constant")
    (f / "empty.nii").write_bytes(b"")
    cases["empty_file"] = (f / "empty.nii", "")
    (f / "noise.nii.gz").write_bytes(os.urandom(2048))
    cases["not_gzip"] = (f / "noise.nii.gz", "")
    cases["gzip_of_noise"] = (_write_gz(f / "gnoise.nii.gz", os.urandom(4096)), "")
    (f / "text.nii").write_text("this is not a NIfTI file\n" * 40)
    cases["text_as_nifti"] = (f / "text.nii", "")
    (f / "loop.nii.gz").symlink_to(f / "loop.nii.gz")
    cases["symlink_loop"] = (f / "loop.nii.gz", "")
    (f / "folder.nii.gz").mkdir()
    cases["folder_named_nifti"] = (f / "folder.nii.gz", "")
    cases["dicom_without_pixels"] = (_dicom(f / "nopix.dcm", PixelData=None), "pixel data")
    truncated = _dicom(f / "cut.dcm")
    truncated.write_bytes(truncated.read_bytes()[:-3000])
    cases["dicom_truncated"] = (truncated, "")
    (f / "junk.dcm").write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(500))
    cases["dicom_junk"] = (f / "junk.dcm", "")
    cases["dicom_rows_claim"] = (_dicom(f / "rows.dcm", Rows=65535, Columns=65535), "")
    (f / "empty_dir").mkdir()
    cases["empty_folder"] = (f / "empty_dir", "")
    gap = f / "gap"
    gap.mkdir()
    for src in pydicom.data.get_testdata_files("dicomdirtests/77654033/CT2/*"):
        shutil.copy(src, gap / Path(src).name)
    cases["dicom_series_with_gap"] = (gap, "")
    (f / "list.csv").write_text(f"image\n{f / 'ok.nii.gz'}\n{f / 'missing.nii.gz'}\n")
    _nifti(f / "ok.nii.gz", np.random.rand(8, 8, 8).astype(np.float32) * 1000)
    cases["csv_with_missing_path"] = (f / "list.csv", "missing.nii.gz")
    (f / "nocol.csv").write_text("path\nx.nii.gz\n")
    cases["csv_without_image_column"] = (f / "nocol.csv", "image")
    (f / "bad.json").write_text("{not json")
    cases["json_datalist_broken"] = (f / "bad.json", "")
    return cases


def _tampered_export(base: Path, name: str, change) -> Path:
    export = make_export(base / name)
    change(export)
    return export


def _edit_config(export: Path, edit) -> None:
    config = json.loads((export / "config.json").read_text())
    edit(config)
    (export / "config.json").write_text(json.dumps(config))


def _add_prior(export: Path, **description) -> None:
    from safetensors.torch import save_file

    from medvae.export import model_hash

    save_file({"mean": torch.zeros(2, 4, 4, 4), "residual_std": torch.ones(2, 4, 4, 4),
               "factors": torch.zeros(1, 2, 4, 4, 4)}, str(export / "prior.safetensors"))
    _edit_config(export, lambda c: c["extra"].__setitem__("prior", {"file": "prior.safetensors",
                                                                    "model_hash": model_hash(export), **description}))


# Model cases: the export is given to `medvae generate --model EXPORT --out {out} --prior standard`.
def _model_cases(folder: Path) -> dict[str, tuple[Path, str]]:
    cases: dict[str, tuple[Path, str]] = {}
    cases["weights_random_bytes"] = (_tampered_export(
        folder, "random", lambda e: (e / "model.safetensors").write_bytes(os.urandom(1000))), "model.safetensors")
    cases["weights_are_a_pickle"] = (_tampered_export(
        folder, "pickled", lambda e: torch.save({"x": torch.zeros(3)}, e / "model.safetensors")), "model.safetensors")

    def pickle_only(export: Path) -> None:
        (export / "model.safetensors").unlink()
        with open(export / "model.pt", "wb") as fh:
            pickle.dump({"state": _PickleMarker(str(folder / "UNPICKLED"))}, fh)
    cases["pickle_only_export"] = (_tampered_export(folder, "pt_only", pickle_only), "never unpickles")
    cases["config_channels_2048"] = (_tampered_export(
        folder, "wide", lambda e: _edit_config(e, lambda c: c["model"].__setitem__("channels", [2048, 2048]))),
        "do not match")
    cases["config_not_json"] = (_tampered_export(
        folder, "badjson", lambda e: (e / "config.json").write_text("{")), "config.json")
    cases["prior_file_outside_export"] = (_tampered_export(
        folder, "escape", lambda e: _add_prior(e, file="../random/model.safetensors")), "inside")
    cases["prior_without_model_hash"] = (_tampered_export(
        folder, "nohash", lambda e: _add_prior(e, model_hash=None)), "model_hash")

    def corrupt_prior(export: Path) -> None:
        _add_prior(export)
        (export / "prior.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    cases["prior_corrupt"] = (_tampered_export(folder, "badprior", corrupt_prior), "prior.safetensors")
    cases["preprocessing_spacing_zero"] = (_tampered_export(
        folder, "spacing0", lambda e: _edit_config(e, lambda c: c["preprocessing"].__setitem__("spacing", [0, 0, 0]))),
        "spacing")
    return cases


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    (base / "volumes").mkdir()
    (base / "models").mkdir()
    return {"base": base, "volumes": _volume_cases(base / "volumes"), "models": _model_cases(base / "models"),
            "export": make_export(base / "good_export")}


def _invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


VOLUME_CASES = ["header_bomb_gz", "header_claims_terabytes", "header_bomb_uncompressed", "truncated_nii",
                "truncated_gz", "unknown_datatype", "zero_size_dimension", "two_d", "five_d", "four_d_without_frame",
                "nan_voxels", "inf_voxels", "constant_volume", "empty_file", "not_gzip", "gzip_of_noise",
                "text_as_nifti", "symlink_loop", "folder_named_nifti", "dicom_without_pixels", "dicom_truncated",
                "dicom_junk", "dicom_rows_claim", "empty_folder", "dicom_series_with_gap", "csv_with_missing_path",
                "csv_without_image_column", "json_datalist_broken"]
MODEL_CASES = ["weights_random_bytes", "weights_are_a_pickle", "pickle_only_export", "config_channels_2048",
               "config_not_json", "prior_file_outside_export", "prior_without_model_hash", "prior_corrupt",
               "preprocessing_spacing_zero"]


def _assert_clean_failure(result, needle: str, named: str, out: Path) -> None:
    assert result.exit_code == 1, (result.exit_code, result.stderr)
    assert_one_line_error(result, named, needle)
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith((f".{out.name}", f"{out.name}."))]


@pytest.mark.parametrize("case", VOLUME_CASES)
def test_hostile_volume_is_one_line_naming_the_file(corpus, case, tmp_path):
    path, needle = corpus["volumes"][case]
    out = tmp_path / "out"
    result = _invoke("reconstruct", "--model", corpus["export"], "--out", out, path)
    named = str(path) if case != "csv_with_missing_path" else "missing.nii.gz"
    _assert_clean_failure(result, needle, named, out)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_tampered_export_is_one_line_naming_the_file(corpus, case, tmp_path):
    export, needle = corpus["models"][case]
    out = tmp_path / "out"
    result = _invoke("generate", "--model", export, "--out", out, "--prior", "standard", "--shape", "8", "8", "8")
    _assert_clean_failure(result, needle, str(export.resolve()) if case != "pickle_only_export" else str(export), out)
    assert not (corpus["base"] / "models" / "UNPICKLED").exists(), "a pickle was loaded"


def test_yaml_syntax_error_and_python_tags_are_one_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  lr: [1e-3\n")
    assert_one_line_error(_invoke("train", broken), str(broken), "not valid YAML")
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("train: !!python/object/apply:os.system ['touch " + str(tmp_path / "RAN") + "']\n")
    assert_one_line_error(_invoke("train", tagged), str(tagged))
    assert not (tmp_path / "RAN").exists()


def test_option_sizes_are_bounded_before_work(corpus, tmp_path):
    export = corpus["export"]
    assert_one_line_error(_invoke("generate", "--model", export, "--out", tmp_path / "a", "--num", "1000000",
                                  "--prior", "standard"), "--num")
    assert_one_line_error(_invoke("generate", "--model", export, "--out", tmp_path / "b", "--prior", "standard",
                                  "--shape", "100000", "100000", "100000"), "--shape", "would need")
    scans = write_ct_phantoms(tmp_path / "scans", count=1)
    assert_one_line_error(_invoke("embed", "--model", export, "--out", tmp_path / "e.parquet", "--spatial-pool",
                                  "1000", scans[0]), "--spatial-pool")
    assert_one_line_error(_invoke("embed", "--model", export, "--out", tmp_path / "f.parquet", "--spatial-pool",
                                  "16", scans[0]), str(scans[0]), "exceeds its latent grid")
    assert not any(p.name.startswith(("a", "b", "e.", "f.")) for p in tmp_path.iterdir())


def test_fine_spacing_is_refused_before_resampling(corpus, tmp_path):
    export = _tampered_export(tmp_path, "fine", lambda e: _edit_config(
        e, lambda c: c["preprocessing"].__setitem__("spacing", [0.01, 0.01, 0.01])))
    scans = write_ct_phantoms(tmp_path / "scans", count=1)
    result = _invoke("reconstruct", "--model", export, "--out", tmp_path / "out", scans[0])
    _assert_clean_failure(result, "resampling", str(scans[0]), tmp_path / "out")


def test_truncated_embedding_table_is_one_line(corpus, tmp_path):
    scans = write_ct_phantoms(tmp_path / "scans", count=2)
    table = tmp_path / "e.npz"
    assert _invoke("embed", "--model", corpus["export"], "--out", table, scans[0]).exit_code == 0
    table.write_bytes(table.read_bytes()[:200])
    assert_one_line_error(_invoke("embed", "--model", corpus["export"], "--out", table, *scans), str(table))


def test_debug_flag_shows_the_traceback(corpus, tmp_path):
    path, _ = corpus["volumes"]["nan_voxels"]
    result = CliRunner().invoke(cli, ["--debug", "inspect", str(path)])
    assert result.exit_code == 1 and result.exception is not None and not isinstance(result.exception, SystemExit)


# ----------------------------------------------------------------------------------------------
# Peak memory of the bombs, each in its own process
# ----------------------------------------------------------------------------------------------

_RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    from medvae.cli import main
    sys.argv = ["medvae"] + sys.argv[1:]
    try:
        main()
        code = 0
    except SystemExit as exit:
        code = exit.code
    print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "EXIT", code)
""")


def _peak_rss(*args) -> tuple[int, int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MEDVAE_DEBUG", None)
    env.pop("MEDVAE_MAX_VOLUME_GB", None)
    result = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=300)
    fields = result.stdout.split()
    index = fields.index("MAXRSS_KB")
    return int(fields[index + 1]), int(fields[index + 3]), result.stderr


@pytest.fixture(scope="module")
def gzip_bomb(tmp_path_factory) -> Path:
    """1 GiB of zeros behind a header that declares exactly that (1024^3 uint8): about 1 MB on disk."""
    path = tmp_path_factory.mktemp("gzbomb") / "zeros.nii.gz"
    _gzip_of_zeros(path, _nifti_header((1024, 1024, 1024), np.uint8), 1 << 30)
    assert path.stat().st_size < 2 << 20
    return path


@pytest.mark.parametrize("case", ["gzip_bomb", "header_bomb_gz", "header_claims_terabytes", "dicom_rows_claim",
                                  "config_channels_2048"])
def test_peak_memory_of_small_hostile_inputs_stays_under_1_gb(corpus, gzip_bomb, case, tmp_path):
    if case == "config_channels_2048":
        export = corpus["models"][case][0]
        path = export / "config.json"
        args = ("generate", "--model", export, "--out", tmp_path / "out", "--prior", "standard")
    else:
        path = gzip_bomb if case == "gzip_bomb" else corpus["volumes"][case][0]
        args = ("inspect", path)
    assert path.stat().st_size < 1 << 20 or case == "gzip_bomb" and path.stat().st_size < 2 << 20
    peak_kb, code, stderr = _peak_rss(*args)
    assert code == 1, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], stderr
    assert peak_kb < RSS_LIMIT_KB, f"{case}: peak RSS {peak_kb / 1024:.0f} MiB"
