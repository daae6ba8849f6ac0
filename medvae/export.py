"""Export and load a trained model: ``model.safetensors`` + ``config.json`` in one folder.

The config holds the architecture (which rebuilds the model) and the preprocessing the model
expects (intensity preset, spacing, orientation), so generate/embed/evaluate need nothing else.
Loading reads tensors with safetensors and JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from medvae.atomic import atomic_directory
from medvae.models.vae import VAE3D

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
EXPORT_FORMAT = "medvae-export"
EXPORT_VERSION = 1
PRIOR_TENSORS = ("mean", "residual_std", "factors")  # what a fitted prior file (medvae.prior) holds
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def save_model(
    model: VAE3D,
    path: str | os.PathLike,
    preprocessing: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``path/model.safetensors`` and ``path/config.json`` atomically; return ``path``.

    ``preprocessing`` is the data pipeline's description (intensity preset and its parameters,
    target spacing, orientation); ``extra`` holds anything else worth keeping (training step, prior).
    An existing medvae export at ``path`` is replaced; any other non-empty folder is refused.
    """
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    config = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "model": model.config,
        "preprocessing": preprocessing,
        "extra": extra or {},
    }
    target = Path(path)
    is_export = (target / CONFIG_NAME).is_file() and (target / WEIGHTS_NAME).is_file()
    with atomic_directory(target, replace=is_export) as tmp:
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
    pickles = sorted(q.name for q in p.glob("*") if q.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"))
    note = f"; {', '.join(pickles)} not loaded: medvae never unpickles" if pickles else ""
    raise FileNotFoundError(f"{p}: not a medvae model (no {WEIGHTS_NAME} here or in {p / 'export'}){note}")


def read_export_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of an export (or run) folder."""
    directory = resolve_export_dir(path)
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{directory / CONFIG_NAME}: unreadable model config ({err})") from err
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{directory / CONFIG_NAME}: not a medvae export config")
    if not isinstance(config.get("model"), dict):
        raise ValueError(f"{directory / CONFIG_NAME}: no model architecture ('model' must be a mapping)")
    # Exports written before model.shortcut existed were trained without it (it has no weights, so
    # the default must not be applied to them silently); ``true`` in older exports is the block mean
    # (medvae.models.architecture.shortcut_kind).
    config["model"].setdefault("shortcut", False)
    _check_prior_description(directory, (config.get("extra") or {}).get("prior"))
    return config


def _check_prior_description(directory: Path, description: Any) -> None:
    """A described prior file must be a plain file name inside the export folder, tied to these
    weights by a SHA-256, and a readable safetensors file holding the prior's tensors."""
    if description is None:
        return
    where = directory / CONFIG_NAME
    if not isinstance(description, dict):
        raise ValueError(f"{where}: extra.prior must be a mapping")
    name = description.get("file", "prior.safetensors")
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"{where}: extra.prior.file {name!r} must be a file name inside {directory}")
    digest = description.get("model_hash")
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise ValueError(f"{where}: extra.prior.model_hash {digest!r} is not a SHA-256; the prior cannot be "
                         "tied to these weights")
    path = directory / name
    if path.is_symlink():
        raise ValueError(f"{path}: the prior file is a symlink; an export must hold its own files")
    if path.is_file():
        keys = _safetensors_shapes(path)
        if any(key not in keys for key in PRIOR_TENSORS):
            raise ValueError(f"{path}: not a medvae prior (needs tensors {', '.join(PRIOR_TENSORS)})")


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, without reading the tensors."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({' '.join(str(err).split())})") from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> VAE3D:
    """Rebuild a VAE3D from an export (or run) folder, in eval mode, on ``device``."""
    directory = resolve_export_dir(path)
    config = read_export_config(directory)
    weights = directory / WEIGHTS_NAME
    _check_architecture_against_weights(config["model"], weights)  # before allocating the model
    model = VAE3D.from_config(config["model"])
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{weights}: not a readable safetensors file ({' '.join(str(err).split())})") from None
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


def _check_architecture_against_weights(architecture: dict[str, Any], weights: Path) -> None:
    """Build the model on the meta device (no memory) and compare every tensor shape with the
    weights file's header, so a tampered config cannot make medvae allocate a model it then discards."""
    stored = _safetensors_shapes(weights)
    try:
        with torch.device("meta"):
            skeleton = VAE3D.from_config(architecture)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{weights.parent / CONFIG_NAME}: bad model architecture ({' '.join(str(err).split())})") from None
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    for name, shape in expected.items():
        if name in stored and stored[name] != shape:
            raise ValueError(f"{weights}: weights do not match config.json ({name}: file {stored[name]}, "
                             f"config {shape})")
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights}: weights do not match config.json (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")


def model_hash(path: str | os.PathLike) -> str:
    """SHA-256 of the exported weights file: the provenance id of a model."""
    digest = hashlib.sha256()
    with open(resolve_export_dir(path) / WEIGHTS_NAME, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
