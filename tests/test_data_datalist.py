"""Datalists from folders, globs, CSV and JSON; stable ids; a deterministic seeded split."""

from __future__ import annotations

import json
import shutil

import pytest

from medvae.config import DataConfig
from medvae.data.datalist import read_datalist, resolve_datalists, split_datalist
from phantoms import write_phantoms


def test_folder_lists_nifti_files_and_dicom_series_folders(tmp_path, ct5n_folder):
    write_phantoms(tmp_path / "scans" / "sub-01", count=2, shape=(8, 8, 8))
    shutil.copytree(ct5n_folder, tmp_path / "scans" / "ct_series")
    (tmp_path / "scans" / "notes.txt").write_text("not an image")
    items = read_datalist(str(tmp_path / "scans"), modality="CT")["training"]
    assert [i["id"] for i in items] == ["ct_series", "sub-01_vol_00", "sub-01_vol_01"]
    assert items[0]["image"] == str(tmp_path / "scans" / "ct_series")
    assert {i["modality"] for i in items} == {"CT"}


def test_empty_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no NIfTI files or DICOM series"):
        read_datalist(str(tmp_path / "empty"))


def test_glob(tmp_path):
    write_phantoms(tmp_path / "a", count=3, shape=(8, 8, 8))
    items = read_datalist(str(tmp_path / "a" / "vol_0[12].nii.gz"))["training"]
    assert [i["id"] for i in items] == ["vol_01", "vol_02"]
    with pytest.raises(ValueError, match="matches no NIfTI"):
        read_datalist(str(tmp_path / "a" / "*.mha"))


def test_csv_with_per_row_modality_and_relative_paths(tmp_path):
    write_phantoms(tmp_path, count=2, shape=(8, 8, 8))
    (tmp_path / "list.csv").write_text("image,modality,id\nvol_00.nii.gz,ct,first\nvol_01.nii.gz,,\n")
    items = read_datalist(str(tmp_path / "list.csv"), modality="MR")["training"]
    assert items == [
        {"image": str(tmp_path / "vol_00.nii.gz"), "id": "first", "modality": "CT"},
        {"image": str(tmp_path / "vol_01.nii.gz"), "id": "vol_01", "modality": "MR"},
    ]


@pytest.mark.parametrize("content, message", [
    ("path\nvol_00.nii.gz\n", "needs an 'image' column"),
    ("image,modality\nvol_00.nii.gz,MR\nvol_01.nii.gz,PET\n", "list.csv line 3: modality 'PET' is not CT or MR"),
    ("image\nvol_00.nii.gz\n\"\"\n", "list.csv line 3: needs an 'image' path"),
])
def test_csv_errors_name_the_file_and_line(tmp_path, content, message):
    (tmp_path / "list.csv").write_text(content)
    with pytest.raises(ValueError, match=message):
        read_datalist(str(tmp_path / "list.csv"))


def test_json_monai_style_with_validation_part(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({
        "training": [{"image": "a.nii.gz"}, "b.nii.gz"],
        "validation": [{"image": "/abs/c.nii.gz", "modality": "CT", "id": "val-c"}],
    }))
    parts = read_datalist(str(tmp_path / "d.json"))
    assert [i["id"] for i in parts["training"]] == ["a", "b"]
    assert parts["training"][1]["image"] == str(tmp_path / "b.nii.gz")
    assert parts["validation"] == [{"image": "/abs/c.nii.gz", "id": "val-c", "modality": "CT"}]


def test_json_errors_name_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: cannot read the JSON datalist"):
        read_datalist(str(tmp_path / "bad.json"))
    (tmp_path / "odd.json").write_text(json.dumps({"train": []}))
    with pytest.raises(ValueError, match="odd.json: a JSON datalist is a list"):
        read_datalist(str(tmp_path / "odd.json"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_datalist(str(tmp_path / "missing.json"))


def test_split_is_seeded_deterministic_and_order_free():
    items = [{"image": f"/d/{n}.nii", "id": f"case{n:02d}", "modality": "MR"} for n in range(20)]
    train, val = split_datalist(items, 0.2, seed=0)
    assert len(val) == 4 and len(train) == 16
    assert {i["id"] for i in train} | {i["id"] for i in val} == {i["id"] for i in items}
    assert split_datalist(list(reversed(items)), 0.2, seed=0)[1] == sorted(val, key=lambda i: -items.index(i))
    assert split_datalist(items, 0.2, seed=1)[1] != val
    assert len(split_datalist(items[:3], 0.2)[1]) == 1  # at least one held out
    assert split_datalist(items, 0.0)[1] == []


def test_resolve_uses_val_source_or_holds_out(tmp_path):
    write_phantoms(tmp_path / "train", count=5, shape=(8, 8, 8))
    write_phantoms(tmp_path / "val", count=1, shape=(8, 8, 8))
    (tmp_path / "val" / "vol_00.nii.gz").rename(tmp_path / "val" / "held.nii.gz")
    train, val = resolve_datalists(DataConfig(train=str(tmp_path / "train"), val_fraction=0.4))
    assert (len(train), len(val)) == (3, 2)
    train, val = resolve_datalists(DataConfig(train=str(tmp_path / "train"), val=str(tmp_path / "val")))
    assert (len(train), [i["id"] for i in val]) == (5, ["held"])
    with pytest.raises(ValueError, match="in both the training and the validation list"):
        resolve_datalists(DataConfig(train=str(tmp_path / "train"), val=str(tmp_path / "train" / "vol_00.nii.gz")))


def test_duplicate_ids_are_refused(tmp_path):
    (tmp_path / "d.csv").write_text("image,id\na.nii.gz,same\nb.nii.gz,same\n")
    with pytest.raises(ValueError, match="id 'same' is used by both"):
        resolve_datalists(DataConfig(train=str(tmp_path / "d.csv"), val_fraction=0.0))
