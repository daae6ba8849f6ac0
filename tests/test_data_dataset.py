"""build_datasets: caching modes, batch keys through collation, bad files (stop at the first, or skip and list)."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, list_data_collate

from medvae.config import Config, DataConfig, IntensityConfig, TrainConfig
from medvae.data import build_datasets
from medvae.io import read_volume
from phantoms import phantom, write_phantoms


def _config(train, **data) -> Config:
    data = {"patch_size": [16, 16, 16], "val_fraction": 0.25, **data}
    return Config(data=DataConfig(train=str(train), **data), train=TrainConfig(seed=0))


def _write_bad_files(folder):
    """A truncated .nii.gz and a volume with a NaN voxel, named so they sort between good files."""
    good = (folder / "vol_00.nii.gz").read_bytes()
    (folder / "vol_01b_truncated.nii.gz").write_bytes(good[: len(good) // 2])
    nan = phantom((12, 12, 12))
    nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), folder / "vol_01c_nan.nii.gz")


@pytest.mark.parametrize("cache", ["memory", "disk", "none"])
def test_batches_carry_image_id_and_path(tmp_path, cache):
    paths = write_phantoms(tmp_path / "data", count=4, shape=(20, 18, 12))
    train, val, preprocessing = build_datasets(_config(tmp_path / "data", cache=cache), 4, run_dir=tmp_path / "run")
    assert (len(train), len(val)) == (3, 1)
    loader = DataLoader(train, batch_size=3, shuffle=False, collate_fn=list_data_collate)
    batch = next(iter(loader))
    assert tuple(batch["image"].shape) == (3, 1, 16, 16, 16) and batch["image"].dtype == torch.float32
    assert len(batch["id"]) == 3 and all(isinstance(i, str) for i in batch["id"])
    assert set(batch["path"]) <= {str(p) for p in paths} and len(set(batch["path"])) == 3
    assert tuple(val[0]["image"].shape) == (1, 20, 20, 12)  # whole volume, padded to a multiple of 4
    assert preprocessing["intensity"]["preset"] == "mri_percentile"
    assert preprocessing["intensity"]["num_volumes"] == 3
    if cache == "disk":
        assert list((tmp_path / "run" / "cache").glob("train-*/*.pt"))


def test_memory_cache_reuses_checked_volumes_and_still_augments(tmp_path):
    write_phantoms(tmp_path / "data", count=2, shape=(32, 32, 32))
    train, _, _ = build_datasets(_config(tmp_path / "data", val_fraction=0.0), 4, run_dir=tmp_path / "run")
    crops = [train[0]["image"] for _ in range(4)]
    assert not all(torch.equal(crops[0], c) for c in crops[1:])  # random crops differ between epochs


def test_training_summary_is_the_median_of_per_volume_parameters(tmp_path):
    paths = write_phantoms(tmp_path / "data", count=3, shape=(12, 12, 12), scale=1000.0)
    for i, path in enumerate(paths):  # make the volumes differ in scale: 1x, 2x, 4x
        image = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj) * 2**i, image.affine), path)
    _, _, preprocessing = build_datasets(_config(tmp_path / "data", val_fraction=0.0), 4, run_dir=tmp_path / "run")
    uppers = sorted(float(np.percentile(read_volume(p).array, 99.5)) for p in paths)
    assert preprocessing["intensity"]["a_max"] == pytest.approx(uppers[1], rel=1e-5)


def test_zscore_summary(tmp_path):
    write_phantoms(tmp_path / "data", count=2, shape=(12, 12, 12))
    config = _config(tmp_path / "data", val_fraction=0.0, intensity=IntensityConfig(preset="zscore"))
    _, _, preprocessing = build_datasets(config, 4, run_dir=tmp_path / "run")
    assert {"mean", "std", "num_volumes"} <= set(preprocessing["intensity"])


def test_a_run_stops_at_the_first_bad_file(tmp_path):
    write_phantoms(tmp_path / "data", count=4, shape=(12, 12, 12))
    _write_bad_files(tmp_path / "data")
    with pytest.raises(ValueError) as caught:
        build_datasets(_config(tmp_path / "data", val_fraction=0.0), 4, run_dir=tmp_path / "run")
    message = str(caught.value)
    assert "vol_01b_truncated.nii.gz" in message and "nan" not in message.lower()
    assert len(message.splitlines()) == 1
    assert not (tmp_path / "run" / "skipped_files.json").exists()


def test_skip_mode_lists_bad_files_with_reasons_and_never_uses_them(tmp_path):
    write_phantoms(tmp_path / "data", count=4, shape=(12, 12, 12))
    _write_bad_files(tmp_path / "data")
    (tmp_path / "data" / "vol_02.nii.gz").unlink()  # listed in a CSV below, then missing
    (tmp_path / "list.csv").write_text("image\n" + "".join(f"data/{p.name}\n" for p in sorted(
        (tmp_path / "data").iterdir())) + "data/vol_02.nii.gz\n")
    config = _config(tmp_path / "list.csv", val_fraction=0.0, on_bad_file="skip")
    train, val, _ = build_datasets(config, 4, run_dir=tmp_path / "run")
    report = json.loads((tmp_path / "run" / "skipped_files.json").read_text())
    # ids are the paths relative to the CSV's folder
    reasons = {entry["id"].removeprefix("data_"): entry["reason"] for entry in report["skipped"]}
    assert report["num_skipped"] == 3 and set(reasons) == {"vol_01b_truncated", "vol_01c_nan", "vol_02"}
    assert "truncated" in reasons["vol_01b_truncated"] or "damaged" in reasons["vol_01b_truncated"]
    assert "NaN" in reasons["vol_01c_nan"] and "no such file" in reasons["vol_02"]
    assert all(entry["path"] in entry["reason"] for entry in report["skipped"])
    assert len(train) == 3 and len(val) == 0
    used = {train[i]["path"].rsplit("/", 1)[-1] for i in range(len(train))}
    assert used == {"vol_00.nii.gz", "vol_01.nii.gz", "vol_03.nii.gz"}


def test_skip_mode_with_nothing_left_is_an_error(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.nii.gz").write_bytes(gzip.compress(b"not a nifti header"))
    with pytest.raises(ValueError, match="no usable training volumes; see .*skipped_files.json"):
        build_datasets(_config(tmp_path / "data", val_fraction=0.0, on_bad_file="skip"), 4, run_dir=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "skipped_files.json").read_text())["num_skipped"] == 1


def test_fewer_volumes_than_a_batch_are_repeated_with_their_own_crops():
    """A dataset of 2 volumes and a global batch of 5: each epoch lists every volume 3 times, each copy
    with its own random crop, and the order still follows from (seed, epoch) alone."""
    from monai.data import Dataset
    from monai.transforms import Compose, RandSpatialCropd

    from medvae.train.ordering import EpochOrderedDataset

    volumes = [{"image": np.arange(8**3, dtype=np.float32).reshape(1, 8, 8, 8) + 1000 * i, "id": str(i)}
               for i in range(2)]
    dataset = Dataset(volumes, transform=Compose([RandSpatialCropd("image", roi_size=[4, 4, 4], random_size=False)]))
    ordered = EpochOrderedDataset(dataset, seed=3, min_length=5)
    assert len(ordered) == 6
    items = [ordered[i] for i in range(len(ordered))]
    assert sorted(item["id"] for item in items) == ["0", "0", "0", "1", "1", "1"]
    crops = {item["image"].numpy().tobytes() for item in items}
    assert len(crops) == 6  # no two copies share a crop
    again = EpochOrderedDataset(dataset, seed=3, min_length=5)
    assert [again[i]["image"].numpy().tobytes() for i in range(6)] == [i["image"].numpy().tobytes() for i in items]
    assert len(EpochOrderedDataset(dataset, seed=3, min_length=2)) == 2  # enough volumes: one copy each
