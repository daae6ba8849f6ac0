"""The prior's configuration: shipped configs load and build their UNet, bad values name their key."""

from pathlib import Path

import pytest

from medvae.config import ConfigError, load_config
from medvae.prior.config import PriorConfig
from medvae.prior.diffusion import build_unet, unet_arguments

PRIOR_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "prior").glob("*.yaml"))


def test_there_are_shipped_prior_configs():
    assert {p.name for p in PRIOR_CONFIGS} >= {"diffusion.yaml", "demo.yaml"}


@pytest.mark.parametrize("path", PRIOR_CONFIGS, ids=lambda p: p.name)
def test_every_prior_config_loads_and_builds_its_unet(path):
    header = path.read_text().split("\n")[0:4]
    assert header[0].startswith("#") and any("medvae train-prior" in line for line in header)
    config = load_config(path, schema=PriorConfig)
    assert isinstance(config, PriorConfig)
    context = 4 if config.diffusion.conditions else 0
    build_unet(unet_arguments(config.diffusion, latent_channels=3, context_dim=context))


@pytest.mark.parametrize("override, key", [
    ("diffusion.scheduler=ddim", "diffusion.scheduler"),
    ("diffusion.sampler=ddim", "diffusion.sampler"),  # a velocity model does not step by DDIM
    ("diffusion.attention_levels=[false,false,false]", "diffusion.conditions"),  # conditions need cross-attention
    ("diffusion.conditions=[region]", "diffusion.conditions"),
    ("latents.shape=[8,8]", "latents.shape"),
    ("diffusion.nonsense=1", "nonsense"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override], schema=PriorConfig)
