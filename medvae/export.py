"""Export and load a trained model: ``model.safetensors`` + ``config.json`` in one folder.

The config holds the architecture (which rebuilds the model) and the preprocessing the model
expects (intensity preset, spacing, orientation), so generate/embed/evaluate need nothing else.
Loading reads tensors with safetensors and JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medvae.atomic import atomic_directory
from medvae.models.vae import VAE3D

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
EXPORT_FORMAT = "medvae-export"
EXPORT_VERSION = 1


def save_model(
    model: VAE3D,
    path: str | os.PathLike,
    preprocessing: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``path/model.safetensors`` and ``path/config.json`` atomically; return ``path``.

    ``preprocessing`` is the data pipeline's description (intensity preset and its parameters,
    target spacing, orientation); ``extra`` holds anything else worth keeping (training step, prior).
    """
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    config = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "model": model.config,
        "preprocessing": preprocessing,
        "extra": extra or {},
    }
    with atomic_directory(path) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": EXPORT_FORMAT})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(path)


def resolve_export_dir(path: str | os.PathLike) -> Path:
    """Accept an export folder or a training run folder (whose export lives in ``run/export``)."""
    p = Path(path)
    if (p / WEIGHTS_NAME).is_file():
        return p
    if (p / "export" / WEIGHTS_NAME).is_file():
        return p / "export"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model folder")
    raise FileNotFoundError(f"{p}: not a medvae model (no {WEIGHTS_NAME} here or in {p / 'export'})")


def read_export_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of an export (or run) folder."""
    directory = resolve_export_dir(path)
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{directory / CONFIG_NAME}: unreadable model config ({err})") from err
    if config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{directory / CONFIG_NAME}: not a medvae export config")
    return config


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> VAE3D:
    """Rebuild a VAE3D from an export (or run) folder, in eval mode, on ``device``."""
    directory = resolve_export_dir(path)
    config = read_export_config(directory)
    model = VAE3D.from_config(config["model"])
    state = load_file(str(directory / WEIGHTS_NAME), device="cpu")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ValueError(f"{directory / WEIGHTS_NAME}: weights do not match config.json ({first})") from None
    if missing or unexpected:
        raise ValueError(
            f"{directory / WEIGHTS_NAME}: weights do not match config.json "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.to(device).eval()


def model_hash(path: str | os.PathLike) -> str:
    """SHA-256 of the exported weights file: the provenance id of a model."""
    digest = hashlib.sha256()
    with open(resolve_export_dir(path) / WEIGHTS_NAME, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
