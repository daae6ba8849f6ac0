"""What every job starts from: the exported model with its pipeline, the input volumes, a new output folder.

    model = load_for_inference("runs/x")            # export folder or run folder
    items = resolve_inputs(["scan.nii.gz", "dicom_dir/", "list.csv"], model.modality)
    image = model.prepare(items[0])                  # (1, D, H, W) normalised MetaTensor, padded
    posterior = model.encode(image)                  # DiagonalGaussian over (1, C, D/f, H/f, W/f)

Inputs are files, folders (NIfTI files and DICOM series under them), globs, or CSV/JSON datalists,
read by ``medvae.data.read_datalist``. Volumes go through the model's own infer pipeline, rebuilt
from the export's preprocessing, so they are prepared exactly as the training volumes were.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvae.config import DataConfig
from medvae.models.posterior import DiagonalGaussian
from medvae.models.vae import VAE3D

Item = dict[str, Any]


@dataclass
class LoadedModel:
    """An exported model ready for whole-volume inference."""

    model: VAE3D
    directory: Path  # the export folder
    config: dict[str, Any]  # its config.json
    preprocessing: dict[str, Any]
    hash: str  # sha256 of the weights: provenance of every output
    data_config: DataConfig  # the infer pipeline's settings, from the preprocessing
    transform: Any  # medvae.data.transforms.Pipeline (phase "infer")
    device: torch.device
    memory_budget: int | None = None  # bytes for encode/decode (None: 80% of free memory)

    @property
    def modality(self) -> str:
        return self.data_config.modality

    @property
    def factor(self) -> int:
        return self.model.downsampling_factor

    def prepare(self, item: Item):
        """Read and preprocess one item -> (1, D, H, W) MetaTensor; a bad file raises a one-line ValueError."""
        try:
            return self.transform(dict(item))["image"]
        except (ValueError, OSError) as err:
            message = " ".join(str(err).split())
            source = str(item["image"])
            raise ValueError(message if source in message else f"{source}: {message}") from None

    def encode(self, image: torch.Tensor) -> DiagonalGaussian:
        """Posterior over (1, C, D/f, H/f, W/f) of one prepared (1, D, H, W) volume (memory-bounded)."""
        from medvae.inference import encode_volume

        x = image.as_subclass(torch.Tensor)[None].float().to(self.device)
        return encode_volume(self.model, x, memory_budget=self.memory_budget)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised voxels (B, 1, d*f, h*f, w*f) of latents (B, C, d, h, w) (memory-bounded)."""
        from medvae.inference import decode_volume

        return decode_volume(self.model, z.to(self.device), memory_budget=self.memory_budget)

    def reconstruct(self, image: torch.Tensor) -> torch.Tensor:
        """Normalised reconstruction (1, D, H, W) of a prepared volume from its posterior mean, on the CPU."""
        return self.decode(self.encode(image).mode())[0].float().cpu()

    def remove_padding(self, prediction: torch.Tensor, image) -> torch.Tensor:
        """Crop the pipeline's pad-to-a-multiple off a (C, D, H, W) output on ``image``'s grid.

        The result is on the preprocessed grid (orientation and spacing of the model), before padding.
        """
        from monai.data import MetaTensor

        from medvae.data.transforms import KEY, PadWithMinimumd

        pad = [t for t in self.transform.transforms if isinstance(t, PadWithMinimumd)][-1]
        meta = {k: copy.deepcopy(v) for k, v in image.meta.items() if k != "affine"}
        carrier = MetaTensor(prediction.detach().float().cpu(), affine=image.affine.clone(), meta=meta)
        carrier.applied_operations = copy.deepcopy(image.applied_operations)
        return pad.inverse({KEY: carrier})[KEY].as_subclass(torch.Tensor)


def to_real_units(x: torch.Tensor, intensity: dict[str, Any]) -> np.ndarray:
    """Normalised values -> real units (HU for CT) as float32, clipped first to the range the model
    was trained on ([b_min, b_max] of a clipping preset), so CT stays inside its HU window."""
    from medvae.data import invert_intensity

    if intensity.get("clip") and intensity.get("preset") in ("ct_window", "mri_percentile"):
        x = x.clamp(float(intensity.get("b_min", 0.0)), float(intensity.get("b_max", 1.0)))
    return np.asarray(invert_intensity(x.detach().float().cpu(), intensity).numpy(), dtype=np.float32)


def load_for_inference(model_dir: str | os.PathLike, device: str | torch.device | None = None,
                       memory_budget: int | None = None) -> LoadedModel:
    """Load an export (or run) folder with its infer pipeline; ``device`` None picks CUDA if present."""
    from medvae.data.from_export import data_config_from_preprocessing
    from medvae.data.transforms import build_transforms
    from medvae.export import load_model, model_hash, read_export_config, resolve_export_dir

    directory = resolve_export_dir(model_dir).resolve()
    config = read_export_config(directory)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(directory, device=device)
    data_config = data_config_from_preprocessing(config.get("preprocessing"), where=str(directory / "config.json"))
    transform = build_transforms(data_config, "infer", model.downsampling_factor)
    return LoadedModel(model, directory, config, dict(config["preprocessing"]), model_hash(directory),
                       data_config, transform, device, memory_budget)


def resolve_inputs(inputs: list[str | os.PathLike], modality: str) -> list[Item]:
    """Items ``{"image", "id", "modality"}`` of every INPUT, in order; ids must be unique.

    A missing path or a malformed datalist raises its one-line error before any volume is read.
    """
    from medvae.data import read_datalist

    if not inputs:
        raise ValueError("no inputs given")
    items: list[Item] = []
    for source in inputs:
        parts = read_datalist(str(source), modality)
        items += parts["training"] + parts.get("validation", [])
    missing = [item["image"] for item in items if not Path(item["image"]).exists()]
    if missing:
        more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{missing[0]}: no such file or folder{more}; nothing was read")
    seen: dict[str, str] = {}
    for item in items:
        if item["id"] in seen and seen[item["id"]] != item["image"]:
            raise ValueError(f"{item['image']}: id {item['id']!r} is also the id of {seen[item['id']]}; "
                             "give the inputs distinct names or an 'id' column in a datalist")
        seen[item["id"]] = item["image"]
    unique = {item["id"]: item for item in items}  # the same file listed twice is one volume
    return list(unique.values())


def check_output_folder(path: str | os.PathLike) -> Path:
    """Refuse an existing ``--out`` that is a file or a non-empty folder, before any work starts."""
    final = Path(path)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise FileExistsError(f"{final}: already exists and is not an empty folder; choose a new --out")
    return final


@contextlib.contextmanager
def new_output_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``path`` only if the block succeeds (``path``: new or empty).

    If ``path`` fills up meanwhile, nothing there is touched: the error says where the finished
    output was kept instead (``medvae.atomic``).
    """
    from medvae.atomic import atomic_directory

    with atomic_directory(check_output_folder(path)) as tmp:
        yield tmp
