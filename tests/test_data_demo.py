"""The built-in demo: real MRI from installed packages, written as NIfTI with a held-out validation part."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medvae.config import Config, DataConfig
from medvae.data import build_datasets
from medvae.data.demo import demo_datalist
from medvae.io import read_volume


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_demo_volumes_are_real_anatomy_with_a_held_out_part(demo_dir):
    datalist = demo_datalist(demo_dir)
    parts = json.loads(datalist.read_text())
    train_ids = [i["id"] for i in parts["training"]]
    val_ids = [i["id"] for i in parts["validation"]]
    assert len(train_ids) >= 3 and val_ids and not set(train_ids) & set(val_ids)
    assert "Louis Collins" in (datalist.parent / "NOTICE.txt").read_text()
    for item in parts["training"] + parts["validation"]:
        volume = read_volume(datalist.parent / item["image"])
        assert min(volume.shape) >= 24 and max(volume.spacing) <= 2.5
        low, high = np.percentile(volume.array, [1, 99])
        assert high > low and (volume.array > low).mean() > 0.2  # a head, not a blank or a point
    grid0 = read_volume(datalist.parent / "mni152_t1_2mm_grid0.nii.gz")
    assert grid0.shape == (98, 116, 94) and grid0.orientation == "RAS"
    assert demo_datalist(demo_dir) == datalist  # second call reuses the files


def test_data_train_demo_builds_datasets(demo_dir, tmp_path):
    config = Config(data=DataConfig(train="demo", patch_size=[32, 32, 32]))
    train, val, preprocessing = build_datasets(config, 4, run_dir=tmp_path, cache_dir=demo_dir)
    assert len(val) == 1 and val[0]["id"] == "t1_individual"
    assert tuple(train[0]["image"].shape) == (1, 32, 32, 32)
    assert preprocessing["intensity"]["num_volumes"] == len(train)


def test_demo_config_sets_the_spacing_of_its_volumes(demo_dir, tmp_path):
    """configs/demo.yaml trains at the demo volumes' 2 mm, so generate writes 2 mm samples."""
    from pathlib import Path

    from medvae.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml",
                         [f"train.output_dir={tmp_path}"])
    assert config.data.spacing == [2.0, 2.0, 2.0]
    _, _, preprocessing = build_datasets(config, 2, run_dir=tmp_path, cache_dir=demo_dir)
    assert preprocessing["spacing"] == preprocessing["median_training_spacing"] == [2.0, 2.0, 2.0]
