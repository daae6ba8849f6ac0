"""Pure torch.nn models: no files, configs, Accelerate or wandb in here.

Names load lazily, so ``medvae.models.architecture`` (the torch-free schema the config derives
from) can be imported without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "DiagonalGaussian": "medvae.models.posterior",
    "VAE3D": "medvae.models.vae",
    "VAE3DArchitecture": "medvae.models.architecture",
    "VAEOutput": "medvae.models.vae",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'medvae.models' has no attribute {name!r}")
