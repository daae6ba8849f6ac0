from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from medvae import VAE3D
from medvae.config import Config, ConfigError, ModelConfig, load_config, to_dict
from medvae.models.vae import VAE3DArchitecture

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAINING_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml"))


def test_there_are_shipped_configs():
    names = {p.name for p in TRAINING_CONFIGS}
    assert {"demo.yaml", "brain_mri_1mm.yaml", "ct.yaml"} <= names


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_builds_its_model(path):
    text = path.read_text()
    assert text.startswith("#"), "each config starts with a header comment"
    assert "medvae train" in text.split("\n\n")[0], "the header shows the command that runs it"
    config = load_config(path)
    assert isinstance(config, Config)
    VAE3D(**to_dict(config)["model"])


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] in {"NO", "MULTI_CPU", "MULTI_GPU"}
    assert data["num_processes"] >= 1


def test_model_section_matches_the_architecture():
    assert {f.name for f in fields(ModelConfig)} == {f.name for f in fields(VAE3DArchitecture)}


def test_dotted_overrides():
    config = load_config(None, ["train.lr=3e-4", "model.channels=[16,32]", "model.norm_num_groups=8",
                                "loss.kl_schedule=cyclical"])
    assert config.train.lr == pytest.approx(3e-4)
    assert config.model.channels == [16, 32]
    assert config.loss.kl_schedule == "cyclical"


@pytest.mark.parametrize(
    "override, key",
    [("train.lrr=1", "train.lrr"), ("modell.channels=[8]", "modell"), ("train.guard.windw=3", "train.guard.windw")],
)
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        load_config(None, [override])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="'train.max_steps'"):
        load_config(None, ["train.max_steps=many"])


def test_bad_choice_is_named():
    with pytest.raises(ConfigError, match="data.intensity.preset"):
        load_config(None, ["data.intensity.preset=magic"])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: 1e-3\n  warmup: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "bad.yaml" in str(err.value) and "train.warmup" in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_bare_no_for_mixed_precision_means_no(tmp_path):
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"


def test_defaults_are_the_benchmarked_recipe():
    """benchmarks/recipe.json holds the recipe benchmarks/convergence.py measured (RESULTS.md quotes the run);
    the schema's defaults must be exactly that recipe, knob by knob."""
    import json
    import sys

    root = Path(__file__).resolve().parents[1]
    recorded = json.loads((root / "benchmarks" / "recipe.json").read_text())
    defaults = to_dict(Config())
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        from convergence import RECIPE_KEYS  # the knobs the ablation varies
    finally:
        sys.path.remove(str(root / "benchmarks"))
    assert sorted(recorded["recipe"]) == sorted(RECIPE_KEYS)
    for key, value in recorded["recipe"].items():
        section, name = key.split(".")
        assert defaults[section][name] == value, f"default {key}={defaults[section][name]!r}, benchmarked {value!r}"
