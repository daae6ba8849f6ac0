"""medvae: stable training and use of 3D variational autoencoders on CT and MRI volumes.

The public names load lazily, so ``import medvae`` (and ``medvae --help``) stays instant.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "VAE3D": "medvae.models.vae",
    "VAEOutput": "medvae.models.vae",
    "DiagonalGaussian": "medvae.models.posterior",
    "save_model": "medvae.export",
    "load_model": "medvae.export",
    "read_volume": "medvae.io",
    "write_volume": "medvae.io",
    "Volume": "medvae.io",
    "encode_volume": "medvae.inference",
    "decode_volume": "medvae.inference",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'medvae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
